"""`python -m jaxgpt.harness [lm_eval run flags]`: EleutherAI lm-evaluation-harness's own command
line with the `jaxgpt` model registered (jaxgpt.harness), `--model jaxgpt` by default and
jaxgpt's local tasks (jaxgpt.harness.tasks) as the default `--include_path`.

    python -m jaxgpt.harness --model_args path=CKPT --tasks jaxgpt_local
    python -m jaxgpt.harness --model_args path=gpt2,int8=True --tasks hellaswag --batch_size 16
    python -m jaxgpt.harness ls tasks                                   # lm_eval's other commands

lm_eval 0.4.13 reads no entry-point group for models, so `lm_eval --model jaxgpt` cannot find an
out-of-tree model; this command (also installed as `jaxgpt-lm-eval`) is lm_eval's CLI after the
registration. The jaxgpt model's --model_args are checked before lm_eval indexes its tasks, so a
mistake there is one line (exit status 2) at once.
"""

from __future__ import annotations

import argparse
import sys
from importlib.util import find_spec
from pathlib import Path

from jaxgpt.cli import run
from jaxgpt.config import ConfigError

SUBCOMMANDS = ("run", "ls", "validate")


def build_parser() -> argparse.ArgumentParser:
    """The main flags, for --help (every other `lm-eval run` flag is passed through as it is)."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.harness",
        description="Evaluate a jaxgpt model with EleutherAI's lm-evaluation-harness (lm_eval): its "
                    "own `lm-eval run` command line, with the `jaxgpt` model registered. Needs "
                    "pip install -e '.[eval]'.",
        epilog="Every other flag of `lm-eval run` (lm-eval run --help) is passed through unchanged; "
               "`python -m jaxgpt.harness ls tasks` and `validate` are lm_eval's too. The jaxgpt "
               "model's --model_args: path (or pretrained), int8, max_length, max_gen_toks, "
               "add_bos_token, prefix_token_id, template, seed. Local tasks (offline): "
               "jaxgpt_hellaswag, jaxgpt_shakespeare, jaxgpt_shakespeare_next; jaxgpt_local is all three.")
    p.add_argument("--model", default="jaxgpt",
                   help="an lm_eval model name (default: %(default)s; hf, local-completions, ... also work)")
    p.add_argument("--model_args", nargs="+", default=None, metavar="ARGS",
                   help="key=value,... e.g. path=CKPT (a jaxgpt run, HF folder, hub name, int8 "
                        "checkpoint or LoRA adapter folder), int8=True, max_length=N")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="task names, comma-separated: a harness task (hellaswag, ...) or a local one")
    p.add_argument("--include_path", default=None,
                   help="a folder of task YAMLs (default: jaxgpt's local tasks)")
    p.add_argument("--batch_size", default=None,
                   help="rows per compiled scoring call and generation slots (default / auto: "
                        "chosen by jaxgpt)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a count or a fraction)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--output_path", default=None, help="write the results (and samples) here")
    p.add_argument("--log_samples", action="store_true", help="also write every request's response")
    return p


def _model_args(value) -> dict:
    """--model_args as lm_eval parsed it (a dict, or a key=value,... string)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    from lm_eval.utils import simple_parse_args_string
    return simple_parse_args_string(value)


def check_model(args: dict) -> None:
    """The jaxgpt model's args: known keys, a path, and a path that exists (or a hub name)."""
    from jaxgpt.formats.load import HUB_NAME
    from jaxgpt.harness.model import check_args

    check_args(args)
    path = str(args.get("path") or args.get("pretrained"))
    if not Path(path).expanduser().exists() and (not HUB_NAME.match(path) or path.startswith(".")):
        raise ConfigError(f"--model_args path={path}: no such file or folder")


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    if find_spec("lm_eval") is None or find_spec("tenacity") is None:
        raise ConfigError("the harness needs lm-evaluation-harness: pip install -e '.[eval]' "
                          "(lm_eval[api])")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from jaxgpt import harness  # registers the jaxgpt model

    if argv[0] not in SUBCOMMANDS:
        argv = ["run", *argv]
    setup_logging()
    cli = HarnessCLI()
    saved, sys.argv = sys.argv, ["python -m jaxgpt.harness", *argv]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "include_path", "unset") is None:
        args.include_path = str(harness.tasks_dir())
    if argv[0] == "run":
        args.model = args.model or harness.MODEL_NAME
        if not args.tasks and not getattr(args, "config", None):
            raise ConfigError("--tasks is required, e.g. --tasks jaxgpt_local (jaxgpt's offline "
                              "tasks) or --tasks hellaswag")
        if args.model == harness.MODEL_NAME:
            check_model(_model_args(args.model_args))
    try:
        cli.execute(args)
    except ValueError as e:  # lm_eval's own words for an unknown task name, as one line
        if str(e).startswith("Tasks not found"):
            raise ConfigError(f"{e} (list them: python -m jaxgpt.harness ls tasks)") from None
        raise
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
