"""The one decoder: how a GPT turns prompts into tokens, for sample, chat, SFT reports, training
samples and (later) the server.

It owns, top to bottom:
- token picking: the logit filters (temperature, top-k, top-p), `sample_token` (one setting for
  all rows) and `sample_rows` (a setting per row; greedy rows exact argmax), `check_sampling`;
- the decode copy: `decode_copy` (float layer kernels kept transposed, made once per weights) and
  the exact int8 greedy screen of the head (`greedy_screen`, `screened_argmax`);
- the model steps every decoder runs: `prefill` (a padded prompt into a KV cache of its length),
  `grow_cache` (room for more positions: caches double as sequences grow, so a step attends
  over ~2x the filled positions, not a whole context) and `decode_step` (one token per row),
  with `next_tokens` (hidden states -> ids) and `bucket` (the power-of-two lengths compiled for);
- `Engine`: slots of an explicit KV cache that requests enter and leave independently: `add`
  prefills a request into a free slot, `step` advances every active row by one token in one
  jitted call (rows at different positions, each with its own sampling settings and random
  stream), finished rows free their slot, a callback per emitted token streams it;
- `generate`: offline batched decoding of equal-length prompts as one compiled program of
  `lax.while_loop`s (one per cache capacity), built from the same prefill / decode_step /
  next_tokens (plus the no-cache and sliding-window paths).

Random streams: the token at position t of a row is drawn with fold_in(row_key, t), where the
row's key comes from its own seed (Engine) or from (key, row index) (generate); so a seeded
request draws the same tokens whatever slot or batch it runs in.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import lora
from jaxgpt.config import ConfigError
from jaxgpt.model.gpt import BLOCKWISE_FROM, RowLinear, init_cache
from jaxgpt.model.quant import LINEARS, dequantize_rows, fence, quantize_rows

NEG_INF = -jnp.inf


# ---- filters: pure functions of a [..., V] logits array ---------------------------------------
def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits (ties at the k-th value are kept too), set the rest to -inf."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1] the k-th largest value
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token is kept when the probability mass strictly before it (in descending order) is < p,
    so the most likely token is always kept.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    first = jnp.arange(logits.shape[-1]) == 0  # (p below float32's smallest: still the top one)
    keep_sorted = (mass_before < p) | first
    # the smallest kept logit is the threshold; everything below it goes
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """One token id per row of logits [B, V], all rows drawn with one key and one setting.
    temperature 0 means greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _shared_filters(logits, temperature, top_k, top_p)
    return draw(jax.random.split(key, logits.shape[0]), logits)


def _shared_filters(logits, temperature: float, top_k, top_p) -> jax.Array:
    """logits [B, V] / temperature, then top-k and top-p (the thresholds of top_k_filter and
    top_p_filter, found as _filter_rows does), one setting for every row."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is None and (top_p is None or top_p >= 1.0):
        return logits
    B = logits.shape[0]
    return _filter_rows(logits, jnp.full(B, top_k or 0, jnp.int32),
                        jnp.full(B, 1.0 if top_p is None else top_p, jnp.float32))


FILTER_TOP = 256  # _filter_rows reads this many of the largest logits before searching them all


def _filter_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """top_k_filter then top_p_filter with a setting per row: logits [B, V] (already divided by
    the temperature), top_k int [B] (0 = off), top_p float [B] (1 = off). The same thresholds as
    the two filters.

    Sorting GPT-2's 50257 logits costs ~90 ms for 8 rows on a CPU (more than a decode step of
    the 124M model), so for one row the thresholds are first found among the FILTER_TOP largest
    logits (lax.top_k, ~0.4 ms); only when its k, or its nucleus, reaches past them are they
    found by a search over the whole row (_filter_rows_bisect, ~1 ms). Several rows go straight
    to the search: top_k over 8 rows costs about as much as the search (~2.7 vs 2.9 ms), so
    trying it first only added to the rows it did not fit. (The same thresholds either way, up
    to float rounding of the nucleus mass.)"""
    if logits.shape[0] > 1:
        return _filter_rows_bisect(logits, top_k, top_p)
    K = min(FILTER_TOP, logits.shape[-1])
    top = jax.lax.top_k(logits, K)[0]  # [B, K] descending
    kth = jnp.take_along_axis(top, jnp.clip(top_k, 1, K)[:, None] - 1, axis=1)
    kth = jnp.where(top_k[:, None] > 0, kth, NEG_INF)  # [B, 1]
    lse = jax.nn.logsumexp(jnp.where(logits < kth, NEG_INF, logits), axis=-1, keepdims=True)
    top = jnp.where(top < kth, NEG_INF, top)
    probs = jnp.exp(top - lse)  # the top-k-filtered row's probabilities, of its K largest
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (jnp.arange(K) == 0)  # the top one always
    threshold = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.where(top_p[:, None] < 1.0, threshold, NEG_INF)
    fits = (top_k <= K) & ((top_p >= 1.0) | ~keep[:, -1] | (top[:, -1] == NEG_INF))
    fast = lambda l: jnp.where((l < kth) | (l < threshold), NEG_INF, l)
    return jax.lax.cond(jnp.all(fits), fast, lambda l: _filter_rows_bisect(l, top_k, top_p), logits)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32, order-preserving (a < b iff key(a) < key(b)), so that a threshold
    can be found by bisection over integers."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 0, bits | jnp.uint32(1 << 31), ~bits)


def _smallest_key(pred, B: int) -> jax.Array:
    """The smallest uint32 key k [B, 1] with pred(k) true, for pred monotone in k and true at the
    largest key: a search that splits the interval into `ways` parts per pass (pred is given
    ways - 1 keys [B, ways - 1] at once), 32 / log2(ways) passes. One row splits in 4 (16 passes,
    ~2x faster than halving); more rows halve (32 passes: with 8 rows 4 ways was ~30% slower;
    experiments/PERF.md "Sampling search")."""
    ways = 4 if B == 1 else 2
    i = jnp.arange(1, ways, dtype=jnp.uint32)[None, :]  # [1, ways - 1]

    def narrow(_, bounds):
        lo, hi = bounds  # [B, 1]: pred(lo) false (or lo = 0), pred(hi) true
        d = hi - lo
        cut = lo + (d // ways) * i + ((d % ways) * i) // ways  # [B, ways - 1] ascending in [lo, hi]
        ok = pred(cut)
        return (jnp.max(jnp.where(ok, lo, cut), axis=1, keepdims=True),
                jnp.min(jnp.where(ok, cut, hi), axis=1, keepdims=True))

    lo, hi = jnp.zeros((B, 1), jnp.uint32), jnp.full((B, 1), 0xFFFFFFFF, jnp.uint32)
    lo, hi = jax.lax.fori_loop(0, 32 // (ways.bit_length() - 1), narrow, (lo, hi), unroll=True)
    return jnp.where(pred(lo), lo, hi)


def _filter_rows_bisect(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """_filter_rows for k or nuclei past FILTER_TOP, without sorting the vocabulary: the k-th
    largest logit is the smallest value with fewer than k logits above it, and the nucleus
    threshold the smallest value whose strictly larger logits hold less than p of the
    (top-k-filtered) mass: each found by a search over the values' order keys (_smallest_key:
    16 or 32 passes over the row instead of a sort, ~30x faster for 8 GPT-2 rows)."""
    B, V = logits.shape
    key = _order_key(logits)  # [B, V]
    k = jnp.clip(top_k, 1, V)[:, None]
    # the row in blocks of DRAW_BLOCK (padding: key 0, mass 0, never above a threshold) and summed
    # per block first: a pass over one row ~2x faster than one flat sum (PERF.md "Sampling search")
    blocks = lambda a: jnp.pad(a, ((0, 0), (0, -V % DRAW_BLOCK))).reshape(B, -1, DRAW_BLOCK)
    key_b = blocks(key)  # [B, V / bs, bs]
    above = lambda t, w: jnp.sum(jnp.where(key_b[:, None] > t[:, :, None, None], w, 0),
                                 axis=(-2, -1))  # [B, n]: the w of the keys above each t [B, n]
    kth = jax.lax.cond(jnp.any(top_k > 0),  # (most requests set no k: skip those passes)
                       lambda: _smallest_key(lambda t: above(t, 1) < k, B),
                       lambda: jnp.zeros((B, 1), jnp.uint32))
    kth = jnp.where(top_k[:, None] > 0, kth, 0)
    logits = jnp.where(key < kth, NEG_INF, logits)  # top-k filtered
    probs = blocks(jax.nn.softmax(logits, axis=-1))[:, None]  # [B, 1, V / bs, bs]
    threshold = _smallest_key(lambda t: above(t, probs) < top_p[:, None], B)
    threshold = jnp.minimum(threshold, jnp.max(key, axis=-1, keepdims=True))  # the top one always
    threshold = jnp.where(top_p[:, None] < 1.0, threshold, 0)
    return jnp.where(key < threshold, NEG_INF, logits)


def draw(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One id per row of logits [B, V] (-inf = excluded) drawn from softmax(logits), row b with
    keys[b]: one uniform number per row, inverted through the row's cumulative distribution
    (a Gumbel draw needs V random numbers per row, ~6x slower for GPT-2's vocabulary). The
    distribution is walked in two levels, blocks of DRAW_BLOCK ids then ids within the chosen
    block (a cumulative sum over all V costs as much as the Gumbel draw on a CPU)."""
    B, V = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    n = -(-V // DRAW_BLOCK)
    blocks = jnp.pad(probs, ((0, 0), (0, n * DRAW_BLOCK - V))).reshape(B, n, DRAW_BLOCK)
    cum = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, n] mass up to each block's end
    u = jax.vmap(jax.random.uniform)(keys) * cum[:, -1]  # [B] in [0, total)
    j = jnp.minimum(jnp.sum(cum <= u[:, None], axis=-1), n - 1)  # the block u falls in
    before = jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], 1)[:, 0], 0.0)
    row = jnp.take_along_axis(blocks, j[:, None, None], 1)[:, 0]  # [B, bs] the chosen block
    i = jnp.sum(jnp.cumsum(row, axis=-1) <= (u - before)[:, None], axis=-1)  # lands on mass > 0
    last = DRAW_BLOCK - 1 - jnp.argmax(row[:, ::-1] > 0, axis=-1)  # (float rounding past the
    return (j * DRAW_BLOCK + jnp.minimum(i, last)).astype(jnp.int32)  # block's end: its last id)


