"""Peak memory of jaxgpt's real train step for the GPT-2 124M shape, with and without --remat.

Each configuration runs in its own subprocess: it builds the train step (AdamW state included),
compiles it, runs `--steps` optimizer steps, and reports
  - XLA's buffer assignment (`compiled.memory_analysis()`): arguments (params + optimizer state +
    batch), temporaries (activations kept for the backward pass, gradients, logits...);
  - the process's peak resident memory (ru_maxrss), which is what has to fit in RAM.

    python experiments/bench_memory.py                  # batch 8 x 1024, remat off and on (~5 min)
    python experiments/bench_memory.py --compile-only   # XLA's numbers only, no step run (~1 min)
    python experiments/bench_memory.py --grad-accum 2   # the same batch as 2 micro-batches of 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GiB = 2 ** 30


def child(remat: bool, batch: int, block: int, steps: int, compile_only: bool,
          accum: int = 1) -> dict:
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxgpt.config import TrainConfig
    from jaxgpt.model.gpt import GPT
    from jaxgpt.optim import lr_schedule, make_optimizer
    from jaxgpt.training.trainer import make_step

    cfg = TrainConfig(preset="gpt2", batch_size=batch, block_size=block, remat=remat,
                      steps_per_call=1, grad_accum=accum)
    mc = cfg.model_config(50257)
    graphdef, params, frozen = nnx.split(GPT(mc, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = make_optimizer(cfg)
    step = make_step(graphdef, tx, lr_schedule(cfg), seed=cfg.seed)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
    x = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (1, accum, batch // accum, block + 1)), jnp.int32)
    b = {"x": x[..., :-1], "y": x[..., 1:]}
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, b).compile()
    out = {"compile_s": time.perf_counter() - t0}
    ma = compiled.memory_analysis()
    out.update(args_gib=ma.argument_size_in_bytes / GiB, temp_gib=ma.temp_size_in_bytes / GiB,
               out_gib=ma.output_size_in_bytes / GiB, alias_gib=ma.alias_size_in_bytes / GiB)
    need = (ma.argument_size_in_bytes + ma.temp_size_in_bytes) / GiB
    avail = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemAvailable"))) / 2 ** 20
    if not compile_only and need + 2 > avail:  # don't push a shared machine into the OOM killer
        out["skipped"] = f"needs ~{need:.1f} GiB, {avail:.1f} GiB available"
        compile_only = True
    if not compile_only:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, frozen, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        out.update(step_s=times, loss=float(m["loss"][-1]))
    out["maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1, help="steps run per configuration")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per step (the same global batch in less memory)")
    ap.add_argument("--compile-only", action="store_true", help="only compile: XLA's numbers")
    ap.add_argument("--child", choices=["remat", "no-remat"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child == "remat", args.batch, args.block, args.steps, args.compile_only,
                    args.grad_accum)
        print("RESULT " + json.dumps(res), flush=True)
        return
    print(f"GPT-2 124M train step (AdamW, fp32), batch {args.batch} x {args.block}, "
          f"grad accum {args.grad_accum}, {os.cpu_count()} cores; each row is a fresh process", flush=True)
    rows = {}
    for mode in ("no-remat", "remat"):
        cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch),
               "--block", str(args.block), "--steps", str(args.steps),
               "--grad-accum", str(args.grad_accum)]
        cmd += ["--compile-only"] if args.compile_only else []
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{mode}: failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
            continue
        rows[mode] = json.loads(line[0][len("RESULT "):])
    print(f"| {'train step':<14} | XLA args GiB | XLA temps GiB | args + temps GiB | "
          f"peak RSS GiB | compile s | s/step |")
    print(f"|{'-' * 16}|{'-' * 14}|{'-' * 15}|{'-' * 18}|{'-' * 14}|{'-' * 11}|{'-' * 8}|")
    for mode, r in rows.items():
        step = f"{min(r['step_s']):.1f}" if "step_s" in r else "-"
        rss = f"{r['maxrss_gib']:.2f}" if "step_s" in r else f"({r['maxrss_gib']:.2f})"
        label = "--remat" if mode == "remat" else "default"
        if "skipped" in r:
            print(f"{label}: step not run: {r['skipped']}")
        print(f"| {label:<14} | {r['args_gib']:>12.2f} | {r['temp_gib']:>13.2f} | "
              f"{r['args_gib'] + r['temp_gib']:>16.2f} | {rss:>12} | {r['compile_s']:>9.1f} | {step:>6} |")


if __name__ == "__main__":
    main()
