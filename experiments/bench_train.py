"""Train-step speed: jaxgpt's real train step vs HF GPT2LMHeadModel + torch.optim.AdamW.

Same model shape, batch and sequence length; the implementations are alternated over several
rounds, each in its own worker process (below); the tables show medians (min-max) of ms/step,
tokens/s, system CPU time per step, jaxgpt's compile time, and model FLOPs utilisation (MFU)
against this machine's float32 GEMM peak, measured at the start of the same run.

    python experiments/bench_train.py             # baby (12 x 64) and the 124M shape (4 x 256), ~4 min
    python experiments/bench_train.py --no-gpt2   # baby only, ~1.5 min

Model FLOPs per step = (6 N + 12 L C T) x B x T: N = parameters that take part in matmuls (all
but the position embedding; the tied embedding counts once, as the head), the 12 L C T term is
the attention scores and weighted values (forward + backward, no discount for the causal mask),
as in nanoGPT's `estimate_mfu` and the PaLM paper. The GEMM peak is the best median GFLOP/s of a
jitted float32 matmul over two shapes: 2048^3 and the 124M model's MLP matmul (1024 x 768 x 3072).

The script re-executes itself with the glibc malloc settings that `python -m jaxgpt.train` also
runs with (jaxgpt.runtime.MALLOC_TUNABLES: one arena, no mmap/trim, so freed temporaries are reused
instead of faulted in again each step, and transparent huge pages; see experiments/PERF.md)
unless --default-malloc.

Each implementation runs in its own persistent worker process (multiprocessing, "spawn" start
method), as users run them (one framework per process): a jaxgpt worker (holding every jaxgpt
row of a table) and a torch worker each build the model and optimizer and compile / warm up once;
the parent then alternates them over the rounds (A B, B A, ...): it tells one worker to run N
steps and waits for its per-call wall times and its own system CPU seconds for those steps
(getrusage(RUSAGE_SELF) in the worker), then the other; the idle worker blocks on its pipe. The
workers inherit the parent's environment, so they run with the same GLIBC_TUNABLES (each worker
reports its value and the parent checks it). The GEMM peak is measured in the parent before the
workers start. Separate processes matter on a CPU: sharing glibc's single malloc arena with torch
cost jaxgpt's 124M step ~1 s/step of system CPU (page faults) vs 0.02-0.04 s in its own process,
and torch's OpenMP threads can spin after its ops, taking cores from XLA's threads.

    python experiments/bench_train.py --same-process   # the old mode: both in this one process

--same-process builds and runs everything in this process, in the fixed order A B, A B, ... (as
before the worker mode existed); torch then shares the malloc settings and the arena.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time
import traceback

from jaxgpt.runtime import MALLOC_TUNABLES, reexec_with_malloc_tunables

if __name__ == "__main__" and not {"--default-malloc", "--no-thp"} & set(sys.argv):
    reexec_with_malloc_tunables(sys.argv)  # the train CLI's malloc settings (see the docstring)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxgpt.config import TrainConfig  # noqa: E402
from jaxgpt.model.gpt import GPT, count_params  # noqa: E402
from jaxgpt.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxgpt.training.trainer import make_step  # noqa: E402


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
    graphdef, params, frozen = nnx.split(GPT(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = make_optimizer(cfg)
    step = make_step(graphdef, tx, lr_schedule(cfg), seed=cfg.seed, dropout=cfg.dropout > 0)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
    T, B = model_cfg.block_size, cfg.batch_size
    if x is None:
        x = np.random.default_rng(0).integers(0, vocab, (steps_per_call, 1, B, T + 1))
    x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (steps_per_call, 1, B, T + 1))
    batch = {"x": x[..., :-1], "y": x[..., 1:]}
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def run():
        box[0], m = compiled(box[0], frozen, batch)
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


def jax_labels(ks: list[int]) -> list[str]:
    return [f"jaxgpt (scan of {k})" if k > 1 else "jaxgpt (1 step/call)" for k in ks]


def build_runners(kind: str, cfg: TrainConfig, vocab: int, ks: list[int]):
    """{label: (run, steps per call)} and {label: compile seconds} for "jax" (one runner per
    steps-per-call in ks) or "torch" (HF GPT-2, every core)."""
    if kind == "torch":
        import torch

        torch.set_num_threads(os.cpu_count())  # torch uses every core, as XLA does
        return {"HF torch": (torch_runner(cfg, vocab), 1)}, {}
    runners, compiles = {}, {}
    for label, k in zip(jax_labels(ks), ks):
        run, compiles[label] = jax_runner(cfg, vocab, k)
        runners[label] = (run, k)
    return runners, compiles


def timed(run, k: int, steps: int) -> tuple[list[float], float]:
    """Run max(1, steps // k) calls of `run` (k steps each): per-call wall seconds, and this
    process's system CPU seconds over them."""
    calls = max(1, steps // k)
    s0 = cpu_seconds()[1]
    walls = []
    for _ in range(calls):
        t = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t)
    return walls, cpu_seconds()[1] - s0


def worker(conn, kind: str, cfg: TrainConfig, vocab: int, ks: list[int]):
    """A worker process: build the runners once, report, then serve (label, steps) requests with
    timed(...) until it receives None. Errors go back to the parent as ("error", traceback)."""
    try:
        runners, compiles = build_runners(kind, cfg, vocab, ks)
        conn.send({"pid": os.getpid(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                   "labels": {label: k for label, (_, k) in runners.items()}, "compiles": compiles})
        while (msg := conn.recv()) is not None:
            label, steps = msg
            run, k = runners[label]
            conn.send(timed(run, k, steps))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Worker:
    """Parent side of one worker process (spawned: a fresh interpreter with this environment)."""

    def __init__(self, kind: str, cfg: TrainConfig, vocab: int, ks: list[int]):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, kind, cfg, vocab, ks), daemon=True)
        self.proc.start()
        child.close()
        self.info = self._recv()  # blocks until the runners are built, compiled and warmed up

    def _recv(self):
        msg = self.conn.recv()
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise RuntimeError(f"worker {self.proc.pid} failed:\n{msg[1]}")
        return msg

    def run(self, label: str, steps: int):
        self.conn.send((label, steps))
        return self._recv()

    def close(self):
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


