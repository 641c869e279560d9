"""Train-step speed: jaxgpt's real train step vs HF GPT2LMHeadModel + torch.optim.AdamW.

Same model shape, batch and sequence length; the implementations are alternated over several
rounds in one process; the tables show medians (min-max) of ms/step, tokens/s, system CPU time
per step, jaxgpt's compile time, and model FLOPs utilisation (MFU) against this machine's float32
GEMM peak, measured at the start of the same run.

    python experiments/bench_train.py             # baby (12 x 64) and the 124M shape (4 x 256), ~4 min
    python experiments/bench_train.py --no-gpt2   # baby only, ~1.5 min

Model FLOPs per step = (6 N + 12 L C T) x B x T: N = parameters that take part in matmuls (all
but the position embedding; the tied embedding counts once, as the head), the 12 L C T term is
the attention scores and weighted values (forward + backward, no discount for the causal mask),
as in nanoGPT's `estimate_mfu` and the PaLM paper. The GEMM peak is the best median GFLOP/s of a
jitted float32 matmul over two shapes: 2048^3 and the 124M model's MLP matmul (1024 x 768 x 3072).

The script re-executes itself with the glibc malloc settings that `python -m jaxgpt.train` also
runs with (jaxgpt.train.MALLOC_TUNABLES: one arena, no mmap/trim, so freed temporaries are reused
instead of faulted in again each step, and transparent huge pages; see experiments/PERF.md)
unless --default-malloc; both implementations run in the same process, so torch gets the same
setting.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from jaxgpt.train import MALLOC_TUNABLES, reexec_with_malloc_tunables

if __name__ == "__main__" and not {"--default-malloc", "--no-thp"} & set(sys.argv):
    reexec_with_malloc_tunables(sys.argv)  # the train CLI's malloc settings (see the docstring)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxgpt.config import TrainConfig  # noqa: E402
from jaxgpt.model import GPT, count_params  # noqa: E402
from jaxgpt.optim import make_optimizer  # noqa: E402
from jaxgpt.train import make_train_step  # noqa: E402


def matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", reps: int = 10) -> float:
    """GFLOP/s (median of `reps`) of a jitted [m, k] x [k, n] matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(ts) / 1e9


def gemm_peak(reps: int = 10) -> dict[str, float]:
    """GFLOP/s (median of `reps`) of a jitted float32 matmul, for two shapes."""
    shapes = {"2048^3": (2048, 2048, 2048), "1024x768x3072": (1024, 768, 3072)}
    return {name: matmul_gflops(*mkn, reps=reps) for name, mkn in shapes.items()}


def model_flops_per_step(cfg: TrainConfig, vocab: int) -> float:
    """(6 N + 12 L C T) x tokens: see the module docstring."""
    mc = cfg.model_config(vocab)
    n = count_params(nnx.state(nnx.eval_shape(lambda: GPT(mc, rngs=nnx.Rngs(0))), nnx.Param))
    n -= mc.block_size * mc.n_embd  # the position embedding is a lookup, not a matmul
    T = mc.block_size
    return (6 * n + 12 * mc.n_layer * mc.n_embd * T) * cfg.batch_size * T


def jax_runner(cfg: TrainConfig, vocab: int, steps_per_call: int, x: np.ndarray | None = None):
    """A closure running `steps_per_call` optimizer steps of jaxgpt's train step (it returns the
    last loss), and the seconds that tracing + lowering + compiling it took. `x` [B, T + 1]: one
    batch used for every step; default a fresh random batch per step."""
    model_cfg = cfg.model_config(vocab)
    graphdef, params = nnx.split(GPT(model_cfg, rngs=nnx.Rngs(0)))
    tx = make_optimizer(cfg)
    step = make_train_step(graphdef, tx, cfg)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
    T, B = model_cfg.block_size, cfg.batch_size
    if x is None:
        x = np.random.default_rng(0).integers(0, vocab, (steps_per_call, 1, B, T + 1))
    x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (steps_per_call, 1, B, T + 1))
    batch = (x[..., :-1], x[..., 1:])
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def run():
        box[0], m = compiled(box[0], batch)
        return float(m["loss"][-1])  # the host sync that ends the timed interval

    run()  # warm up (first execution allocates)
    return run, compile_s


