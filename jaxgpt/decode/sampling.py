"""Picking tokens from logits: top-k / top-p filters (one row or per-row settings), the
inverse-CDF draw, greedy, the logit adjustments (grammar masks, logit bias, penalties) and the
check of sampling settings. Pure functions of arrays, used by every decoding path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.config import ConfigError

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


@jax.jit  # (called eagerly, its lax.cond would compile afresh on every call: new branch closures)
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
    # a rolled loop: unrolled, every program holding the sampler compiled ~0.9 s longer (PERF.md)
    lo, hi = jax.lax.fori_loop(0, 32 // (ways.bit_length() - 1), narrow, (lo, hi))
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
    return _sample_per_row(logits, keys, temperature, top_k, top_p)


@jax.jit  # (as _filter_rows: one compiled program for eager calls, inlined under an outer jit)
def _sample_per_row(logits, keys, temperature, top_k, top_p) -> jax.Array:
    """sample_rows with settings [B] per row (traced; top_k / top_p None = off)."""
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
