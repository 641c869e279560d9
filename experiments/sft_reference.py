"""SFT on the reference dataset (1,100 Alpaca records): before/after numbers for the README.

    python experiments/sft_reference.py [--base BASE] [--out out_sft_reference]

BASE defaults to the small GPT-2-BPE model of experiments/scratch_base.py (trained here on Tiny
Shakespeare, since GPT-2 weights cannot be downloaded on this machine); pass --base gpt2 (or an
HF folder) where real weights are available. Runs full fine-tuning, LoRA, and full fine-tuning
with --no-mask-prompt, each from the same base on the same seeded 85/5/10 split, and prints one
table (masked val loss, test ROUGE-L, exact match, fraction of answers ending with
<|endoftext|>), which it also writes to OUT/results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scratch_base import scratch_base  # noqa: E402

from jaxgpt.evaluate.answers import summary_table  # noqa: E402
from jaxgpt.training.sft import SFTConfig, run_sft  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "instruction-data.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model (default: the scratch base, trained if missing)")
    ap.add_argument("--out", default="out_sft_reference", help="folder for the runs and results.md")
    ap.add_argument("--scratch-base", default="out_scratch_base", help="where the scratch base is (trained if missing)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of each run")
    ap.add_argument("--max-test", type=int, default=30, help="test records to generate answers for")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA run")
    ap.add_argument("--no-unmasked", action="store_true", help="skip the --no-mask-prompt run")
    args = ap.parse_args()
    base = args.base or str(scratch_base(args.scratch_base))
    common = dict(ckpt=base, data=str(DATA), epochs=args.epochs, max_test=args.max_test,
                  gen_tokens=96, force=True, eval_interval=40)
    runs = {"full fine-tuning": SFTConfig(out=f"{args.out}/full", lr=1e-3, **common)}
    if not args.no_lora:
        runs["LoRA r=16 (c_attn, c_proj, c_fc)"] = SFTConfig(out=f"{args.out}/lora", lora_rank=16,
                                                              lora_alpha=32.0, lr=3e-3, **common)
    if not args.no_unmasked:
        runs["full, --no-mask-prompt"] = SFTConfig(out=f"{args.out}/full_nomask", lr=1e-3,
                                                   mask_prompt=False, **common)
    summaries = {name: run_sft(cfg) for name, cfg in runs.items()}
    s0 = next(iter(summaries.values()))
    text = (f"SFT of `{base}` on {DATA.name} ({s0['records']['train']} train / {s0['records']['val']} val / "
            f"{s0['records']['test']} test records, {args.epochs} epochs, batch 8; test answers greedy, "
            f"{args.max_test} test records, 96 tokens max)\n\n" + summary_table(summaries))
    Path(args.out, "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
