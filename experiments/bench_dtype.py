"""Mixed-precision speed: jaxgpt's real train step in float32 vs bfloat16 compute (and HF torch).

Runs the train step that `python -m jaxgpt.train` uses (`jaxgpt.training.trainer.make_step`: forward, backward,
clipping, AdamW, params and optimizer state float32 in both) once with `dtype="float32"` and once
with `dtype="bfloat16"`, alternated over several rounds in one process, on whatever device JAX
picks (a GPU when there is one). With --torch it adds HF `GPT2LMHeadModel` + `torch.optim.AdamW`
on the same device, in float32 and under `torch.autocast(bfloat16)`, as a reference. Prints one
table: ms/step median (min-max), tokens/s, speed-up over jaxgpt float32, MFU against the
device's measured matmul peak for that dtype, and the loss after the timed steps (every run
starts from the same init and trains on the same batch, so the two jaxgpt losses must track).

    python experiments/bench_dtype.py                                  # baby, 12 x 64 (CPU, ~1 min)
    python experiments/bench_dtype.py --preset gpt2 --batch-size 16 --block-size 1024 --torch  # GPU

On this repo's 2-core CPU bf16 is slower (no bf16 arithmetic units; see experiments/PERF.md);
the GPU figures in the README come from the second command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import TrainConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # experiments/ on the path, for bench_train
from bench_train import jax_runner, matmul_gflops, model_flops_per_step, torch_runner  # noqa: E402


def matmul_peak(dtype: str, n: int) -> float:
    """Median TFLOP/s of a jitted n x n x n matmul in `dtype` (float32 uses JAX's default
    precision, which is what the model's float32 matmuls get: TF32 on recent NVIDIA GPUs)."""
    return matmul_gflops(n, n, n, dtype) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="baby", help="model preset (baby, gpt2, ...)")
    ap.add_argument("--batch-size", type=int, default=12, help="sequences per step")
    ap.add_argument("--block-size", type=int, default=None, help="sequence length (default: the preset's)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 65 for baby, else 50257)")
    ap.add_argument("--steps", type=int, default=10, help="steps per jitted call (lax.scan), timed as one")
    ap.add_argument("--rounds", type=int, default=5, help="alternated measurement rounds")
    ap.add_argument("--peak-size", type=int, default=None, help="n of the n^3 matmul peak (default 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--plain-attention", action="store_true",
                    help="add a bfloat16 row with the plain masked-softmax attention instead of "
                         "the fused one the model picks on a GPU (jaxgpt.model.gpt.fused_attention)")
    ap.add_argument("--torch", action="store_true", help="add HF GPT-2 + torch AdamW rows (fp32, autocast bf16)")
    args = ap.parse_args()
    vocab = args.vocab or (65 if args.preset == "baby" else 50257)
    base = TrainConfig(preset=args.preset, batch_size=args.batch_size, block_size=args.block_size)
    T = base.model_config(vocab).block_size
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {args.preset}, "
          f"batch {args.batch_size} x {T}, vocab {vocab}, {args.steps} steps per timed call, "
          f"{args.rounds} rounds", flush=True)
    n = args.peak_size or (8192 if dev.platform == "gpu" else 1024)
    peak = {d: matmul_peak(d, n) for d in ("float32", "bfloat16")}
    print("matmul peak, jitted {0}^3, median TFLOP/s: ".format(n)
          + ", ".join(f"{d} {v:.3g}" for d, v in peak.items()), flush=True)
    x = np.random.default_rng(0).integers(0, vocab, (args.batch_size, T + 1))
    runners, compiles = {}, {}
    for d in ("float32", "bfloat16"):
        cfg = TrainConfig(**{**base.__dict__, "dtype": d})
        runners[f"jaxgpt {d}"], compiles[d] = jax_runner(cfg, vocab, args.steps, x)
    if args.plain_attention:  # the same step traced with the fused-attention selector off
        import jaxgpt.model.gpt as model_mod

        selector, model_mod.fused_attention = model_mod.fused_attention, lambda dtype: None
        cfg = TrainConfig(**{**base.__dict__, "dtype": "bfloat16"})
        runners["jaxgpt bfloat16 plain attn"], compiles["bf16 plain attn"] = jax_runner(cfg, vocab, args.steps, x)
        model_mod.fused_attention = selector
    if args.torch:
        for bf in (False, True):
            runners[f"HF torch {'autocast bf16' if bf else 'float32'}"] = torch_runner(base, vocab, x, args.steps, bf)
    times = {k: [] for k in runners}
    losses = {}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):  # alternate the order
            t = time.perf_counter()
            losses[name] = runners[name]()
            times[name].append((time.perf_counter() - t) / args.steps)
    flops = model_flops_per_step(base, vocab)
    ref = statistics.median(times["jaxgpt float32"])
    import jaxgpt.model.gpt as model_mod

    print("compile (trace + lower + compile): " + ", ".join(f"{k} {v:.1f} s" for k, v in compiles.items())
          + f"; model FLOPs/step {flops / 1e12:.2f} T; fused attention in bfloat16: "
          f"{model_mod.fused_attention(jnp.bfloat16) or 'no (plain masked softmax)'}")
    print(f"| {'implementation':<26} | {'ms/step median (min-max)':<26} | {'tokens/s':>10} | "
          f"vs jaxgpt fp32 | {'MFU':>5} | loss after {1 + args.rounds} calls |")
    print(f"|{'-' * 28}|{'-' * 28}|{'-' * 12}|{'-' * 16}|{'-' * 7}|{'-' * 22}|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rng = f"{1000 * med:.1f} ({1000 * min(ts):.1f}-{1000 * max(ts):.1f})"
        p = peak["bfloat16" if "bf" in name else "float32"]
        print(f"| {name:<26} | {rng:<26} | {args.batch_size * T / med:>10,.0f} | {ref / med:>13.2f}x | "
              f"{100 * flops / med / (p * 1e12):>4.0f}% | {losses[name]:>20.4f} |", flush=True)


if __name__ == "__main__":
    main()