def bench(name: str, cfg: TrainConfig, vocab: int, rounds: int, steps: int, ks: list[int],
          peak: float, same_process: bool = False):
    """Alternate jaxgpt (one row per steps-per-call in ks) and HF torch; print one table. Each
    implementation in its own worker process unless same_process (see the module docstring)."""
    mc = cfg.model_config(vocab)
    tokens = cfg.batch_size * mc.block_size
    flops = model_flops_per_step(cfg, vocab)
    workers = []
    if same_process:
        runs, compiles = build_runners("jax", cfg, vocab, ks)
        torch_runs, _ = build_runners("torch", cfg, vocab, ks)
        runs.update(torch_runs)
        calls = {label: (lambda n, run=run, k=k: timed(run, k, n)) for label, (run, k) in runs.items()}
        ks_of = {label: k for label, (_, k) in runs.items()}
    else:
        try:  # one after the other, so the jaxgpt compile time is not shared with torch's warm-up
            for kind in ("jax", "torch"):
                workers.append(Worker(kind, cfg, vocab, ks))
        except BaseException:
            for w in workers:
                w.close()
            raise
        compiles, calls, ks_of = workers[0].info["compiles"], {}, {}
        mine = os.environ.get("GLIBC_TUNABLES", "")
        for w in workers:
            if w.info["glibc_tunables"] != mine:
                raise RuntimeError(f"worker {w.info['pid']} has GLIBC_TUNABLES="
                                   f"{w.info['glibc_tunables']!r}, the parent {mine!r}")
            for label, k in w.info["labels"].items():
                calls[label] = lambda n, w=w, label=label: w.run(label, n)
                ks_of[label] = k
    res = {k: [] for k in calls}
    sys_cpu = {k: [] for k in calls}
    try:
        for r in range(rounds):  # alternate A B, B A, ... (same process: A B, A B, as before)
            order = list(calls) if same_process or r % 2 == 0 else list(calls)[::-1]
            for label in order:
                walls, s = calls[label](steps)
                n = len(walls) * ks_of[label]
                res[label].append(sum(walls) / n)
                sys_cpu[label].append(s / n)
    finally:
        for w in workers:
            w.close()
    torch_med = statistics.median(res["HF torch"])
    comp = ", ".join(f"{k.split(' ', 1)[1][1:-1]} {v:.1f} s" for k, v in compiles.items())
    where = ("both in this process" if same_process else "separate worker processes: " + ", ".join(
        f"{w.info['pid']} ({'/'.join(w.info['labels'])})" for w in workers) + ", same GLIBC_TUNABLES")
    print(f"\n{name}: batch {cfg.batch_size} x {mc.block_size}, {rounds} rounds of {steps} steps "
          f"per implementation; {where}; model FLOPs/step {flops / 1e9:.1f} G; jaxgpt compile "
          f"(trace + lower + compile): {comp}", flush=True)
    print(f"| {'implementation':<24} | {'ms/step median (min-max)':<28} | {'tokens/s':>9} | "
          f"vs torch | {'MFU':>5} | sys CPU ms/step |")
    print(f"|{'-' * 26}|{'-' * 30}|{'-' * 11}|{'-' * 10}|{'-' * 7}|{'-' * 17}|")
    for k_ in calls:
        v = res[k_]
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
    ap.add_argument("--same-process", action="store_true",
                    help="run both implementations in this process (the old mode) instead of one "
                         "worker process each")
    args = ap.parse_args()
    t_start = time.perf_counter()
    from importlib.metadata import version  # torch's version without importing torch here

    print(f"machine: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"torch {version('torch')}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"{'same process' if args.same_process else 'one worker process per implementation'}")
    gemm = gemm_peak()
    peak = max(gemm.values())
    print("float32 GEMM, jitted, median GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm.items())
          + f" -> peak {peak:.0f} GFLOP/s (the MFU denominator)", flush=True)
    bench("baby (4L/4H/128, char vocab 65)", TrainConfig(), 65, args.rounds, args.steps, [10, 1], peak,
          args.same_process)
    if args.gpt2:
        # one step per call: at ~10 s per step the host's dispatch cost is negligible, and a
        # scan of 10 would make each call take minutes
        bench("gpt2 124M shape (12L/12H/768, vocab 50257)",
              TrainConfig(preset="gpt2", batch_size=4, block_size=256), 50257,
              args.gpt2_rounds, args.gpt2_steps, [1], peak, args.same_process)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
