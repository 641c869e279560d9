"""`python -m jaxgpt.dpo`: flags -> DPOConfig -> jaxgpt.training.dpo.run_dpo -> a closing line. Bad input
is one line and exit status 2 (jaxgpt.cli.run)."""

import argparse
import json
import sys

from jaxgpt.cli import run
from jaxgpt.cli.flags import MODEL_SOURCES, start_run, early_status, tuning_parser
from jaxgpt.cli.sft import HELP as SFT_HELP
from jaxgpt.training.dpo import LOSSES, METRICS, DPOConfig, run_dpo

HELP = {**SFT_HELP,
        "ckpt": "the base model: " + MODEL_SOURCES,
        "data": "preference records, a JSON list or JSONL of {prompt, chosen, rejected}: plain "
                "text, or chat (prompt: a list of messages, chosen / rejected: one assistant "
                "message each), TRL's two formats",
        "eval_data": "held-out preference records: eval_ rows (eval_loss, eval_rewards/...) at "
                     "step 0, every --eval-interval and at the end",
        "ref": "reference model (default: CKPT, frozen; with --lora-rank the base with the "
               "adapter off); its log-probs are computed once before training",
        "beta": "DPO's beta: the strength of the pull to the reference (IPO: its tau)",
        "loss": f"loss type, TRL's names and formulas: {', '.join(LOSSES)}",
        "template": "chat template for chat records (default: the model's own, else alpaca)",
        "max_length": "longest prompt + completion in tokens (default: the context); longer pairs "
                      "lose prompt tokens from the left, then completion tokens from the end",
        "epochs": "passes over --data (when --max-iters is not given)",
        "max_iters": "optimizer steps (default: --epochs over --data); 0 only evaluates "
                     "(--eval-data, else --data) and writes the eval_ row",
        "batch_size": "preference pairs per optimizer step",
        "lr": "peak learning rate (default: 1e-6 full, 5e-5 LoRA)",
        "seed": "seed of the data order and the LoRA init",
        "out": "output folder: checkpoints/ (the trained model of a full run), the LoRA adapter "
               "(adapter.json + lora/), metrics.jsonl (TRL's metric names), loss.png, summary.json",
        "resume": "continue the DPO run in --out from its newest intact checkpoint (same flags)",
        "force": "replace a non-empty --out",
        "log_interval": "write a training metrics row every N steps",
        "eval_interval": "evaluate --eval-data every N steps"}


def build_parser() -> argparse.ArgumentParser:
    import jaxgpt.training.dpo

    return tuning_parser("python -m jaxgpt.dpo", jaxgpt.training.dpo.__doc__, DPOConfig, HELP)


def _main(argv) -> int:
    
    cfg = DPOConfig(**vars(build_parser().parse_args(argv)))
    start_run(cfg)
    s = run_dpo(cfg)
    if (status := early_status(s)) is not None:
        return status
    show = lambda r: ", ".join(f"{k[5:]} {r[k]:.4f}" for k in ("eval_loss", *("eval_" + m for m in METRICS)) if k in r)
    if s["after"] is not None:
        print(json.dumps({k: v for k, v in s["after"].items()}), file=sys.stdout)
        if s["steps"] and s["before"] is not s["after"]:
            print(f"before: {show(s['before'])}", file=sys.stderr)
        print(f"{'after' if s['steps'] else 'eval'}: {show(s['after'])}", file=sys.stderr)
    print(f"done: {s['steps']} steps in {s['timers']['steps']:.1f} s; metrics in {cfg.out}/metrics.jsonl",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
