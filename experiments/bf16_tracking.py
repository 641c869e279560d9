"""Mixed precision on CPU: does `--dtype bfloat16` track float32?

Trains the default baby model (char Tiny Shakespeare) for N steps twice with the same seed,
data and init, once computing in float32 and once in bfloat16 (params and AdamW state stay
float32 in both), through `jaxgpt.train` itself, and prints the two loss curves side by side.

    python experiments/bf16_tracking.py            # 500 steps each, ~2 min
    python experiments/bf16_tracking.py --steps 2000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxgpt.config import TrainConfig
from jaxgpt.training.pretrain import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--log-interval", type=int, default=50)
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            cfg = TrainConfig(dtype=dtype, max_iters=args.steps, log_interval=args.log_interval,
                              eval_interval=args.steps, sample_tokens=0, progress=False,
                              ckpt_interval=args.steps, out=f"{tmp}/{dtype}")
            s = train(cfg, log=lambda msg: None)
            rows = [json.loads(l) for l in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
            dtypes = {str(x.dtype) for x in jax.tree.leaves(s["state"])
                      if jnp.issubdtype(x.dtype, jnp.floating)}
            runs[dtype] = {"rows": rows, "ms": s["ms_per_iter"], "state_dtypes": dtypes}
    f32 = {r["step"]: r for r in runs["float32"]["rows"]}
    bf = {r["step"]: r for r in runs["bfloat16"]["rows"]}
    print(f"baby model, char Tiny Shakespeare, {args.steps} steps, seed 1337, batch 12 x 64")
    print("| step | train loss fp32 | train loss bf16 | diff |")
    print("|--:|--:|--:|--:|")
    diffs = []
    for step in sorted(set(f32) & set(bf)):
        if "train_loss" in f32[step] and "train_loss" in bf[step]:
            a, b = f32[step]["train_loss"], bf[step]["train_loss"]
            diffs.append(abs(a - b))
            print(f"| {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    va, vb = f32[args.steps]["val_loss"], bf[args.steps]["val_loss"]
    print(f"\nval loss at step {args.steps}: fp32 {va:.4f}, bf16 {vb:.4f} ({vb - va:+.4f}); "
          f"max |train loss diff| over the logged steps {max(diffs):.4f}")
    print(f"ms/step: fp32 {runs['float32']['ms']:.1f}, bf16 {runs['bfloat16']['ms']:.1f}; "
          f"floating dtypes of the trained state: fp32 run {sorted(runs['float32']['state_dtypes'])}, "
          f"bf16 run {sorted(runs['bfloat16']['state_dtypes'])}")


if __name__ == "__main__":
    main()