DRAW_BLOCK = 256


def sample_rows(logits: jax.Array, keys: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """One token id per row of logits [B, V], row b drawn with keys[b].

    The settings are either Python numbers shared by all rows (compiled in, as `generate` passes
    them; None = filter off) or arrays [B] with one value per row (traced, as the Engine passes
    them: temperature 0 = greedy, top_k 0 = off, top_p 1 = off). A greedy row is the exact
    argmax of its float32 logits either way.
    """
    if isinstance(temperature, (int, float)):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return draw(keys, _shared_filters(logits, temperature, top_k, top_p))
    B = logits.shape[0]
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.zeros(B, jnp.int32) if top_k is None else jnp.asarray(top_k, jnp.int32)
    top_p = jnp.ones(B, jnp.float32) if top_p is None else jnp.asarray(top_p, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)),  # skip the filters if unused
                                lambda l: _filter_rows(l, top_k, top_p), lambda l: l, scaled)
        return draw(keys, filtered)

    drawn = jax.lax.cond(jnp.all(temperature == 0.0), lambda: greedy, sampled)
    return jnp.where(temperature == 0.0, greedy, drawn)


def position_keys(row_keys: jax.Array, positions) -> jax.Array:
    """The key of each row's token at `positions` (a scalar or [B]): fold_in(row_keys[b], t)."""
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), row_keys.shape[:1])
    return jax.vmap(jax.random.fold_in)(row_keys, positions)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   max_new_tokens: int) -> None:
    """ConfigError (named as the CLI flag) for settings that do not define a distribution."""
    if not temperature >= 0:  # also rejects NaN
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


# ---- the decode copy: weights laid out for reading them once per token --------------------------
# Decoding a few rows at a time on a CPU costs one pass over the weights per token (GPT-2 124M:
# 340 MB of layer kernels + the 154 MB tied head), so what is read, and in which order, sets the
# speed. The decode copy holds two derived arrays per model, made once (~0.7 s at 124M) and kept
# exactly as long as the arrays they come from (training replaces those on every update, so a
# stale copy is never used): every float Linear kernel transposed to [out, in] (RowLinear: a
# row-major matrix-vector product, ~15-20% faster), and an int8 screen of the tied head that lets
# batch-1 greedy decoding read a quarter of the head's bytes (screened_argmax). Extra memory:
# about the layer kernels' size again plus a quarter of the embedding (~380 MB at 124M).
SCREEN_K = 256  # rows recomputed in float32; more candidates than this fall back to the full head

_DERIVED: dict[tuple, tuple] = {}  # (what, id(source)) -> (weakref to source, derived array)


def _derived(what: str, source: jax.Array, make):
    """make(source), computed once and kept while `source` is alive (dropped when it dies)."""
    key = (what, id(source))
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is source:
        return hit[1]
    ref = weakref.ref(source, lambda _, key=key: _DERIVED.pop(key, None))
    _DERIVED[key] = (ref, make(source))
    return _DERIVED[key][1]


def decode_copy(model):
    """`model` with every float nnx.Linear replaced by a RowLinear over a cached [out, in] copy of
    its kernel. All other arrays (embeddings, LayerNorms, biases) are shared, not copied; int8 and
    LoRA layers are left as they are. The same outputs as `model`, up to float32 summation order."""
    twin = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    for block in twin.h:
        for sub, name in LINEARS:
            parent = getattr(block, sub)
            lin = getattr(parent, name)
            if type(lin) is nnx.Linear and lin.kernel[...].dtype == jnp.float32:
                kernel_t = _derived("kernel.T", lin.kernel[...], _transpose)
                setattr(parent, name, RowLinear(kernel_t, None if lin.bias is None else lin.bias[...], lin.dtype))
    head = getattr(twin, "lm_head", None)  # an untied head: a RowLinear too (zero bias)
    if type(head) is nnx.Linear and head.kernel[...].dtype == jnp.float32:
        kernel_t = _derived("kernel.T", head.kernel[...], _transpose)  # [V, C]
        twin.lm_head = RowLinear(kernel_t, jnp.zeros(kernel_t.shape[0], jnp.float32), head.dtype)
    return twin


_transpose = jax.jit(lambda w: w.T)


def head_table(model) -> jax.Array | None:
    """The float [V, C] table of the decode copy's head (logits = table @ x): the tied embedding
    wte, or the untied lm_head's transposed kernel; None for an int8 (or LoRA) head."""
    if model.config.tie_word_embeddings:
        return model.wte.embedding[...] if type(model.wte) is nnx.Embed else None
    return model.lm_head.kernel[...] if type(model.lm_head) is RowLinear else None


