"""jaxgpt: GPT-2 and the Llama family in JAX/Flax NNX — train from scratch, load, sample, fine-tune, serve.

The package in rooms (imports point one way, down this list):
  cli/         one module per command (`python -m jaxgpt.X` runs jaxgpt.cli.X)
  serve/, harness/   the OpenAI-compatible server; the lm-evaluation-harness model
  training/    the one Trainer and the kinds of run on it (pretrain, sft)
  decode/      the one decode Engine, text samples, chat sessions
  evaluate/    the one scorer of continuations, perplexity, HellaSwag
  formats/     jaxgpt.load, checkpoints, HF / GGUF / nanoGPT conversion, int8 copies
  data/        corpora -> token shards, the shard loader, the text-file cache
  model/       GPT (gpt), int8 layers (quant), LoRA (lora)
  tokenizers/  char, GPT-2, HF byte-level BPE; chat templates
  config, losses, optim, parallel, runtime   small shared pieces
"""

from jaxgpt import runtime as _runtime
from jaxgpt.config import ConfigError, GPTConfig, TrainConfig

_runtime.set_cpu_xla_flags()  # (before JAX starts its backend: XLA reads XLA_FLAGS once)

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ConfigError", "count_params", "init_cache",
           "generate", "get_tokenizer", "train", "load", "LoadedModel"]
__version__ = "0.1.0"


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Train as `python -m jaxgpt.train` does: `jaxgpt.train(TrainConfig(...))` or keyword flags."""
    from jaxgpt.training.pretrain import train as _train

    config = config or TrainConfig()
    if overrides:
        import dataclasses
        config = dataclasses.replace(config, **overrides)
    return _train(config)


def __getattr__(name):
    # PEP 562 lazy attributes: `import jaxgpt` stays light (jax and flax, orbax and the converters
    # load on first use, so a CLI re-executing itself imports them once).
    if name in ("GPT", "count_params", "init_cache"):  # jax + flax: ~1 s to import
        from jaxgpt.model import gpt
        return getattr(gpt, name)
    if name == "get_tokenizer":
        from jaxgpt.tokenizers.tokenizer import get_tokenizer
        return get_tokenizer
    if name == "generate":
        from jaxgpt.decode.generate import generate
        return generate
    if name in ("load", "LoadedModel"):
        from jaxgpt.formats import load
        return getattr(load, name)
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
