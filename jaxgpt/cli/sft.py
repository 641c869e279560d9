"""`python -m jaxgpt.sft`: flags -> SFTConfig -> fine-tune (jaxgpt.training.sft.run_sft), --merge an
adapter, or --eval-only; a closing line. Bad input is one line and exit status 2 (jaxgpt.cli.run).
"""

import argparse
import json
import sys

from jaxgpt.cli import run
from jaxgpt.cli.flags import MODEL_SOURCES, start_run, early_status, tuning_parser
from jaxgpt.cli.train import HELP as TRAIN_HELP
from jaxgpt.config import ConfigError
from jaxgpt.evaluate.answers import fmt
from jaxgpt.training.sft import SFTConfig, eval_only, run_sft
from jaxgpt.training.tuning import merge_adapter
from jaxgpt.tokenizers import templates

HELP = {
    "ckpt": "the base model: " + MODEL_SOURCES,
    "data": "instruction records: a JSON list or JSONL of {instruction, input, output}, "
            "{prompt, completion} or {messages: [{role, content}, ...]}",
    "out": "output folder: the fine-tuned checkpoint (or LoRA adapter), report.md, "
           "test_generations.jsonl, metrics.jsonl, loss.png, summary.json",
    "template": f"prompt template: {', '.join(templates.TEMPLATES)} (saved with the checkpoint)",
    "val_frac": "fraction of records held out for the validation loss",
    "test_frac": "fraction of records held out for test generations",
    "seed": "seed of the split, the data order and the LoRA init",
    "mask_prompt": "count only reply tokens in the loss (--no-mask-prompt: every real token)",
    "max_length": "longest training sequence in tokens (default: the model's context); longer "
                  "examples lose prompt tokens from the left, or are skipped if the reply alone is longer",
    "epochs": "passes over the train split",
    "max_iters": "stop after this many optimizer steps (overrides --epochs)",
    "batch_size": "examples per optimizer step (padded to the longest, bucketed)",
    "lr": "peak learning rate (default: 5e-5 full fine-tuning, 1e-3 LoRA)",
    "min_lr": "final learning rate of the cosine decay (default: lr/10)",
    "warmup_iters": "linear warmup steps",
    "weight_decay": "AdamW weight decay on 2-D weights",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip gradients to this global norm (0 disables)",
    "lora_rank": "train LoRA adapters of rank r (A [in, r], B [r, out]) instead of every weight",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / r) A B",
    "lora_targets": "comma-separated layers to adapt: c_attn, c_proj (both), attn.c_proj, mlp.c_proj, c_fc",
    "eval_interval": "evaluate the val loss every N steps",
    "gen_tokens": "token budget of each greedy test generation",
    "max_test": "generate answers for at most this many test records (0: all)",
    "eval_only": "only print the masked loss of CKPT (no training, nothing written)",
    "eval_split": "with --eval-only: val (the split) or all (every record, in file order)",
    "json": "with --eval-only: print one JSON object {loss, tokens}",
    "merge": "merge this LoRA adapter folder into its base and write a plain checkpoint to --out",
    "base": "with --merge: the base model to merge into (default: the one the adapter records)",
    "force": "replace a non-empty --out",
    "progress": "show progress bars (--no-progress to hide them)",
}

# the shared optimization / run flags take the pretraining CLI's texts, except where SFT differs
SHARED = {k: v for k, v in TRAIN_HELP.items() if k not in HELP}
HELP = {**SHARED, **HELP,
        "max_iters": "stop after this many optimizer steps (default: --epochs over the train split)",
        "out": "output folder: checkpoints/ as it trains; at the end the fine-tuned model (its last "
               "checkpoint) or the LoRA adapter (adapter.json + lora/), report.md, "
               "test_generations.jsonl, metrics.jsonl, loss.png, summary.json",
        "force": "replace a non-empty --out (deleted once the inputs are validated)",
        "resume": "continue the SFT run in --out from its newest intact checkpoint (same flags "
                  "required, except where it lives and the cadence/device flags)",
        "steps_per_call": "optimizer steps fused into one jitted call (their batches are padded "
                          "to one length); logs, evals and checkpoints still land on their steps"}


def build_parser() -> argparse.ArgumentParser:
    import jaxgpt.training.sft

    return tuning_parser(
        "python -m jaxgpt.sft", jaxgpt.training.sft.__doc__, SFTConfig, HELP,
        epilog="Full fine-tuning leaves a jaxgpt checkpoint in --out; LoRA writes the adapter "
               "(A, B and adapter.json), which sample/chat/eval load on top of its base, and which "
               "--merge folds into a plain checkpoint.")


def _main(argv) -> int:
    
    cfg = SFTConfig(**vars(build_parser().parse_args(argv)))
    start_run(cfg)
    if cfg.merge:
        if not cfg.out:
            raise ConfigError("--merge needs --out MERGED_DIR")
        path = merge_adapter(cfg.merge, cfg.out, cfg.base or cfg.ckpt, cfg.force)
        print(f"merged {cfg.merge} into a plain checkpoint at {path}", file=sys.stderr)
        return 0
    if cfg.eval_only:
        res = eval_only(cfg)
        print(json.dumps(res) if cfg.json else f"masked loss {res['loss']:.4f} over {res['tokens']} tokens")
        return 0
    s = run_sft(cfg)
    if (status := early_status(s)) is not None:
        return status
    t = s["timers"]
    print(f"done: {s['steps']} steps; val loss {fmt(s['before']['val_loss'])} -> "
          f"{fmt(s['after']['val_loss'])}; ends with EOS {s['before']['ends_with_eos']:.2f} -> "
          f"{s['after']['ends_with_eos']:.2f}; steps {t['steps']:.1f} s / eval {t['eval']:.1f} s / "
          f"samples {t['sample']:.1f} s / save {t['save']:.1f} s; report in {cfg.out}/report.md",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
