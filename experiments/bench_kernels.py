"""Decode kernels, timed alone: the int8 matmul modes by row count, and token sampling.

    python experiments/bench_kernels.py [--reps N] [--rows 1,2,8,512] [--no-sampling]

1. int8 matmuls (jaxgpt.model.quant.int8_matmul) at GPT-2 124M's layer shapes: 12 independent products
   per call (one per layer) of x [rows, K] with int8 weights [N, K], for rows 1, 2, 8 and 512
   (--rows): "int8 x int8" GOPS = 2 x rows x N x K x 12 / its time, to see where it is compute-bound:
   "weight-only" (float activations, the int8 kernel converted inside the product), "int8 x int8"
   (activations quantized per row, int8 x int8 -> int32) and, for scale, the float32 product of
   the decode copy (jaxgpt.decode.fast.RowLinear over a float32 [N, K] kernel). This is the measurement
   behind int8_matmul's choice of mode (INT8_DOT_MIN_ROWS).
2. sampling from GPT-2-sized logits [B, 50257] (jaxgpt.engine): greedy argmax, temperature only,
   temperature + top-p 0.95 on peaked logits (the nucleus within the top 256: the fast path) and
   on flat logits (a nucleus of ~47,000 ids: the bisection path), per-row settings, and, for
   scale, a Gumbel draw over the whole vocabulary (jax.random.categorical) and a full sort.
Medians of --reps calls after a warm-up, milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxgpt.decode.sampling import sample_rows
from jaxgpt.decode.fast import RowLinear
from jaxgpt.model.quant import INT8_DOT_MIN_ROWS, int8_matmul, quantize_rows

SHAPES = {"c_attn": (2304, 768), "c_fc": (3072, 768), "mlp c_proj": (768, 3072)}  # [N, K]


def timed(f, *args, reps: int) -> float:
    """Median milliseconds of jitted f(*args)."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def matmul_table(reps: int, row_counts=(1, 2, 8, 512)) -> None:
    print("| shape [N, K] x 12 | rows | float32 (RowLinear) | int8 weight-only | int8 x int8 "
          "| int8 x int8 GOPS | auto picks |")
    print("|---|--:|--:|--:|--:|--:|---|")
    for name, (N, K) in SHAPES.items():
        w = [jax.random.normal(jax.random.key(i), (N, K)) * 0.02 for i in range(12)]
        qs = [quantize_rows(a) for a in w]
        for rows in row_counts:
            x = jax.random.normal(jax.random.key(99), (rows, K))
            f32 = lambda x, w: sum(RowLinear(a, jnp.zeros(N), jnp.float32)(x)[:, :4].sum() for a in w)
            mode = lambda m: (lambda x, qs: sum(int8_matmul(x, q, s, m)[:, :4].sum() for q, s in qs))
            t = [timed(f32, x, w, reps=reps), timed(mode("float"), x, qs, reps=reps),
                 timed(mode("int8"), x, qs, reps=reps)]
            auto = "int8 x int8" if rows >= INT8_DOT_MIN_ROWS else "weight-only"
            gops = 2 * rows * N * K * 12 / (t[2] * 1e6)
            print(f"| {name} [{N}, {K}] | {rows} | {t[0]:.2f} ms | {t[1]:.2f} ms | {t[2]:.2f} ms "
                  f"| {gops:.1f} | {auto} |", flush=True)


def sampling_table(reps: int) -> None:
    print("\n| batch | greedy | temperature 0.8 | + top-p 0.95, peaked | + top-p 0.95, flat | "
          "per-row settings, flat | Gumbel draw (categorical) | full sort |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for B in (1, 8):
        flat = jax.random.normal(jax.random.key(0), (B, 50257))  # a random model's logits
        peaked = flat * 8
        keys = jax.random.split(jax.random.key(1), B)
        rows = (jnp.full(B, 0.8), jnp.zeros(B, jnp.int32), jnp.full(B, 0.95))
        t = [timed(lambda l: jnp.argmax(l, -1), flat, reps=reps),
             timed(lambda l, k: sample_rows(l, k, 0.8), flat, keys, reps=reps),
             timed(lambda l, k: sample_rows(l, k, 0.8, None, 0.95), peaked, keys, reps=reps),
             timed(lambda l, k: sample_rows(l, k, 0.8, None, 0.95), flat, keys, reps=reps),
             timed(lambda l, k: sample_rows(l, k, *rows), flat, keys, reps=reps),
             timed(lambda l, k: jax.vmap(jax.random.categorical)(k, l), flat, keys, reps=reps),
             timed(lambda l: jnp.sort(l, axis=-1), flat, reps=reps)]
        print(f"| {B} | " + " | ".join(f"{x:.2f} ms" for x in t) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20, help="timed calls per cell (default 20)")
    p.add_argument("--rows", default="1,2,8,512", help="row counts of the matmul table, comma-separated")
    p.add_argument("--no-sampling", action="store_true", help="only the matmul table")
    args = p.parse_args()
    try:
        rows = [int(r) for r in args.rows.split(",")]
        assert rows and min(rows) >= 1
    except (ValueError, AssertionError):
        p.error(f"--rows: positive integers separated by commas, got {args.rows!r}")
    print(f"jax {jax.__version__} [{jax.devices()[0].platform}]")
    matmul_table(args.reps, rows)
    if not args.no_sampling:
        sampling_table(args.reps)


if __name__ == "__main__":
    main()
