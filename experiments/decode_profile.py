"""Where one decode step's time goes: products, attention, sampling, fences and everything else, in
ms, from XLA:CPU's own per-thunk trace; and the same products run alone (the kernel's speed).

    python experiments/decode_profile.py                    # SmolLM2-135M int8 and float32, batch 1 and 8
    python experiments/decode_profile.py --model gpt2       # GPT-2 124M shape, random weights

bench_generate.py prints this table under its own (`--profile`, on by default for --model smollm2).

How: one decode step (`engine.decode_step` + greedy `next_tokens`, the decode copy and, for a single
float32 row, the int8 head screen, exactly as `generate` runs them) is jitted on its own with a
cache of CACHE_LEN positions, CACHE_FILL of them filled, and run `reps` times under
`jax.profiler.trace`. XLA:CPU records one event per executed thunk (a fusion, a dot, a
conditional ...), named after its HLO instruction; each instruction's part is read from the
`jax.named_scope`s its ops (or, for a fusion, the ops fused into it) were traced under:
"product" (quant.int8_matmul, RowLinear, the head), "fence" (quant.fence), "attention"
(CausalSelfAttention), "sampling" (engine.next_tokens); a fusion that holds a product's dot is a
product whatever else was fused into it (that is what the fence is about). Times are exclusive
(a conditional's own time, without the thunks of its branch). "other" is the rest of the thunks
(norms, residuals, rotary, the embedding), "outside thunks" the step's wall time not covered by
any thunk (dispatch, waiting). "products alone": every product of the step with its real weights,
each fed a parameter of its own (nothing to fuse), chained in one jitted call and traced the same
way: the kernels' own speed, against which "products" inside the model is compared.
The step runs alone here, not inside generate's while loop, so these are XLA's decisions for that
program (the same layers, the same fusion passes; the loop adds its own bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.decode.fast import decode_model
from jaxgpt.decode.steps import decode_step, next_tokens
from jaxgpt.decode.fast import RowLinear
from jaxgpt.model.gpt import init_cache
from jaxgpt.model.quant import Int8Embed, Int8Linear, int8_matmul

CACHE_LEN, CACHE_FILL = 256, 80


def _part(op_names: set[str]) -> str:
    """The part an instruction belongs to, from the op_names of its ops (and of the ops fused into
    it): a product's dot makes it a product whatever else was fused in; then fence, sampling,
    attention, in that order; "other" when none."""
    if any(re.search(r"/product/(.*/)?dot_general$", n) for n in op_names):
        return "product"
    for p in ("fence", "product", "sampling", "attention"):
        if any(f"/{p}/" in n for n in op_names):
            return p
    return "other"


def instruction_parts(hlo: str) -> dict[str, str]:
    """{HLO instruction name: part} for every instruction of an optimized HLO module's text."""
    comps, current = collections.defaultdict(list), None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = head.group(1)
            continue
        if " = " in line and current is not None:
            comps[current].append(line)

    def op_names(lines, seen):  # op_names of these lines and of the computations they fuse
        out = set()
        for line in lines:
            m = re.search(r'op_name="([^"]*)"', line)
            if m:
                out.add(m.group(1))
            if " fusion(" in line:  # a conditional's branches or a loop's body keep their own events
                for c in re.findall(r"calls=%?([\w.\-]+)", line):
                    if c not in seen:
                        seen.add(c)
                        out |= op_names(comps.get(c, []), seen)
        return out

    parts = {}
    for lines in comps.values():
        for line in lines:
            name = line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%")
            names = op_names([line], set())
            # (XLA drops the metadata of RowLinear's per-row dots: a bare dot is a weight product)
            parts[name] = "product" if not names and re.search(r"\} dot\(", line) else _part(names)
    return parts


def _traced(fn, args, reps: int) -> tuple[list[dict], float]:
    """(the thunk events of `reps` calls of fn(*args) under the profiler, median wall seconds per call)."""
    jax.block_until_ready(fn(*args))
    folder = tempfile.mkdtemp(prefix="decode_profile_")
    try:
        walls = []
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        path = next(Path(folder).rglob("*.trace.json.gz"))
        data = json.load(gzip.open(path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e], wall


def exclusive_ms(events: list[dict], parts: dict[str, str], reps: int) -> dict[str, float]:
    """ms per call for each part. A thunk's time is its event's duration less that of the events
    nested in it (a conditional's branch); each thunk counts with the median of its times over the
    calls (times the times it ran per call): on a shared machine a thunk that was preempted once
    does not move the figure."""
    part = lambda name: parts.get(name) or parts[name.removesuffix(".clone")]
    thunks = [e for e in events if e["name"] in parts or e["name"].removesuffix(".clone") in parts]
    by_thread = collections.defaultdict(list)
    for e in thunks:
        by_thread[(e["pid"], e["tid"])].append(e)
    own = collections.defaultdict(list)  # thunk name -> its exclusive times, us
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, its time less its children's]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                done, left = stack.pop()
                own[done["name"]].append(left)
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, e["dur"]])
        for done, left in stack:
            own[done["name"]].append(left)
    out = collections.Counter()
    for name, times in own.items():
        out[part(name)] += statistics.median(times) * len(times) / reps / 1e3  # us -> ms
    return dict(out)


def _products(model) -> list:
    """(layer, in features) of every product of a decode step, head last."""
    out = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Int8Linear):
            out.append((node, node.kernel[...].shape[1]))
        elif isinstance(node, RowLinear):
            out.append((node, node.kernel[...].shape[1]))
    return out


