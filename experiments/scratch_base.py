"""A small GPT-2-BPE base model trained here from scratch, for SFT experiments without GPT-2 weights.

    python experiments/scratch_base.py [--out out_scratch_base] [--max-iters 600]

No GPT-2 124M weights can be downloaded on this project's machines, so the SFT experiments
(experiments/sft_reference.py, experiments/capstone/run_capstone.py) need a base that can be
trained on a 2-core CPU in minutes: 4 layers, 4 heads, 128 wide, context 256, GPT-2's
50,257-token vocabulary (so the Alpaca template and <|endoftext|> work as with real GPT-2),
trained on the Tiny Shakespeare shipped with jaxgpt. It writes English-ish text, nothing more;
every result built on it says so. With real weights, pass `--base gpt2` to those scripts instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SHAPE = ["--tokenizer", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
         "--block-size", "256", "--batch-size", "8", "--lr", "2e-3", "--warmup-iters", "50",
         "--eval-interval", "200", "--eval-iters", "10", "--sample-tokens", "60", "--steps-per-call", "5"]


def scratch_base(out: str | Path = "out_scratch_base", max_iters: int = 600, force: bool = False) -> Path:
    """Train the base into `out` unless a finished run is already there; returns `out`."""
    out = Path(out)
    done = out / "checkpoints" / str(max_iters)
    if done.is_dir() and not force:
        print(f"using the existing base in {out}", file=sys.stderr)
        return out
    cmd = [sys.executable, "-m", "jaxgpt.train", *SHAPE, "--max-iters", str(max_iters),
           "--ckpt-interval", str(max_iters), "--out", str(out)]
    print("+ " + " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out_scratch_base", help="run directory of the base")
    ap.add_argument("--max-iters", type=int, default=600, help="training steps")
    ap.add_argument("--force", action="store_true", help="retrain even if the run exists")
    args = ap.parse_args()
    scratch_base(args.out, args.max_iters, args.force)


if __name__ == "__main__":
    main()
