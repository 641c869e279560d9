"""Greedy generation speed: jaxgpt (fp32 KV cache, no cache, int8 weights) vs transformers' generate.

    python experiments/bench_generate.py [--quick]

Same random GPT-2 124M weights in both (converted through jaxgpt.convert), a 16-token prompt,
batch 1 and 8, 128 new tokens, greedy. Each implementation is warmed up (jaxgpt compiles) and
then timed in alternating order over the repeats (A B C, C B A, ...), so drift on a shared
machine hits all of them alike. Prints one table: tokens/s (new tokens x batch / wall time).
The no-cache row (every step re-runs the model over the whole prefix) is ~10-30x slower, so by
default it is timed once, on its first call, minus the compile time that jax.monitoring reports
for that call (--no-cache-repeats adds ordinary timed repeats). The int8 row is the same model through
jaxgpt.quant (int8 matmul kernels and embedding); its ids may differ from HF's where random
weights leave near-tied logits. On a CPU "jaxgpt (KV cache)" is the default decode, through the
model's decode copy (`jaxgpt.engine.decode_copy`: layer kernels kept transposed, and at batch 1
an int8 screen of the head with a float32 recompute of the candidates, exact:
`screened_argmax`); "jaxgpt (plain weights)" is the same decode over the model's own arrays
(`generate(..., fast_decode=False)`).

The int8 rows are opt-in (`--int8`) so that the default run, which has every row the GPT-2
issue asks for (cache and no cache, against HF, at batch 1 and 8) plus the plain-weights row at
batch 1, stays under 10 minutes on the 2-core development machine; the no-cache row at batch 8
alone takes ~3 minutes there (`--no-cache-max-batch 1` skips it), and `--plain-max-batch 8`
adds the plain-weights row at batch 8 (~1 minute more).
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
from jaxgpt.engine import generate


COMPILE_S = [0.0]  # seconds jax spent tracing, lowering and compiling, summed (jax.monitoring)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _on_duration(event: str, seconds: float, **_):
    if event in COMPILE_EVENTS:
        COMPILE_S[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def build(seed: int = 0, **shape):
    """(HF model, jaxgpt model) sharing one set of random weights."""
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    cfg = config_from_hf(hf.config.to_dict(), "bench")
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, model_from_tensors(cfg, tensors, "bench")


def contestants(hf, jx, prompt: np.ndarray, new: int, jq=None, plain: bool = True) -> dict:
    """name -> zero-argument function generating `new` tokens greedily for `prompt` [B, T0]."""
    pt = torch.tensor(prompt, device=hf.device)
    mask = torch.ones_like(pt)

    def jax_run(use_cache, model=jx, fast=None):
        return lambda: np.asarray(generate(model, prompt, new, temperature=0.0, use_cache=use_cache,
                                           fast_decode=fast))

    def hf_run():
        with torch.inference_mode():
            return hf.generate(pt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, use_cache=True, pad_token_id=50256).cpu().numpy()

    fns = {"jaxgpt (KV cache)": jax_run(True), "jaxgpt (no cache)": jax_run(False),
           "HF generate (KV cache)": hf_run}
    if plain and jax.default_backend() == "cpu":  # the decode without the decode copy (CPU default)
        fns["jaxgpt (plain weights)"] = jax_run(True, fast=False)
    if jq is not None:
        fns["jaxgpt int8 (KV cache)"] = jax_run(True, jq)
    return fns


def bench(batch: int, hf, jx, new: int, repeats: int, no_cache: bool = True, prompt_len: int = 16,
          jq=None, no_cache_repeats: int = 1, plain: bool = True) -> dict:
    prompt = np.random.RandomState(batch).randint(0, 50257, (batch, prompt_len)).astype(np.int32)
    fns = contestants(hf, jx, prompt, new, jq, plain)
    if not no_cache:
        del fns["jaxgpt (no cache)"]
    outs, first = {}, {}
    for name, fn in fns.items():  # warm-up / compile, and a correctness check
        t0, c0 = time.perf_counter(), COMPILE_S[0]
        outs[name] = fn()
        first[name] = time.perf_counter() - t0 - (COMPILE_S[0] - c0)  # run time without compiling
    ref = outs["HF generate (KV cache)"]
    agree = {name: bool((o == ref).all()) for name, o in outs.items()}
    times = {name: [] for name in fns}
    order = list(fns)
    reps = {name: no_cache_repeats if name == "jaxgpt (no cache)" else repeats for name in fns}
    if "jaxgpt (no cache)" in fns and no_cache_repeats == 0:
        times["jaxgpt (no cache)"].append(first["jaxgpt (no cache)"])
    for r in range(max(reps.values())):
        for name in (order if r % 2 == 0 else order[::-1]):  # alternate A/B order
            if r >= reps[name]:
                continue
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (sorted(batch * new / t for t in ts), agree[name]) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller run: 32 new tokens, 2 repeats")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per implementation after the warm-up (default 3; --quick: 2)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--no-cache-max-batch", type=int, default=8,
                   help="skip the no-cache path above this batch (default 8: never)")
    p.add_argument("--no-cache-repeats", type=int, default=0,
                   help="timed repeats of the no-cache path (0: its first call minus compile time)")
    p.add_argument("--plain-max-batch", type=int, default=1,
                   help="time the plain-weights row (CPU) up to this batch (default 1)")
    p.add_argument("--int8", action="store_true", help="add the int8 rows (jaxgpt.quant weights)")
    args = p.parse_args()
    new = 32 if args.quick else 128
    repeats = args.repeats or (2 if args.quick else 3)
    torch.set_num_threads(os.cpu_count() or 1)
    hf, jx = build()  # GPT2Config() defaults: GPT-2 small, 124M
    if torch.cuda.is_available():  # on a GPU machine both run on the GPU
        hf = hf.cuda()
    jq = quantize_model(jx) if args.int8 else None
    hf_where = "cuda" if torch.cuda.is_available() else f"{torch.get_num_threads()} threads"
    print(f"GPT-2 124M (random weights), greedy, 16-token prompt, {new} new tokens, {repeats} "
          f"timed repeats after warm-up (no cache: {args.no_cache_repeats or 'first call minus compile'}) | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} [{jax.devices()[0].platform}], torch {torch.__version__} "
          f"({hf_where}, attention {hf.config._attn_implementation}), "
          f"transformers {transformers.__version__}", flush=True)
    t_start = time.perf_counter()
    print(f"| batch | implementation         | tokens/s (median) | min-max         | same ids as HF |")
    print(f"|------:|------------------------|------------------:|-----------------|:--------------:|")
    for batch in map(int, args.batches.split(",")):  # rows print as each batch size finishes
        results = bench(batch, hf, jx, new, repeats, no_cache=batch <= args.no_cache_max_batch, jq=jq,
                        no_cache_repeats=args.no_cache_repeats, plain=batch <= args.plain_max_batch)
        for name, (tps, agree) in results.items():
            print(f"| {batch:5d} | {name:22s} | {statistics.median(tps):17.1f} | "
                  f"{tps[0]:6.1f} - {tps[-1]:6.1f} | {'yes' if agree else 'NO':^14s} |", flush=True)
        if batch > args.no_cache_max_batch:
            print(f"| {batch:5d} | {'jaxgpt (no cache)':22s} | skipped: --no-cache-max-batch {batch} adds it |")
    print(f"(whole run, model building excluded: {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