class GreedyScreen(NamedTuple):
    """An int8 copy of a [V, C] head table w with per-row bounds on its error.

    q [V, C] int8 and scale [V]: w[v] ~ q[v] * scale[v] (jaxgpt.model.quant.quantize_rows); err [V] is
    ||w[v] - q[v] * scale[v]||_2 exactly and norm [V] is ||w[v]||_2, so for any x
    |x . w[v] - (x . q[v]) * scale[v]| <= ||x||_2 * err[v]  (Cauchy-Schwarz).
    """

    q: jax.Array
    scale: jax.Array
    err: jax.Array
    norm: jax.Array


@jax.jit
def greedy_screen(table: jax.Array) -> GreedyScreen:
    """The GreedyScreen of a float head table [V, C]."""
    table = table.astype(jnp.float32)
    q, scale = quantize_rows(table)
    err = jnp.linalg.norm(table - dequantize_rows(q, scale), axis=1)  # [V]
    return GreedyScreen(q, scale, err, jnp.linalg.norm(table, axis=1))


def screened_argmax(x: jax.Array, table: jax.Array, screen: GreedyScreen,
                    k: int = SCREEN_K, mask=None, bias=None) -> jax.Array:
    """argmax over v of x . table[v] for final hidden rows x [B, C], reading mostly int8.

    approx[v] = (x . q[v]) * scale[v] is within b[v] = ||x|| * err[v] (plus a float32 rounding
    margin) of the exact logit, so the maximum is among the candidates whose upper bound
    approx + b reaches the largest lower bound max(approx - b). Those (at most k, in index order)
    are recomputed in float32 from `table` and the best one wins; with more than k candidates the
    full float32 head decides. The result is the argmax of float32 logits, as `sample_token` at
    temperature 0 would pick from the full head, up to float32 rounding (a tie closer than
    ~1e-6 relative may resolve either way, as it may between any two matmul orders).
    With `mask` / `bias` (adjust_logits) the argmax is that of the adjusted logits: the bias
    shifts each approximation and its exact value alike, forbidden ids are never candidates.
    """
    x = fence(x.astype(jnp.float32))  # ln_f runs once, not inside the screen's product (quant.fence)
    x, q = jax.lax.optimization_barrier((x, screen.q))  # keep the int8 -> f32 convert in the loop
    with jax.named_scope("product"):
        approx = (x @ q.astype(jnp.float32).T) * screen.scale  # [B, V], reads the int8 rows
    xnorm = jnp.linalg.norm(x, axis=-1, keepdims=True)  # [B, 1]
    # error bound: quantization (Cauchy-Schwarz) + float32 accumulation of the C-term dot, at most
    # ~C * 2^-24 relative to sum |x_i w_i| <= ||x|| ||w|| (doubled for the scale and the norms)
    rounding = 2.0 * x.shape[-1] * 2.0 ** -24
    bound = xnorm * (screen.err * 1.001 + rounding * screen.norm)  # [B, V]
    if bias is not None:
        approx = approx + bias
    if mask is not None:
        approx = jnp.where(allowed_ids(mask, approx.shape[-1]), approx, NEG_INF)
    floor = jnp.max(approx - bound, axis=-1, keepdims=True)  # [B, 1] the best lower bound
    cand = approx + bound >= floor  # [B, V] rows that may hold the maximum

    def recompute():
        idx = jax.vmap(lambda c: jnp.nonzero(c, size=k, fill_value=0)[0])(cand)  # [B, k]
        real = jnp.take_along_axis(cand, idx, axis=1)  # [B, k] False on the fill slots
        logits = jnp.einsum("bkc,bc->bk", table[idx].astype(jnp.float32), x)  # [B, k]
        if bias is not None:
            logits = logits + jnp.take_along_axis(bias, idx, axis=1)
        best = jnp.argmax(jnp.where(real, logits, NEG_INF), axis=-1)  # [B]
        return jnp.take_along_axis(idx, best[:, None], axis=1)[:, 0]

    def full():
        logits = jnp.dot(table.astype(jnp.float32), x.T).T
        return jnp.argmax(adjust_logits(logits, mask, bias), axis=-1)  # [B]

    many = jnp.max(jnp.sum(cand, axis=-1)) > k
    return jax.lax.cond(many, full, recompute).astype(jnp.int32)


def decode_model(model, fast_decode: bool | None, screen_rows: bool):
    """(the model to decode with, its GreedyScreen or None). `fast_decode` (default: on a CPU)
    selects the decode copy; `screen_rows` says greedy rows may use the int8 screen (one row at a
    time: batched, the int8 product is slower than the float head)."""
    if fast_decode is None:
        fast_decode = jax.default_backend() == "cpu"
    if not fast_decode:
        return model, None
    model = decode_copy(model)
    table = head_table(model)
    if (screen_rows and table is not None and table.dtype == jnp.float32
            and jnp.dtype(model.config.dtype) == jnp.float32):
        return model, _derived("screen", table, greedy_screen)
    return model, None


# ---- the model steps: what every decoder runs ---------------------------------------------------
def bucket(n: int, cap: int | None = None, lo: int = 16) -> int:
    """The smallest power of two >= max(n, lo), capped at `cap`: the padded lengths that decoding
    compiles for, so prompts of 17..32 tokens (say) share one compiled function."""
    b = max(lo, 1 << (max(int(n), 1) - 1).bit_length())
    return b if cap is None else min(b, cap)


def doublings(start: int, top: int) -> list[int]:
    """start, 2 start, 4 start, ... capped at and ending with top: the lengths a buffer that
    doubles when full takes (a KV cache, generate's no-cache windows)."""
    out = [min(start, top)]
    while out[-1] < top:
        out.append(min(2 * out[-1], top))
    return out


def _pad_positions(buf: jax.Array, max_len: int) -> jax.Array:
    """A cache buffer [R, S, D] copied to the front of a zero buffer [R, max_len, D]."""
    return jnp.pad(buf, ((0, 0), (0, max_len - buf.shape[1]), (0, 0)))


def grow_cache(cache, max_len: int):
    """`cache` with room for `max_len` positions (positions past the old length are zeros, and
    empty: nothing attends to them before a token is written there)."""
    if max_len <= cache["k"][0].shape[1]:
        return cache
    grow = lambda bufs: [_pad_positions(c, max_len) for c in bufs]
    return {**cache, "k": grow(cache["k"]), "v": grow(cache["v"])}


def prefill(model, ids: jax.Array, n, max_len: int | None = None):
    """Run prompts ids [B, Tb] (padded on the right; the first n tokens real: n a traced scalar,
    or [B], a length per row) into a new KV cache: (hidden state x [B, C] at each row's position
    n - 1, a cache of max(max_len, Tb) positions with index n). The padding's keys/values land at
    positions >= n, which the causal mask hides and decoding overwrites.

    The prompt attends over a cache of exactly Tb positions (T x T scores, as a full forward),
    which then grows to max_len: attending over all of a larger cache (its masked rest
    included) made a 512-token prefill into a 1024-position cache ~15% slower at 124M
    (experiments/PERF.md "A KV cache that grows")."""
    B, Tb = ids.shape
    cache = init_cache(model.config, B, Tb)
    if jnp.ndim(n) == 0:
        x, cache = model(ids, cache=cache, logits_at=n - 1, hidden=True)  # the head's input only
    else:
        n = jnp.asarray(n, jnp.int32)
        h, cache = model(ids, cache=cache, hidden=True)  # [B*Tb, C]
        x = h.reshape(B, Tb, -1)[jnp.arange(B), n - 1]  # [B, C]
    return x, grow_cache({**cache, "index": jnp.asarray(n, jnp.int32)}, max_len or Tb)