def torch_runner(cfg: TrainConfig, vocab: int, x: np.ndarray | None = None, steps: int = 1,
                 bf16: bool = False):
    """A closure running `steps` HF GPT-2 training steps (forward, backward, clipping, AdamW; under
    `torch.autocast(bfloat16)` if `bf16`) on the GPU if there is one; it returns the last loss.
    `x` [B, T + 1]: the batch (its first T columns); default random."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mc = cfg.model_config(vocab)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=mc.block_size, n_embd=mc.n_embd,
                                    n_layer=mc.n_layer, n_head=mc.n_head, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).to(dev)
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    if x is None:
        x = torch.randint(0, vocab, (cfg.batch_size, mc.block_size))
    else:
        x = torch.as_tensor(x[:, :-1])
    x = x.to(dev)

    def run():
        for _ in range(steps):
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = hf(x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # syncs the device

    run()  # warm up
    return run


def cpu_seconds() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def bench(name: str, cfg: TrainConfig, vocab: int, rounds: int, steps: int, ks: list[int],
          peak: float):
    """Alternate jaxgpt (one row per steps-per-call in ks) and HF torch; print one table."""
    import torch

    torch.set_num_threads(os.cpu_count())  # torch uses every core, as XLA does
    mc = cfg.model_config(vocab)
    tokens = cfg.batch_size * mc.block_size
    flops = model_flops_per_step(cfg, vocab)
    runners, compiles = {}, {}
    for k in ks:
        label = f"jaxgpt (scan of {k})" if k > 1 else "jaxgpt (1 step/call)"
        run, compiles[label] = jax_runner(cfg, vocab, k)
        runners[label] = (run, k)
    runners["HF torch"] = (torch_runner(cfg, vocab), 1)
    res = {k: [] for k in runners}
    sys_cpu = {k: [] for k in runners}
    for _ in range(rounds):  # alternate A / B (/ C)
        for label, (run, k) in runners.items():
            calls = max(1, steps // k)
            u0, s0 = cpu_seconds()
            t = time.perf_counter()
            for _ in range(calls):
                run()
            res[label].append((time.perf_counter() - t) / (calls * k))
            sys_cpu[label].append((cpu_seconds()[1] - s0) / (calls * k))
    torch_med = statistics.median(res["HF torch"])
    comp = ", ".join(f"{k.split(' ', 1)[1][1:-1]} {v:.1f} s" for k, v in compiles.items())
    print(f"\n{name}: batch {cfg.batch_size} x {mc.block_size}, {rounds} rounds of {steps} steps "
          f"per implementation; model FLOPs/step {flops / 1e9:.1f} G; jaxgpt compile "
          f"(trace + lower + compile): {comp}", flush=True)
    print(f"| {'implementation':<24} | {'ms/step median (min-max)':<28} | {'tokens/s':>9} | "
          f"vs torch | {'MFU':>5} | sys CPU ms/step |")
    print(f"|{'-' * 26}|{'-' * 30}|{'-' * 11}|{'-' * 10}|{'-' * 7}|{'-' * 17}|")
    for k_, v in res.items():
        med = statistics.median(v)
        rng = f"{1000 * med:.1f} ({1000 * min(v):.1f}-{1000 * max(v):.1f})"
        mfu = flops / med / (peak * 1e9)
        print(f"| {k_:<24} | {rng:<28} | {tokens / med:>9,.0f} | {torch_med / med:>7.2f}x | "
              f"{100 * mfu:>4.0f}% | {1000 * statistics.median(sys_cpu[k_]):>15.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternated measurement rounds (baby)")
    ap.add_argument("--steps", type=int, default=30, help="steps per implementation per round (baby)")
    ap.add_argument("--gpt2-rounds", type=int, default=3, help="alternated rounds (124M shape)")
    ap.add_argument("--gpt2-steps", type=int, default=2, help="steps per round (124M shape)")
    ap.add_argument("--gpt2", action=argparse.BooleanOptionalAction, default=True,
                    help="also bench the 124M shape at batch 4 x 256")
    ap.add_argument("--default-malloc", "--no-thp", action="store_true",
                    help=f"don't re-execute with GLIBC_TUNABLES={MALLOC_TUNABLES}")
    args = ap.parse_args()
    t_start = time.perf_counter()
    import torch

    print(f"machine: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"torch {torch.__version__}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    gemm = gemm_peak()
    peak = max(gemm.values())
    print("float32 GEMM, jitted, median GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items())
          + f" -> peak {peak:.0f} GFLOP/s (the MFU denominator)", flush=True)
    bench("baby (4L/4H/128, char vocab 65)", TrainConfig(), 65, args.rounds, args.steps, [10, 1], peak)
    if args.gpt2:
        # one step per call: at ~10 s per step the host's dispatch cost is negligible, and a
        # scan of 10 would make each call take minutes
        bench("gpt2 124M shape (12L/12H/768, vocab 50257)",
              TrainConfig(preset="gpt2", batch_size=4, block_size=256), 50257,
              args.gpt2_rounds, args.gpt2_steps, [1], peak)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
