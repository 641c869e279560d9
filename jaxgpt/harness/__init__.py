"""jaxgpt.harness: jaxgpt as a model of EleutherAI's lm-evaluation-harness (`lm_eval`), plus small
local tasks that run offline.

    python -m jaxgpt.harness --model_args path=CKPT --tasks jaxgpt_local      # lm_eval's own CLI
    import jaxgpt.harness, lm_eval                                            # or from Python:
    lm_eval.simple_evaluate(model="jaxgpt", model_args="path=CKPT", tasks=["hellaswag"])

    model.py   JaxGPTLM: loglikelihood, loglikelihood_rolling, generate_until on jaxgpt's scorer
               and decode engine (imports lm_eval)
    tasks/     jaxgpt_hellaswag (HellaSwag-format jsonl), jaxgpt_shakespeare (rolling
               log-likelihood of Tiny Shakespeare's validation text), jaxgpt_shakespeare_next
               (generate the next line); tag jaxgpt_local runs all three

lm_eval 0.4.13 finds models only in its registry (it reads no entry-point group), so importing
this package registers `jaxgpt` there, as a lazy "jaxgpt.harness.model:JaxGPTLM" entry (when
lm_eval is installed: the `eval` extra). `python -m jaxgpt.harness` (jaxgpt.cli.harness) is
lm_eval's command line after that registration, with `--model jaxgpt` and these tasks' folder
as `--include_path` by default. Only this package imports lm_eval, and only when it is used.
"""

from importlib import resources
from importlib.util import find_spec
from pathlib import Path

MODEL_NAME = "jaxgpt"
TARGET = "jaxgpt.harness.model:JaxGPTLM"


def tasks_dir() -> Path:
    """The folder of jaxgpt's local task YAMLs and their data (for --include_path)."""
    return Path(str(resources.files("jaxgpt.harness") / "tasks"))


def register() -> None:
    """Register the `jaxgpt` model in lm_eval's model registry (idempotent). The harness's own
    models are registered first: its registry loads them only while it is empty."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def __getattr__(name):
    if name == "JaxGPTLM":  # (PEP 562: the class, and lm_eval with it, loads on first use)
        from jaxgpt.harness.model import JaxGPTLM
        return JaxGPTLM
    raise AttributeError(f"module 'jaxgpt.harness' has no attribute {name!r}")


if find_spec("lm_eval") is not None:
    register()
