"""Train-step speed: jaxgpt's real train step vs HF GPT2LMHeadModel + torch.optim.AdamW.

Same model shape, batch and sequence length; A and B alternated over several rounds; the table
shows medians (min-max) of ms/step and tokens/s, plus jaxgpt's first-call compile time.

    python experiments/bench_train.py            # baby config, batch 12 x 64
    python experiments/bench_train.py --gpt2     # also the 124M shape at batch 4 x 256 (slow)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import TrainConfig
from jaxgpt.model import GPT
from jaxgpt.optim import make_optimizer
from jaxgpt.train import make_train_step


def jax_runner(cfg: TrainConfig, vocab: int, steps_per_call: int):
    """A closure running `steps_per_call` optimizer steps of jaxgpt's train step; + compile time."""
    model_cfg = cfg.model_config(vocab)
    graphdef, params = nnx.split(GPT(model_cfg, rngs=nnx.Rngs(0)))
    tx = make_optimizer(cfg)
    step = make_train_step(graphdef, tx, cfg)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
    T, B = model_cfg.block_size, cfg.batch_size
    x = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (steps_per_call, 1, B, T + 1)), jnp.int32)
    batch = (x[..., :-1], x[..., 1:])
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    box = [state]

    def run():
        box[0], m = step(box[0], batch)
        jax.block_until_ready(m)

    return run, compile_s


def torch_runner(cfg: TrainConfig, vocab: int):
    """A closure running one HF GPT-2 training step (forward, backward, AdamW)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    mc = cfg.model_config(vocab)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=mc.block_size, n_embd=mc.n_embd,
                                    n_layer=mc.n_layer, n_head=mc.n_head, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    x = torch.randint(0, vocab, (cfg.batch_size, mc.block_size))

    def run():
        loss = hf(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    run()  # warm up
    return run


def bench(name: str, cfg: TrainConfig, vocab: int, rounds: int, steps: int, k: int):
    import torch

    torch.set_num_threads(os.cpu_count())  # torch uses every core, as XLA does
    tokens = cfg.batch_size * cfg.model_config(vocab).block_size
    jrun, compile_s = jax_runner(cfg, vocab, k)
    jrun1, compile1 = jax_runner(cfg, vocab, 1)
    trun = torch_runner(cfg, vocab)
    res = {"jaxgpt (scan of %d)" % k: [], "jaxgpt (1 step/call)": [], "HF torch": []}
    for _ in range(rounds):  # alternate A / B / C
        t = time.perf_counter()
        for _ in range(max(1, steps // k)):
            jrun()
        res["jaxgpt (scan of %d)" % k].append((time.perf_counter() - t) / (max(1, steps // k) * k))
        t = time.perf_counter()
        for _ in range(steps):
            jrun1()
        res["jaxgpt (1 step/call)"].append((time.perf_counter() - t) / steps)
        t = time.perf_counter()
        for _ in range(steps):
            trun()
        res["HF torch"].append((time.perf_counter() - t) / steps)
    torch_med = statistics.median(res["HF torch"])
    print(f"\n{name}: batch {cfg.batch_size} x {cfg.model_config(vocab).block_size}, "
          f"{rounds} rounds of {steps} steps (compile: scan {compile_s:.1f} s, single {compile1:.1f} s)")
    print(f"| {'implementation':<24} | {'ms/step median (min-max)':<26} | {'tokens/s':>9} | vs torch |")
    print(f"|{'-' * 26}|{'-' * 28}|{'-' * 11}|{'-' * 10}|")
    for k_, v in res.items():
        med = statistics.median(v)
        rng = f"{1000 * med:.1f} ({1000 * min(v):.1f}-{1000 * max(v):.1f})"
        print(f"| {k_:<24} | {rng:<26} | {tokens / med:>9,.0f} | {torch_med / med:>7.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternated measurement rounds")
    ap.add_argument("--steps", type=int, default=30, help="steps per round (baby)")
    ap.add_argument("--gpt2", action="store_true", help="also bench the 124M shape at batch 4 x 256")
    args = ap.parse_args()
    print(f"machine: {jax.devices()[0].device_kind}, {os.cpu_count()} cores, jax {jax.__version__}")
    bench("baby (4L/4H/128, char vocab 65)", TrainConfig(), 65, args.rounds, args.steps, 10)
    if args.gpt2:
        bench("gpt2 124M shape", TrainConfig(preset="gpt2", batch_size=4, block_size=256), 50257,
              max(2, args.rounds // 2), 3, 3)


if __name__ == "__main__":
    main()