def decode_step(model, tok: jax.Array, cache):
    """One token per row, tok [B, 1] at position cache["index"] (a scalar, or [B]: a position
    per row): (x [B, C], the advanced cache)."""
    return model(tok, cache=cache, logits_at=0, hidden=True)


def adjust_logits(logits: jax.Array, mask: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """logits [B, V] (float32) + bias [B, V] (logit_bias, presence / frequency penalties), then
    the tokens a grammar forbids set to -inf: mask int32 [B, ceil(V / 32)] holds one bit per id
    (bit i % 32 of word i // 32: xgrammar's token bitmask layout; all ones = no constraint).
    Every sampler (greedy, temperature, top-k, top-p) then picks among what is left."""
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(allowed_ids(mask, logits.shape[-1]), logits, NEG_INF)
    return logits


def allowed_ids(mask: jax.Array, V: int) -> jax.Array:
    """bool [B, V] from a token bitmask int32 [B, ceil(V / 32)] (bit i % 32 of word i // 32)."""
    bits = jnp.right_shift(mask[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return bits.reshape(mask.shape[0], -1)[:, :V] != 0


@jax.named_scope("sampling")  # (the parts of experiments/decode_profile.py)
def next_tokens(model, x: jax.Array, keys: jax.Array, temperature, top_k=None, top_p=None,
                screen: GreedyScreen | None = None, mask=None, bias=None) -> jax.Array:
    """Token ids [B] from final hidden states x [B, C] (settings as in `sample_rows`; keys [B]
    are the rows' keys for this position). With a `screen`, greedy rows pick through
    screened_argmax (the same ids as the full head, reading mostly int8); with per-row settings
    that happens when every row is greedy, otherwise the full head decides. `mask` / `bias`
    (adjust_logits) change the logits before any sampler; with either the full head decides
    (a separate compiled program: calls without them are unchanged); greedy rows keep the screen."""
    full = lambda: sample_rows(adjust_logits(model.head(x, rows=True), mask, bias)
                               if mask is not None or bias is not None else model.head(x, rows=True),
                               keys, temperature, top_k, top_p)
    if screen is None:
        return full()
    screened = lambda: screened_argmax(x, head_table(model), screen, mask=mask, bias=bias)
    if isinstance(temperature, (int, float)):
        return screened() if temperature == 0.0 else full()
    return jax.lax.cond(jnp.all(jnp.asarray(temperature) == 0.0), screened, full)


TOP_LOGPROBS = 20  # alternatives the Engine can report per token (OpenAI's top_logprobs limit)


def token_logprobs(model, x: jax.Array, tok: jax.Array, want: jax.Array):
    """(logprob of tok [B], the TOP_LOGPROBS most likely ids [B, K] and their logprobs [B, K])
    under the model's own distribution (log-softmax of the float32 logits, before temperature and
    filters), for final hidden states x [B, C]; computed only when some row `want`s them (zeros
    otherwise: the head is not run a second time)."""
    B, K = x.shape[0], TOP_LOGPROBS

    def compute():
        logp = jax.nn.log_softmax(model.head(x, rows=True), axis=-1)  # [B, V]
        top_lp, top_id = jax.lax.top_k(logp, K)
        return jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0], top_id.astype(jnp.int32), top_lp

    none = lambda: (jnp.zeros(B, jnp.float32), jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32))
    return jax.lax.cond(jnp.any(want), compute, none)


# ---- Engine: slots of a KV cache that requests enter and leave ----------------------------------
@dataclass(eq=False)
class Request:
    """One sequence for the Engine: a prompt, its own sampling settings, what ends it.

    `seed` is an int or a jax PRNG key: the row's random stream, whatever slot it runs in.
    Decoding stops after a token in `stop` (which is emitted, as the last token), after
    `max_new_tokens`, or when the sequence fills the engine's cache. `on_token(token)` is called
    for each emitted token as soon as it exists. The engine fills in `tokens` (the emitted ids),
    `slot`, and `finish_reason` ("stop", "length" or "released") when it ends.

    `logprobs` (None: off; k in 0..TOP_LOGPROBS) asks for each token's logprob and the k most
    likely alternatives, appended to `token_logprobs` as (logprob, [(id, logprob)] * k) before
    `on_token` is called (see token_logprobs). `adapter` picks the engine's LoRA adapter for
    this row (0: the base model; k: the engine's adapters[k - 1]).

    A failure that is this request's own (its prefill, its `on_token` callback) ends it alone:
    finish_reason "error", the exception in `error`; the other rows go on.
    `grammar` (a jaxgpt.decode.grammar.Grammar: JSON Schema, JSON, regex, a choice list) constrains
    every token to those that keep the output a prefix of a sentence of the grammar; the row
    ends ("stop") when the grammar is complete and the model picks a stop token, or when the
    grammar admits nothing more. `logit_bias` {id: bias} is added to the row's logits (OpenAI's
    -100..100), and each id already generated k times loses k * frequency_penalty +
    presence_penalty (OpenAI's definition; the prompt does not count). These change the logits
    before every sampler (greedy included); rows without them are decoded as before.
    """

    prompt: Sequence[int]
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | jax.Array = 0
    stop: Sequence[int] = ()
    on_token: Callable[[int], None] | None = None
    logprobs: int | None = None
    adapter: int = 0
    grammar: object | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None
    error: BaseException | None = None  # what ended it, with finish_reason "error"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


ENGINE_MIN_CACHE = 16  # the Engine's shortest cache (it doubles from there up to max_len)


def _slot_cache(config, slots: int, max_len: int, place):
    """The Engine's cache: the model's KV cache for `slots` rows (slot s = rows s*H .. s*H+H-1
    of each [N*H, S, D] buffer) with a position per row, index int32 [N]. Put on `place` (the
    weights' device), committed like every cache the jitted calls return: jit compiles apart
    for uncommitted arguments, which warmup would then not have covered (a served request
    compiled the step and the insertion again). Zeros made on the host: nothing compiles, so a
    cache of a length warm-up never built is not an XLA compile in the middle of serving."""
    shapes = jax.eval_shape(lambda: {**init_cache(config, slots, max_len),
                                     "index": jnp.zeros((slots,), jnp.int32)})
    return jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), place)


@partial(jax.jit, static_argnames="graphdef")
def _engine_prefill(graphdef, state, ids, lens, key_data, temperature, top_k, top_p, want_lp,
                    adapter, screen, mask=None, bias=None):
    """Prefill G prompts ids [G, Tb] (real lengths lens [G]) and pick their first tokens:
    ((ids [G], token_logprobs), their cache of Tb positions, index lens). adapter [G]: each
    row's LoRA adapter (0: none). Compiled per (G, Tb) only: _engine_insert puts the rows in."""
    model = nnx.merge(graphdef, state)
    lora.set_adapter_rows(model, jnp.repeat(adapter, ids.shape[1]))  # one id per row of [G*Tb, C]
    x, new = prefill(model, ids, lens)  # x [G, C]
    keys = position_keys(jax.random.wrap_key_data(key_data), lens)  # the first new token is at n
    tok = next_tokens(model, x, keys, temperature, top_k, top_p, screen, mask, bias)
    return (tok, token_logprobs(model, x, tok, want_lp)), new