def products_alone(model, screen, B: int, reps: int):
    """A function that measures the ms per call of every product of the decode step alone (see the
    module docstring), compiled once."""
    layers = _products(model)
    head = None
    if screen is not None:
        head = (screen.q, screen.scale)
    elif isinstance(model.wte, Int8Embed) and model.config.tie_word_embeddings:
        head = (model.wte.embedding[...], model.wte.scale[...])
    C = model.config.n_embd
    xs = [jax.random.normal(jax.random.key(i), (B, n), jnp.float32) for i, (_, n) in enumerate(layers)]
    xh = jax.random.normal(jax.random.key(len(xs)), (B, C), jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, xs, xh, head):
        m = nnx.merge(graphdef, state)
        mine = _products(m)
        outs = []
        for (layer, _), x in zip(mine, xs):
            with jax.named_scope("product"):
                if isinstance(layer, Int8Linear):
                    outs.append(int8_matmul(x, layer.kernel[...], layer.scale[...], layer.activations, False))
                else:
                    outs.append(layer(x))
        with jax.named_scope("product"):
            if head is not None:
                mode = "float" if screen is not None else m.wte.activations
                outs.append(int8_matmul(xh, head[0], head[1], mode, False))
            else:
                outs.append(m.head(xh, rows=True))
        return outs

    parts = instruction_parts(run.lower(state, xs, xh, head).compile().as_text())
    return lambda: exclusive_ms(_traced(run, (state, xs, xh, head), reps)[0], parts, reps).get("product", 0.0)


def profile_step(model, B: int, reps: int = 20, rounds_n: int = 3) -> dict[str, float]:
    """{part: ms per step} of one greedy decode step of `model` at batch B (see the module
    docstring); also "wall", "outside thunks" and "products alone"; the medians of `rounds_n`
    rounds of `reps` traced steps, each followed by `reps` traced calls of the products alone."""
    model, screen = decode_model(model, None, screen_rows=B == 1)
    graphdef, state = nnx.split(model)

    def step(state, tok, cache, screen):
        m = nnx.merge(graphdef, state)
        x, new = decode_step(m, tok, cache)
        # (the position stays CACHE_FILL: each call decodes at the same fill)
        return next_tokens(m, x, None, 0.0, screen=screen), {**new, "index": cache["index"]}

    cache = init_cache(model.config, B, CACHE_LEN)
    cache["index"] = jnp.array(CACHE_FILL, jnp.int32)
    tok = jnp.zeros((B, 1), jnp.int32)
    # the cache donated, as the Engine's step donates it (without, XLA copies every layer's cache
    # buffers each step: ~3.4 ms of "other" in GPT-2's int8 step, a cost no served step pays)
    fn = jax.jit(step, donate_argnums=2)
    parts = instruction_parts(fn.lower(state, tok, cache, screen).compile().as_text())
    kept = {"cache": cache}

    def call(state, tok, screen):  # each call on the cache the last one returned
        out, kept["cache"] = fn(state, tok, kept["cache"], screen)
        return out

    alone = products_alone(model, screen, B, reps)
    rounds = []
    for r in range(rounds_n):  # the step and the products alone alternated: drift hits both alike
        events, wall = _traced(call, (state, tok, screen), reps)
        ms = exclusive_ms(events, parts, reps)
        out = {p: ms.get(p, 0.0) for p in ("product", "attention", "sampling", "fence", "other")}
        out["wall"] = wall * 1e3
        out["outside thunks"] = max(0.0, out["wall"] - sum(ms.values()))
        out["products alone"] = alone()
        rounds.append(out)
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def profile_table(rows: list[tuple[str, int, dict]]) -> str:
    """One markdown table of profile_step results: [(name, batch, result)]."""
    lines = ["| model | batch | step (wall) | products | products alone | in model / alone | attention | "
             "sampling | fences | other | outside thunks |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, B, r in rows:
        ratio = r["product"] / r["products alone"] if r["products alone"] else float("nan")
        lines.append(f"| {name} | {B} | {r['wall']:.2f} | {r['product']:.2f} | {r['products alone']:.2f} | "
                     f"{ratio:.2f}x | {r['attention']:.2f} | {r['sampling']:.2f} | {r['fence']:.2f} | "
                     f"{r['other']:.2f} | {r['outside thunks']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "gpt2"), default="smollm2")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--reps", type=int, default=20, help="traced steps per row (default 20)")
    p.add_argument("--no-float", action="store_true", help="int8 rows only")
    p.add_argument("--unfenced", action="store_true", help="add int8 without quant.fence (set_fence False)")
    args = p.parse_args(argv)
    from jaxgpt.model.quant import quantize_model, set_fence

    if args.model == "smollm2":
        import jaxgpt
        model = jaxgpt.load("smollm2").model
    else:
        from jaxgpt.config import GPTConfig
        from jaxgpt.model.gpt import GPT
        model = GPT(GPTConfig.gpt2())
    models = [("int8", quantize_model(model))] + ([] if args.no_float else [("float32", model)])
    if args.unfenced:
        models.append(("int8 unfenced", quantize_model(model)))
        set_fence(models[-1][1], False)
    rows = [(name, B, profile_step(m, B, args.reps)) for B in map(int, args.batches.split(","))
            for name, m in models]
    print(f"{args.model}: one greedy decode step, cache {CACHE_LEN} positions ({CACHE_FILL} filled), "
          f"ms per step, {args.reps} traced steps")
    print(profile_table(rows))


if __name__ == "__main__":
    main()
