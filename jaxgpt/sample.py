"""Text generation: logit filters (temperature, top-k, top-p) and batched decoding with a KV cache."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model import init_cache

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
    keep_sorted = mass_before < p
    # the smallest kept logit is the threshold; everything below it goes
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, NEG_INF, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """One token id per row of logits [B, V]. temperature 0 means greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---- decoding ---------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "eot", "use_cache"))
def _generate(graphdef, params, prompt, key, *, max_new_tokens, temperature, top_k, top_p, eot,
              use_cache):
    model = nnx.merge(graphdef, params)
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    buf = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt)  # prompt + generated ids
    pick = partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    done0 = jnp.zeros((B,), bool)

    def emit(buf, done, logits, t):
        # t: index in buf of the token being generated; rows already finished repeat eot
        tok = pick(logits, jax.random.fold_in(key, t))
        if eot is not None:
            tok = jnp.where(done, eot, tok)
            done = done | (tok == eot)
        return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, t)), done

    if use_cache:
        # Prefill the cache with the whole prompt once, then decode one token per step.
        cache = init_cache(model.config, B, total)
        logits, cache = model(prompt, cache=cache)
        buf, done = emit(buf, done0, logits[:, -1], T0)

        def step(carry):
            buf, done, cache, t = carry
            tok = jax.lax.dynamic_slice(buf, (0, t - 1), (B, 1))  # [B, 1] the last token
            logits, cache = model(tok, cache=cache)
            buf, done = emit(buf, done, logits[:, -1], t)
            return buf, done, cache, t + 1

        init = (buf, done, cache, jnp.int32(T0 + 1))
    else:
        # No cache: re-run the model over a window of the last W <= block_size tokens each step.
        W = min(model.config.block_size, total)

        def step(carry):
            buf, done, t = carry
            start = jnp.clip(t - W, 0, total - W)
            window = jax.lax.dynamic_slice(buf, (0, start), (B, W))
            logits = model(window)  # [B, W, V]; causal, so positions after t-1 don't matter
            last = jax.lax.dynamic_index_in_dim(logits, t - 1 - start, axis=1, keepdims=False)
            buf, done = emit(buf, done, last, t)
            return buf, done, t + 1

        init = (buf, done0, jnp.int32(T0))

    def cond(carry):
        # stop when the buffer is full or every row has produced eot
        return (carry[-1] < total) & ~jnp.all(carry[1])

    out = jax.lax.while_loop(cond, step, init)
    return out[0]


def generate(model, prompt, max_new_tokens: int, *, key=None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eot: int | None = None,
             use_cache: bool = True):
    """Continue `prompt` (int [B, T0]) by `max_new_tokens`; returns ids [B, T0 + max_new_tokens].

    With a cache (default) the prompt is prefilled once and each new token costs one single-token
    step; the whole loop is one compiled `lax.while_loop`. When the sequence would outgrow the
    context (`T0 + max_new_tokens > block_size`) generation slides a block_size window instead,
    as nanoGPT does, which needs the no-cache path. Rows that emit `eot` are padded with `eot`.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if max_new_tokens == 0:
        return prompt
    key = jax.random.key(0) if key is None else key
    total = prompt.shape[1] + max_new_tokens
    use_cache = use_cache and total <= model.config.block_size
    graphdef, params = nnx.split(model)
    return _generate(graphdef, params, prompt, key, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_k=top_k, top_p=top_p, eot=eot,
                     use_cache=use_cache)