@partial(jax.jit, donate_argnames="cache")
def _engine_insert(cache, new, slots):
    """The engine's cache with prefilled rows `new` (G rows of Tb positions, zero-padded to the
    cache's length) in slots `slots` [G] (an index past the last slot drops the row: padding)."""
    G, S = slots.shape[0], cache["k"][0].shape[1]
    H = new["k"][0].shape[0] // G
    rows = (slots[:, None] * H + jnp.arange(H)[None, :]).reshape(-1)  # [G*H] cache rows
    put = lambda c, r: c.at[rows].set(_pad_positions(r, S), mode="drop")
    return {"k": list(map(put, cache["k"], new["k"])), "v": list(map(put, cache["v"], new["v"])),
            "index": cache["index"].at[slots].set(new["index"], mode="drop")}


_grow_slots = jax.jit(grow_cache, static_argnames="max_len")


@partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _engine_step(graphdef, state, cache, tokens, active, key_data, temperature, top_k, top_p,
                 want_lp, adapter, screen, mask=None, bias=None):
    """Every slot's last token tokens [N] -> (its next token [N], token_logprobs) and the cache;
    rows not `active` keep their position (what they compute is ignored). mask / bias: see
    adjust_logits (None: compiled without them)."""
    model = nnx.merge(graphdef, state)
    lora.set_adapter_rows(model, adapter)
    index = cache["index"]  # [N], one position per slot
    x, new = decode_step(model, tokens[:, None], cache)  # x [N, C]
    new = {**new, "index": jnp.where(active, new["index"], index)}
    keys = position_keys(jax.random.wrap_key_data(key_data), index + 1)
    tok = next_tokens(model, x, keys, temperature, top_k, top_p, screen, mask, bias)
    return (tok, token_logprobs(model, x, tok, want_lp)), new


