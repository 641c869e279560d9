"""Greedy generation speed: jaxgpt (fp32 KV cache, no cache, int8 weights) vs transformers' generate.

    python experiments/bench_generate.py [--quick]

Same random GPT-2 124M weights in both (converted through jaxgpt.convert), a 16-token prompt,
batch 1 and 8, 128 new tokens, greedy. Each implementation is warmed up (jaxgpt compiles) and
then timed in alternating order over the repeats (A B C, C B A, ...), so drift on a shared
machine hits all of them alike. Prints one table: tokens/s (new tokens x batch / wall time).
The int8 row is the same model through jaxgpt.quant (int8 matmul kernels and embedding); its
ids may differ from HF's where random weights leave near-tied logits.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch
import transformers

from jaxgpt.convert import config_from_hf, model_from_tensors
from jaxgpt.quant import quantize_model
from jaxgpt.sample import generate


def build(seed: int = 0, **shape):
    """(HF model, jaxgpt model) sharing one set of random weights."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    cfg = config_from_hf(hf.config.to_dict(), "bench")
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, model_from_tensors(cfg, tensors, "bench")


def contestants(hf, jx, prompt: np.ndarray, new: int, jq=None) -> dict:
    """name -> zero-argument function generating `new` tokens greedily for `prompt` [B, T0]."""
    pt = torch.tensor(prompt)
    mask = torch.ones_like(pt)

    def jax_run(use_cache, model=jx):
        return lambda: np.asarray(generate(model, prompt, new, temperature=0.0, use_cache=use_cache))

    def hf_run():
        with torch.inference_mode():
            return hf.generate(pt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, use_cache=True, pad_token_id=50256).numpy()

    fns = {"jaxgpt (KV cache)": jax_run(True), "jaxgpt (no cache)": jax_run(False),
           "HF generate (KV cache)": hf_run}
    if jq is not None:
        fns["jaxgpt int8 (KV cache)"] = jax_run(True, jq)
    return fns


def bench(batch: int, hf, jx, new: int, repeats: int, no_cache: bool = True, prompt_len: int = 16,
          jq=None) -> dict:
    prompt = np.random.RandomState(batch).randint(0, 50257, (batch, prompt_len)).astype(np.int32)
    fns = contestants(hf, jx, prompt, new, jq)
    if not no_cache:
        del fns["jaxgpt (no cache)"]
    outs = {name: fn() for name, fn in fns.items()}  # warm-up / compile, and a correctness check
    ref = outs["HF generate (KV cache)"]
    agree = {name: bool((o == ref).all()) for name, o in outs.items()}
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):  # alternate A/B order
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (sorted(batch * new / t for t in ts), agree[name]) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller run: 32 new tokens, 2 repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--no-cache-max-batch", type=int, default=8,
                   help="skip the no-cache path above this batch (it costs ~T0+new times more)")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 row")
    args = p.parse_args()
    new = 32 if args.quick else 128
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(os.cpu_count() or 1)
    hf, jx = build()  # GPT2Config() defaults: GPT-2 small, 124M
    jq = None if args.no_int8 else quantize_model(jx)
    print(f"GPT-2 124M (random weights), greedy, 16-token prompt, {new} new tokens, {repeats} "
          f"timed repeats after warm-up | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__} [{jax.devices()[0].platform}], "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}", flush=True)
    print(f"| batch | implementation         | tokens/s (median) | min-max         | same ids as HF |")
    print(f"|------:|------------------------|------------------:|-----------------|:--------------:|")
    for batch in map(int, args.batches.split(",")):  # rows print as each batch size finishes
        results = bench(batch, hf, jx, new, repeats, no_cache=batch <= args.no_cache_max_batch, jq=jq)
        for name, (tps, agree) in results.items():
            print(f"| {batch:5d} | {name:22s} | {statistics.median(tps):17.1f} | "
                  f"{tps[0]:6.1f} - {tps[-1]:6.1f} | {'yes' if agree else 'NO':^14s} |", flush=True)


if __name__ == "__main__":
    main()
