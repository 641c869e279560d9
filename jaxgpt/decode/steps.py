"""The model steps decoding is made of: prefill a prompt into a KV cache, one decode step,
the next tokens from final hidden states (sampling, the head screen) and their logprobs, and the
cache-length buckets (powers of two) that keep compiled shapes few."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.model.gpt import init_cache
from jaxgpt.decode.sampling import adjust_logits, sample_rows
from jaxgpt.decode.fast import GreedyScreen, head_table, screened_argmax


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