class Engine:
    """Decode many requests at once over one model: `slots` rows of a KV cache of `max_len`
    positions (default: the context), one jitted step for all of them.

        engine = Engine(model, slots=8)
        slot = engine.add(Request(prompt_ids, 64, temperature=0.8, seed=1, on_token=print))
        while engine.busy:
            for slot, token in engine.step(): ...

    `add` takes a free slot (the request is prefilled at the next `step`, together with any
    others added meanwhile, in one batched call); `step` gives every active row one token and
    returns [(slot, token)]; a row that finishes frees its slot at once, `release(slot)` ends one
    early. Rows start and finish at different steps; each has its own position, settings and
    random stream. A cache of BLOCKWISE_FROM positions or more has its whole length from the
    start and is attended only as far as its rows are filled (`capacities` is [max_len]); a
    shorter one, or any with `grow=True`, grows with the longest live row (powers of two from
    ENGINE_MIN_CACHE up to `max_len`; see _fit_cache). Shapes are fixed by `slots`, those
    capacities and power-of-two buckets of the prompt length and of the number of prompts
    prefilled together (`shapes`), so after `warmup()` (or once every bucket has been seen)
    nothing recompiles; `warmup_in_background` compiles them while the engine serves.

    On a CPU the engine decodes through the model's decode copy (`fast_decode`), and with one
    slot greedy rows use the exact int8 head screen. `adapters` (jaxgpt.model.lora.adapter_weights
    results) are LoRA adapters a request may pick (Request.adapter): rows of one batch may use
    different ones (jaxgpt.model.lora.MultiLoRALinear: the base matmul once, each row's update added).
    The weights are those of `model` when the engine is made.
    """

    def __init__(self, model, slots: int = 1, *, max_len: int | None = None,
                 fast_decode: bool | None = None, adapters: Sequence[dict] = (), grow: bool = False):
        if slots < 1:
            raise ConfigError(f"an engine needs at least one slot, got {slots}")
        self.config = model.config
        self.slots = int(slots)
        self.max_len = min(int(max_len or self.config.block_size), self.config.block_size)
        self.grow = grow
        model, self.screen = decode_model(model, fast_decode, screen_rows=self.slots == 1)
        self.n_adapters = len(adapters)
        if adapters:  # (on a twin: the caller's model is left as it is)
            model = nnx.merge(*nnx.split(model))
            lora.attach_adapters(model, list(adapters))
        self.graphdef, self.state = nnx.split(model)
        self._place = min(jax.tree.leaves(self.state)[0].devices(), key=lambda d: d.id)  # caches' device
        self.cache = self._empty(self.capacities[0])
        N = self.slots
        self.requests: list[Request | None] = [None] * N
        self._pending: list[int] = []  # slots added, not yet prefilled
        self._tokens = np.zeros(N, np.int32)  # each slot's last token
        self._key_data = np.zeros((N, *jax.random.key_data(jax.random.key(0)).shape), np.uint32)
        self._temperature = np.zeros(N, np.float32)
        self._top_k = np.zeros(N, np.int32)
        self._top_p = np.ones(N, np.float32)
        self._want_lp = np.zeros(N, bool)
        self._adapter = np.zeros(N, np.int32)
        # logit adjustments (adjust_logits), made when a row first needs them: a grammar's
        # token bitmask per slot (all ones: free), an additive bias per slot
        self._matchers: list = [None] * N
        self._mask: np.ndarray | None = None  # int32 [N, ceil(V / 32)]
        self._bias: np.ndarray | None = None  # float32 [N, V]
        self._biased = np.zeros(N, bool)
        self._seen: list[set | None] = [None] * N  # tokens a penalised row has generated
        self.compiled: set[tuple] = set()  # the shapes' keys compiled so far (see `shapes`)
        self._background: deque | None = None  # keys still to compile in the background

    # -- the cache's length --
    def _empty(self, max_len: int, rows: int | None = None):
        """An empty slot cache of max_len positions (for all slots, or `rows` rows)."""
        return _slot_cache(self.config, rows or self.slots, max_len, self._place)

    @property
    def capacities(self) -> list[int]:
        """The cache lengths the engine runs at: powers of two from ENGINE_MIN_CACHE, and max_len;
        from BLOCKWISE_FROM positions on, max_len only: such a cache is attended in blocks as far
        as its rows are filled (jaxgpt.model.gpt.attend_blocks), so one length serves every row and
        one compiled step every request (experiments/bench_serve_start.py)."""
        if self.max_len >= BLOCKWISE_FROM and not self.grow:
            return [self.max_len]
        return doublings(ENGINE_MIN_CACHE, self.max_len)

    def _fit_cache(self, running: list[int], prompt_len: int) -> None:
        """Give the cache the shortest capacity that holds every position the coming step writes:
        each running row's next one and `prompt_len` (the pending prompts' padded length).
        It grows (the rows copied) when a row outgrows it, and starts again small when no row
        is running: each step attends over at most ~2x the longest live row, not max_len."""
        need = max([len(self.requests[s].prompt) + len(self.requests[s].tokens) for s in running]
                   + [prompt_len])
        fit = next(c for c in self.capacities if c >= need)
        S = self.cache["k"][0].shape[1]
        if not running and fit != S:
            self.cache = self._empty(fit)
        elif fit > S:
            self.cache = _grow_slots(self.cache, fit)

    # -- the slots --
    @property
    def free_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is None]

    @property
    def busy(self) -> bool:
        """Whether any request is still decoding."""
        return any(r is not None for r in self.requests)

    def add(self, request: Request) -> int:
        """Put `request` in a free slot (RuntimeError if there is none) and return the slot. It is
        prefilled at the next `step`. ConfigError for bad settings or a prompt that does not
        leave room for a new token in the cache. A request for 0 new tokens ends at once."""
        r = request
        check_sampling(r.temperature, r.top_k, r.top_p, r.max_new_tokens)
        if not 0 <= r.adapter <= self.n_adapters:
            raise ConfigError(f"adapter {r.adapter} does not exist: this engine has {self.n_adapters}")
        if r.logprobs is not None and not 0 <= r.logprobs <= TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in 0..{TOP_LOGPROBS}, got {r.logprobs}")
        free = self.free_slots
        if not free:
            raise RuntimeError(f"all {self.slots} slots are busy; release one or wait for step()")
        slot = free[0]
        r.slot, r.tokens, r.token_logprobs, r.finish_reason, r.error = slot, [], [], None, None
        if r.max_new_tokens == 0:
            r.finish_reason = "length"
            return slot
        n = len(r.prompt)
        if not 0 < n < self.max_len:
            raise ConfigError(f"the prompt has {n} tokens; it must have 1 to {self.max_len - 1} "
                              f"(the engine's cache holds {self.max_len} positions)")
        settings = self._row_settings(r)  # (checked before the slot is taken)
        self.requests[slot] = r
        self._pending.append(slot)
        (self._key_data[slot], self._temperature[slot], self._top_k[slot], self._top_p[slot],
         self._adapter[slot]) = settings
        self._want_lp[slot] = r.logprobs is not None
        self._set_adjustments(slot, r)
        return slot

    def _row_settings(self, r: Request) -> tuple:
        """A request's row of the settings arrays, as their dtypes hold it; ConfigError for a
        value they cannot hold (a top_k past int32, a temperature past float32)."""
        try:
            key = r.seed if isinstance(r.seed, jax.Array) else jax.random.key(int(r.seed))
            if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
                key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
            with np.errstate(over="raise"):
                out = (np.asarray(jax.random.key_data(key)), np.float32(r.temperature),
                       np.int32(r.top_k or 0), np.float32(1.0 if r.top_p is None else r.top_p),
                       np.int32(r.adapter))
        except (OverflowError, FloatingPointError, TypeError, ValueError) as e:
            raise ConfigError(f"a request setting is out of the engine's range: {e}") from None
        if not np.isfinite(out[1]):
            raise ConfigError(f"temperature {r.temperature} is out of the engine's float32 range")
        return out

    def _set_adjustments(self, slot: int, r: Request) -> None:
        """The row's grammar matcher and logit bias (jaxgpt.grammar; adjust_logits)."""
        V = self.config.vocab_size
        if r.grammar is not None:
            if self._mask is None:
                self._mask = np.full((self.slots, -(-V // 32)), -1, np.int32)
            self._matchers[slot] = r.grammar.matcher(list(r.stop))
        if r.logit_bias or r.presence_penalty or r.frequency_penalty:
            if self._bias is None:
                self._bias = np.zeros((self.slots, V), np.float32)
            for t, b in (r.logit_bias or {}).items():
                if 0 <= int(t) < V:
                    self._bias[slot, int(t)] = b
            self._biased[slot] = True
            self._seen[slot] = set()

    def _clear_adjustments(self, slot: int) -> None:
        if self._matchers[slot] is not None:
            self._matchers[slot] = None
            self._mask[slot] = -1
        if self._biased[slot]:
            self._biased[slot] = False
            self._bias[slot] = 0.0
            self._seen[slot] = None

    def _adjustments(self, slots, rows) -> tuple:
        """(mask, bias) rows `rows` (an index array or slice) of the next call, which picks
        tokens for `slots`: their grammars' bitmasks filled now; each None when none of `slots`
        needs it (the call then compiles and runs without it)."""
        slots = [int(s) for s in dict.fromkeys(np.asarray(slots).tolist())]
        mask = bias = None
        with_grammar = [s for s in slots if self._matchers[s] is not None]
        if with_grammar:
            for s in with_grammar:
                self._matchers[s].fill(self._mask, s)
            mask = self._mask[rows]
        if self._biased[slots].any():
            bias = self._bias[rows]
        return mask, bias

    def release(self, slot: int, reason: str = "released") -> None:
        """Free `slot` now (its request, if any, ends with finish_reason `reason`)."""
        r = self.requests[slot]
        if r is not None and r.finish_reason is None:
            r.finish_reason = reason
        self.requests[slot] = None
        # a free slot's row is computed and ignored: make it the cheapest (greedy, no filters), so
        # it does not keep the batch on the sampling / sorting / logprobs paths
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0
        self._want_lp[slot] = False
        self._clear_adjustments(slot)
        if slot in self._pending:
            self._pending.remove(slot)

    # -- decoding --
    def _settings(self, rows):
        return (self._key_data[rows], self._temperature[rows], self._top_k[rows], self._top_p[rows],
                self._want_lp[rows], self._adapter[rows])

    def _fail(self, slot: int, e: BaseException) -> None:
        """End the request in `slot` alone: finish_reason "error", `e` kept in its `error`."""
        r = self.requests[slot]
        if r is not None:
            r.error = e
            self.release(slot, "error")

    def _emit_row(self, slot: int, token: int, events: list, lp=None, i: int = 0) -> None:
        """_emit, a failure of this row (its callback, its logprobs) ending this row alone."""
        try:
            self._emit(slot, token, events, lp, i)
        except Exception as e:
            self._fail(slot, e)

    def _emit(self, slot: int, token: int, events: list, lp=None, i: int = 0) -> None:
        r = self.requests[slot]
        r.tokens.append(token)
        matcher = self._matchers[slot]
        if matcher is not None and not matcher.accept(token):
            raise RuntimeError(f"the grammar rejected token {token} that its own mask allowed")
        if self._biased[slot] and (r.presence_penalty or r.frequency_penalty):
            self._bias[slot, token] -= r.frequency_penalty + (
                r.presence_penalty if token not in self._seen[slot] else 0.0)
            self._seen[slot].add(token)
        if r.logprobs is not None:  # lp: the step's token_logprobs, this row at index i
            top = zip(lp[1][i, :r.logprobs].tolist(), lp[2][i, :r.logprobs].tolist())
            r.token_logprobs.append((float(lp[0][i]), list(top)))
        self._tokens[slot] = token
        events.append((slot, token))
        if r.on_token is not None:
            r.on_token(token)
        limit = min(r.max_new_tokens, self.max_len - len(r.prompt))
        if self.requests[slot] is not r:  # (on_token released it)
            return
        if token in r.stop or (matcher is not None and matcher.done):
            self.release(slot, "stop")
        elif len(r.tokens) >= limit:
            self.release(slot, "length")

    def _prompt_bucket(self, slots: list[int]) -> int:
        return bucket(max([len(self.requests[s].prompt) for s in slots], default=1), cap=self.max_len)

    def _ready(self, G: int, Tb: int, S: int) -> bool:
        return ("prefill", G, Tb) in self.compiled and ("insert", S, G, Tb) in self.compiled

    def _prefill_shape(self, slots: list[int], S: int) -> tuple[int, int, int]:
        """(how many of the pending `slots` to prefill now, G, Tb): all of them at their own
        buckets when that program is compiled; else, while shapes still compile in the
        background, the most of them a compiled program takes (a prompt padded up to 4x
        further), the rest at a later step; (0, ..) when none fits (its program is wanted now)."""
        Tb = self._prompt_bucket(slots)
        G = bucket(len(slots), cap=self.slots, lo=1)
        if not self._background or self._ready(G, Tb, S):
            return len(slots), G, Tb
        for t in (t for t in self.prompt_lengths if Tb <= t <= 4 * Tb and t <= S):
            for g in sorted({bucket(i, cap=self.slots, lo=1) for i in range(1, len(slots) + 1)}, reverse=True):
                if self._ready(g, t, S):
                    return min(g, len(slots)), g, t
        for key in (("prefill", 1, Tb), ("insert", S, 1, Tb)):  # the least that serves: next
            self._want(key, urgent=True)
        return 0, G, Tb

    def _prefill(self, slots: list[int], G: int, Tb: int) -> tuple:
        """Run _engine_prefill for `slots` (pending) as G prompts of Tb, into the cache."""
        prompts = [self.requests[s].prompt for s in slots]
        ids = np.zeros((G, Tb), np.int32)
        lens = np.ones(G, np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
            lens[i] = len(p)
        rows = np.array(slots + [self.slots] * (G - len(slots)), np.int32)  # self.slots: dropped
        settings = self._settings(np.minimum(rows, self.slots - 1))
        out, new = _engine_prefill(self.graphdef, self.state, ids, lens, *settings, self.screen,
                                   *self._adjustments(slots, np.minimum(rows, self.slots - 1)))
        # (committed like the cache, whether or not the weights are: one compiled insertion)
        self.cache = _engine_insert(self.cache, jax.device_put(new, self._place), rows)
        self.compiled |= {("prefill", G, Tb), ("insert", self.cache["k"][0].shape[1], G, Tb)}
        return out

    def step(self) -> list[tuple[int, int]]:
        """One token for every active row: prefill the requests added since the last step (their
        first token), advance the others by one. Returns [(slot, token)] in slot order per phase;
        calls each request's on_token; frees the slots of rows that finished."""
        if self.cache["index"].is_deleted():  # a call was interrupted after taking the cache
            self.cache = self._empty(self.capacities[0])
            for s in range(self.slots):  # (the rows it held are lost)
                self.release(s)
        events: list[tuple[int, int]] = []
        running = [s for s, r in enumerate(self.requests) if r is not None and s not in self._pending]
        self._fit_cache(running, self._prompt_bucket(self._pending))  # (none pending: the smallest)
        n, G, Tb = self._prefill_shape(self._pending, self.cache["k"][0].shape[1]) if self._pending else (0, 0, 0)
        if self._pending and not n and not running:  # nothing else to do: compile it here
            n, G, Tb = len(self._pending), bucket(len(self._pending), cap=self.slots, lo=1), \
                self._prompt_bucket(self._pending)
        if n:
            slots, self._pending = self._pending[:n], self._pending[n:]
            self._prefill_rows(slots, events, G, Tb)
        if running:
            active = np.zeros(self.slots, bool)
            active[running] = True
            (tok, lp), self.cache = _engine_step(self.graphdef, self.state, self.cache, self._tokens,
                                                 active, *self._settings(slice(None)), self.screen,
                                                 *self._adjustments(running, slice(None)))
            tok, lp = np.asarray(tok), _host(lp, self._want_lp)
            for s in running:
                if self.requests[s] is not None:  # (an on_token callback may have released it)
                    self._emit_row(s, int(tok[s]), events, lp, s)
        return events

    def _prefill_rows(self, slots: list[int], events: list, G: int, Tb: int) -> None:
        """Prefill `slots` together (as G prompts of Tb) and emit their first tokens. If that fails, each is tried
        alone (one compiled shape: groups of 1 are warmed up), so the request whose prefill
        fails ends with its error and the others start as usual. (Cache untouched on failure:
        _engine_prefill runs before the insertion.)"""
        try:
            tok, lp = self._prefill(slots, G, Tb)
            tok, lp = np.asarray(tok), _host(lp, self._want_lp[slots])
        except Exception as e:
            if self.cache["index"].is_deleted():  # (failed inside the insertion: not one row's)
                raise
            if len(slots) == 1:
                self._fail(slots[0], e)
            else:
                for s in slots:
                    self._prefill_rows([s], events, 1, self._prompt_bucket([s]))
            return
        for i, s in enumerate(slots):
            if self.requests[s] is not None:
                self._emit_row(s, int(tok[i]), events, lp, i)

    def run(self) -> None:
        """Step until every request has finished."""
        while self.busy:
            self.step()

    # -- compiling ahead --
    @property
    def prompt_lengths(self) -> list[int]:
        """The padded prompt lengths prefills compile for (bucket: powers of two from 16, max_len)."""
        return doublings(ENGINE_MIN_CACHE, self.max_len)

    def shapes(self, max_prompt: int | None = None, first: int | None = None) -> list[tuple]:
        """The compiled programs this engine can meet, as keys ("step", S), ("grow", S, S2),
        ("prefill", G, Tb), ("insert", S, G, Tb) (G prompts padded to Tb, a cache of S), in the
        order worth having them: every step and growth, then one prompt at a time from the
        `first` padded length up and down, then G prompts at once. `max_prompt`: prompts up to
        that many tokens only."""
        top = bucket(max_prompt, cap=self.max_len) if max_prompt else self.max_len
        lengths = [t for t in self.prompt_lengths if t <= top] or [self.prompt_lengths[0]]
        start = bucket(first or 1, cap=self.max_len)
        lengths = [t for t in lengths if t >= start] + [t for t in lengths if t < start][::-1]
        caps = self.capacities
        out = [("step", S) for S in caps] + [("grow", a, b) for a in caps for b in caps if b > a]
        for G in sorted({bucket(g, cap=self.slots, lo=1) for g in range(1, self.slots + 1)}):
            for Tb in lengths:
                out += [("prefill", G, Tb)] + [("insert", S, G, Tb) for S in caps if S >= Tb]
        return out

    def compile(self, key: tuple) -> None:
        """Compile the program of `key` (see `shapes`) ahead of time, from shapes only: nothing
        runs, no slot or cache is touched (safe beside a running engine, from another thread)."""
        if key in self.compiled:
            return
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(self._place))
        cache = lambda S, rows=None: jax.tree.map(spec, jax.eval_shape(
            lambda: {**init_cache(self.config, rows or self.slots, S),
                     "index": jnp.zeros((rows or self.slots,), jnp.int32)}))
        kind, *shape = key
        if kind == "step":
            _engine_step.lower(self.graphdef, self.state, cache(shape[0]), self._tokens,
                               np.zeros(self.slots, bool), *self._settings(slice(None)), self.screen,
                               None, None).compile()  # (no grammar mask, no bias: as step() calls it)
        elif kind == "grow":
            _grow_slots.lower(cache(shape[0]), shape[1]).compile()
        elif kind == "prefill":
            G, Tb = shape
            _engine_prefill.lower(self.graphdef, self.state, np.zeros((G, Tb), np.int32), np.ones(G, np.int32),
                                  *self._settings(np.zeros(G, np.int32)), self.screen, None, None).compile()
        else:
            S, G, Tb = shape
            _engine_insert.lower(cache(S), cache(Tb, G), np.zeros(G, np.int32)).compile()
        self.compiled.add(key)

    def warmup(self, max_prompt: int | None = None, shapes: Sequence[tuple] | None = None) -> None:
        """Compile every shape this engine can meet (`shapes`: those keys only; `max_prompt`:
        prompts up to that many tokens only, longer ones compile on first use). Touches no slot."""
        for key in self.shapes(max_prompt) if shapes is None else shapes:
            self.compile(key)

    def warmup_in_background(self, shapes: Sequence[tuple], log=None) -> threading.Thread:
        """Compile `shapes` in a thread while the engine serves. Meanwhile a prefill whose program
        is not ready yet uses a compiled one that fits (more padding, fewer prompts per call) or
        waits for its own, which then compiles next (the step never waits: its programs are
        compiled before). `log(done, total, seconds)` after each."""
        self._background = deque(k for k in shapes if k not in self.compiled)
        total, t0 = len(self._background), time.perf_counter()

        def work():
            done = 0
            try:
                while self._background:
                    try:
                        key = self._background.popleft()
                    except IndexError:
                        break
                    self.compile(key)
                    done += 1
                    if log is not None:
                        log(done, total, time.perf_counter() - t0)
            finally:  # (whatever happened: from now on every shape compiles where it is needed)
                self._background = None

        thread = threading.Thread(target=work, name="jaxgpt-compile", daemon=True)
        thread.start()
        self._warm_thread = thread
        return thread

    def stop_background(self, timeout: float | None = None) -> None:
        """Drop the shapes not compiled yet and wait for the one compiling (a process must not
        exit while XLA compiles in a thread: it aborts)."""
        queue = self._background
        if queue is not None:
            queue.clear()
        thread = getattr(self, "_warm_thread", None)
        if thread is not None:
            thread.join(timeout)

    def _want(self, key: tuple, urgent: bool = False) -> None:
        """Put `key` first in the background compilation queue."""
        if self._background is not None and key not in self.compiled:
            try:
                self._background.remove(key)
            except ValueError:
                pass
            self._background.appendleft(key)


def _host(lp, want) -> tuple | None:
    """A step's token_logprobs as numpy arrays, or None when no row asked for them."""
    return tuple(np.asarray(a) for a in lp) if np.any(want) else None


# ---- generate: offline batched decoding as one fused loop ---------------------------------------
@partial(jax.jit, static_argnames=("graphdef", "prefill_len", "temperature", "top_k", "top_p",
                                   "eot", "use_cache"))
def _generate(graphdef, params, buf, prompt_len, total, key, screen, *, prefill_len, temperature,
              top_k, top_p, eot, use_cache):
    """buf: int32 [B, S], the prompt in buf[:, :prompt_len] (the rest is padding); fills
    buf[:, prompt_len:total]. Only shapes (B, S), `prefill_len` (the padded prompt length) and
    the sampling settings are compiled in: `prompt_len` and `total` are traced int32 scalars.
    `screen` (a GreedyScreen of the head, or None) makes greedy decoding use screened_argmax."""
    model = nnx.merge(graphdef, params)
    B, S = buf.shape
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))  # row b: (key, b)
    done0 = jnp.zeros((B,), bool)

    def emit(buf, done, x, t):
        # x: [B, C] final hidden state of the last position; t: index in buf of the token being
        # generated; rows already finished repeat eot
        tok = next_tokens(model, x, position_keys(row_keys, t), temperature, top_k, top_p, screen)
        if eot is not None:
            tok = jnp.where(done, eot, tok)
            done = done | (tok == eot)
        return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, t)), done

    def loop(step, init, limit):
        # run `step` while t < limit, the buffer is not full and some row has not produced eot
        cond = lambda c: (c[-1] < jnp.minimum(limit, total)) & ~jnp.all(c[1])
        return jax.lax.while_loop(cond, step, init)

    if use_cache:
        # prefill a cache of the padded prompt's length, then one token per step; the cache
        # doubles whenever it is full (up to S), so each step attends over at most twice the
        # filled positions, not all S (batch-8 decode of 124M: float32 235 -> 268 tokens/s;
        # experiments/PERF.md "A KV cache that grows")
        x, cache = prefill(model, buf[:, :prefill_len], prompt_len)
        buf, done = emit(buf, done0, x, prompt_len)

        def step(carry):
            buf, done, cache, t = carry
            tok = jax.lax.dynamic_slice(buf, (0, t - 1), (B, 1))  # [B, 1] the last token
            x, cache = decode_step(model, tok, cache)  # x: [B, C]
            buf, done = emit(buf, done, x, t)
            return buf, done, cache, t + 1

        carry = (buf, done, cache, prompt_len + 1)
        for w in doublings(prefill_len, S):
            carry = (*carry[:2], grow_cache(carry[2], w), carry[3])  # (the first: as prefilled)
            carry = loop(step, carry, w + 1)  # a cache of w positions serves t <= w
        return carry[0]

    # No cache: every step re-runs the model over the whole prefix buf[:, :t] -- padded on the
    # right to a power-of-two window w >= t (one compiled forward per window size), the head
    # only at position t-1 -- and, past the context, over a sliding window of the last
    # block_size tokens (as nanoGPT does).
    L = model.config.block_size
    carry = (buf, done0, jnp.asarray(prompt_len, jnp.int32))
    for w in doublings(prefill_len, min(L, S)):
        def step(carry, w=w):
            buf, done, t = carry
            x, _ = model(buf[:, :w], logits_at=t - 1, hidden=True)  # [B, C]
            buf, done = emit(buf, done, x, t)
            return buf, done, t + 1

        carry = loop(step, carry, w + 1)  # window w serves t <= w
    if S > L:
        def slide(carry):
            buf, done, t = carry
            x, _ = model(jax.lax.dynamic_slice(buf, (0, t - L), (B, L)), logits_at=L - 1, hidden=True)
            buf, done = emit(buf, done, x, t)
            return buf, done, t + 1

        carry = loop(slide, carry, S)
    return carry[0]


