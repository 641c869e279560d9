"""`generate`: the fused decoder, prefill then a jitted while-loop of decode steps with
sampling inside (the sliding window past the context), for one batch of prompts at once."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import ConfigError
from jaxgpt.decode.sampling import check_sampling, position_keys
from jaxgpt.decode.fast import decode_model
from jaxgpt.decode.steps import bucket, decode_step, doublings, grow_cache, next_tokens, prefill


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