def generate(model, prompt, max_new_tokens: int, *, key=None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot: int | None = None,
             use_cache: bool = True, fast_decode: bool | None = None, min_prefill: int = 16):
    """Continue `prompt` (int [B, T0]) by `max_new_tokens`; returns ids [B, T0 + max_new_tokens].

    With a cache (default) the prompt is prefilled once and each new token costs one single-token
    step, in one compiled program (a `lax.while_loop` per cache capacity: the cache starts at
    the padded prompt's length and doubles when full). Prompt and buffer lengths are padded
    to power-of-two buckets (`bucket`), so a new prompt length or max_new_tokens within the same
    buckets reuses the compiled function. When the sequence would outgrow the context
    (`T0 + max_new_tokens > block_size`) generation slides a block_size window instead, as
    nanoGPT does, which needs the no-cache path. Rows that emit `eot` are padded with `eot`.
    Row b's token at position t is drawn with fold_in(fold_in(key, b), t).

    `fast_decode` (default: on a CPU) makes the cached decode run through the model's decode copy
    (`decode_copy`: layer kernels kept transposed, made once per model and kept while its weights
    live, ~380 MB extra at GPT-2 124M), and greedy decoding (temperature 0) of a single float32
    sequence picks each token with `screened_argmax`: an int8 copy of the head screens the
    vocabulary and only the candidates are recomputed in float32 -- the same ids as the full
    head, reading ~115 MB less per token at 124M. (Batched rows keep the full head: there the
    int8 product is slower.) `fast_decode=False` decodes with the model as it is.
    `min_prefill`: the shortest padded prompt length compiled for (prompts of different lengths
    padded to the same bucket share one compiled program).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt must be non-empty token ids [B, T], got shape {list(prompt.shape)}")
    if max_new_tokens == 0:
        return jnp.asarray(prompt)
    key = jax.random.key(0) if key is None else key
    (B, T0), L = prompt.shape, model.config.block_size
    total = T0 + int(max_new_tokens)
    use_cache = use_cache and total <= L
    S = bucket(total, cap=L if use_cache else None)
    buf = np.full((B, S), 0 if eot is None else eot, np.int32)  # prompt, then generated ids
    buf[:, :T0] = prompt
    head_screen = None
    if use_cache:  # (the no-cache path, for comparison, runs the model as it is)
        model, head_screen = decode_model(model, fast_decode, screen_rows=temperature == 0.0 and B == 1)
    graphdef, params = nnx.split(model)
    out = _generate(graphdef, params, buf, np.int32(T0), np.int32(total), key, head_screen,
                    prefill_len=min(bucket(T0, cap=L, lo=min_prefill), S), temperature=float(temperature),
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p),
                    eot=None if eot is None else int(eot), use_cache=use_cache)
    return out[:, :total]
