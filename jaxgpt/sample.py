"""Text generation: logit filters (temperature, top-k, top-p), batched decoding with a KV cache
(on a CPU through a decode copy of the weights, with an exact int8-screened greedy head), and the
sampling CLI, `python -m jaxgpt.sample CKPT --prompt TEXT`."""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import ConfigError
from jaxgpt.model import RowLinear, init_cache
from jaxgpt.quant import LINEARS, dequantize_rows, quantize_rows

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
                setattr(parent, name, RowLinear(kernel_t, lin.bias[...], lin.dtype))
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

    q [V, C] int8 and scale [V]: w[v] ~ q[v] * scale[v] (jaxgpt.quant.quantize_rows); err [V] is
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
                    k: int = SCREEN_K) -> jax.Array:
    """argmax over v of x . table[v] for final hidden rows x [B, C], reading mostly int8.

    approx[v] = (x . q[v]) * scale[v] is within b[v] = ||x|| * err[v] (plus a float32 rounding
    margin) of the exact logit, so the maximum is among the candidates whose upper bound
    approx + b reaches the largest lower bound max(approx - b). Those (at most k, in index order)
    are recomputed in float32 from `table` and the best one wins; with more than k candidates the
    full float32 head decides. The result is the argmax of float32 logits, as `sample_token` at
    temperature 0 would pick from the full head, up to float32 rounding (a tie closer than
    ~1e-6 relative may resolve either way, as it may between any two matmul orders).
    """
    x = x.astype(jnp.float32)
    x, q = jax.lax.optimization_barrier((x, screen.q))  # keep the int8 -> f32 convert in the loop
    approx = (x @ q.astype(jnp.float32).T) * screen.scale  # [B, V], reads the int8 rows
    xnorm = jnp.linalg.norm(x, axis=-1, keepdims=True)  # [B, 1]
    # error bound: quantization (Cauchy-Schwarz) + float32 accumulation of the C-term dot, at most
    # ~C * 2^-24 relative to sum |x_i w_i| <= ||x|| ||w|| (doubled for the scale and the norms)
    rounding = 2.0 * x.shape[-1] * 2.0 ** -24
    bound = xnorm * (screen.err * 1.001 + rounding * screen.norm)  # [B, V]
    floor = jnp.max(approx - bound, axis=-1, keepdims=True)  # [B, 1] the best lower bound
    cand = approx + bound >= floor  # [B, V] rows that may hold the maximum

    def recompute():
        idx = jax.vmap(lambda c: jnp.nonzero(c, size=k, fill_value=0)[0])(cand)  # [B, k]
        real = jnp.take_along_axis(cand, idx, axis=1)  # [B, k] False on the fill slots
        logits = jnp.einsum("bkc,bc->bk", table[idx].astype(jnp.float32), x)  # [B, k]
        best = jnp.argmax(jnp.where(real, logits, NEG_INF), axis=-1)  # [B]
        return jnp.take_along_axis(idx, best[:, None], axis=1)[:, 0]

    def full():
        return jnp.argmax(jnp.dot(table.astype(jnp.float32), x.T).T, axis=-1)  # [B]

    many = jnp.max(jnp.sum(cand, axis=-1)) > k
    return jax.lax.cond(many, full, recompute).astype(jnp.int32)


# ---- decoding ---------------------------------------------------------------------------------
def bucket(n: int, cap: int | None = None, lo: int = 16) -> int:
    """The smallest power of two >= max(n, lo), capped at `cap`: the padded lengths that decoding
    compiles for, so prompts of 17..32 tokens (say) share one compiled function."""
    b = max(lo, 1 << (max(int(n), 1) - 1).bit_length())
    return b if cap is None else min(b, cap)


@partial(jax.jit, static_argnames=("graphdef", "prefill", "temperature", "top_k", "top_p", "eot",
                                   "use_cache"))
def _generate(graphdef, params, buf, prompt_len, total, key, screen, *, prefill, temperature, top_k,
              top_p, eot, use_cache):
    """buf: int32 [B, S], the prompt in buf[:, :prompt_len] (the rest is padding); fills
    buf[:, prompt_len:total]. Only shapes (B, S), `prefill` (the padded prompt length) and the
    sampling settings are compiled in: `prompt_len` and `total` are traced int32 scalars.
    `screen` (a GreedyScreen of the head, or None) makes greedy decoding use screened_argmax."""
    model = nnx.merge(graphdef, params)
    B, S = buf.shape
    pick = partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    done0 = jnp.zeros((B,), bool)

    def emit(buf, done, x, t):
        # x: [B, C] final hidden state of the last position; t: index in buf of the token being
        # generated; rows already finished repeat eot
        if screen is not None:
            tok = screened_argmax(x, head_table(model), screen)
        else:
            tok = pick(model.head(x, rows=True), jax.random.fold_in(key, t))
        if eot is not None:
            tok = jnp.where(done, eot, tok)
            done = done | (tok == eot)
        return jax.lax.dynamic_update_slice(buf, tok[:, None], (0, t)), done

    def loop(step, init, limit):
        # run `step` while t < limit, the buffer is not full and some row has not produced eot
        cond = lambda c: (c[-1] < jnp.minimum(limit, total)) & ~jnp.all(c[1])
        return jax.lax.while_loop(cond, step, init)

    if use_cache:
        # Prefill the cache with the prompt padded on the right to `prefill` tokens (the padding's
        # keys/values land at positions >= prompt_len, which the causal mask hides and decoding
        # overwrites), take the logits at the last real position, decode one token per step.
        cache = init_cache(model.config, B, S)
        x, cache = model(buf[:, :prefill], cache=cache, logits_at=prompt_len - 1, hidden=True)
        cache = {**cache, "index": jnp.asarray(prompt_len, jnp.int32)}
        buf, done = emit(buf, done0, x, prompt_len)

        def step(carry):
            buf, done, cache, t = carry
            tok = jax.lax.dynamic_slice(buf, (0, t - 1), (B, 1))  # [B, 1] the last token
            x, cache = model(tok, cache=cache, logits_at=0, hidden=True)  # x: [B, C]
            buf, done = emit(buf, done, x, t)
            return buf, done, cache, t + 1

        return loop(step, (buf, done, cache, prompt_len + 1), S)[0]

    # No cache: every step re-runs the model over the whole prefix buf[:, :t] -- padded on the
    # right to a power-of-two window w >= t (one compiled forward per window size), the head
    # only at position t-1 -- and, past the context, over a sliding window of the last
    # block_size tokens (as nanoGPT does).
    L = model.config.block_size
    carry = (buf, done0, jnp.asarray(prompt_len, jnp.int32))
    w = prefill
    while True:
        w = min(w, L, S)

        def step(carry, w=w):
            buf, done, t = carry
            x, _ = model(buf[:, :w], logits_at=t - 1, hidden=True)  # [B, C]
            buf, done = emit(buf, done, x, t)
            return buf, done, t + 1

        carry = loop(step, carry, w + 1)  # window w serves t <= w
        if w == min(L, S):
            break
        w *= 2
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
             use_cache: bool = True, fast_decode: bool | None = None):
    """Continue `prompt` (int [B, T0]) by `max_new_tokens`; returns ids [B, T0 + max_new_tokens].

    With a cache (default) the prompt is prefilled once and each new token costs one single-token
    step; the whole loop is one compiled `lax.while_loop`. Prompt and buffer lengths are padded
    to power-of-two buckets (`bucket`), so a new prompt length or max_new_tokens within the same
    buckets reuses the compiled function. When the sequence would outgrow the context
    (`T0 + max_new_tokens > block_size`) generation slides a block_size window instead, as
    nanoGPT does, which needs the no-cache path. Rows that emit `eot` are padded with `eot`.

    `fast_decode` (default: on a CPU) makes the cached decode run through the model's decode copy
    (`decode_copy`: layer kernels kept transposed, made once per model and kept while its weights
    live, ~380 MB extra at GPT-2 124M), and greedy decoding (temperature 0) of a single float32 sequence picks
    each token with `screened_argmax`: an int8 copy of the head screens the vocabulary and only the
    candidates are recomputed in float32 -- the same ids as the full head, reading ~115 MB less
    per token at 124M. (Batched rows keep the full head: there the int8 product is slower.)
    `fast_decode=False` decodes with the model as it is.
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
    if fast_decode is None:
        fast_decode = jax.default_backend() == "cpu"
    head_screen = None
    if fast_decode and use_cache:  # (the no-cache path, for comparison, runs the model as it is)
        model = decode_copy(model)
        table = head_table(model)
        if (temperature == 0.0 and B == 1 and table is not None and table.dtype == jnp.float32
                and jnp.dtype(model.config.dtype) == jnp.float32):
            head_screen = _derived("screen", table, greedy_screen)
    graphdef, params = nnx.split(model)
    out = _generate(graphdef, params, buf, np.int32(T0), np.int32(total), key, head_screen,
                    prefill=min(bucket(T0, cap=L), S), temperature=float(temperature),
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p),
                    eot=None if eot is None else int(eot), use_cache=use_cache)
    return out[:, :total]


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


# ---- CLI ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.sample",
        description="Sample text from a model. Stdout gets only the text (prompt + continuation; "
                    "samples separated by a line '---'); logs and warnings go to stderr. A prompt "
                    "longer than the model's context is truncated from the left (a warning says so).")
    p.add_argument("ckpt", help="jaxgpt run/checkpoint folder, Hugging Face GPT-2 folder, or hub name")
    p.add_argument("--prompt", default="", help="text to continue (default: <|endoftext|>, or a "
                   "newline for models without it)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1, help="samples, decoded as one batch")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus: keep the smallest set of tokens whose probability reaches p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", action="store_true", help="don't stop at <|endoftext|>")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole context each step instead of using the KV cache")
    p.add_argument("--no-decode-copy", action="store_true",
                   help="decode with the model's own weights: on a CPU jaxgpt otherwise keeps a "
                        "transposed copy of the layer kernels and an int8 screen of the head "
                        "(same tokens, ~25%% faster at batch 1, about the layer weights' size "
                        "again in memory)")
    p.add_argument("--json", action="store_true",
                   help='print {"samples": [{"text", "tokens"}]} (tokens = prompt + generated ids)')
    p.add_argument("--raw", action="store_true",
                   help="send --prompt as it is, even to an instruction-tuned checkpoint (by default "
                        "its saved chat template wraps the prompt)")
    p.add_argument("--int8", action="store_true",
                   help="quantize the weights to int8 on load (jaxgpt.quant); int8 checkpoints "
                        "load as they are, without this flag")
    return p


def sample_cli(lm, args, log=lambda s: print(s, file=sys.stderr)) -> list[dict]:
    """Samples as [{"text", "tokens"}] for parsed CLI `args` from a `jaxgpt.load` result."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    tok, L = lm.tokenizer, lm.config.block_size
    if tok is None:
        raise ConfigError("this model has no known tokenizer, so it cannot sample from a text prompt")
    eot = getattr(tok, "eot_token", None)
    prompt = args.prompt
    template = lm.meta.get("template")
    if prompt and template and not getattr(args, "raw", False):
        # an instruction-tuned checkpoint (jaxgpt.sft): ask it the way it was trained
        from jaxgpt.templates import render_prompt

        prompt = render_prompt(template, [{"role": "user", "content": prompt}])
        log(f"(prompt wrapped in the model's {template} template; --raw to send it as is)")
    ids = tok.encode(prompt) if prompt else ([eot] if eot is not None else tok.encode("\n"))
    if len(ids) > L:
        log(f"warning: the prompt has {len(ids)} tokens, more than the context ({L}); "
            f"keeping its last {L}")
        ids = ids[-L:]
    stop = None if args.no_stop else eot
    prompt = np.tile(np.asarray(ids, np.int32), (args.num_samples, 1))  # [N, T0]
    out = np.asarray(generate(lm.model, prompt, args.max_new_tokens, key=jax.random.key(args.seed),
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              eot=stop, use_cache=not args.no_cache,
                              fast_decode=False if getattr(args, "no_decode_copy", False) else None))
    samples = []
    for row in out:
        new = row[len(ids):].tolist()
        if stop is not None and stop in new:
            new = new[:new.index(stop)]  # cut at <|endoftext|> (it is not printed or returned)
        tokens = list(ids) + new
        samples.append({"text": tok.decode(tokens), "tokens": tokens})
    return samples


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxgpt.api import load_for_inference  # late: loading pulls in orbax and the converters

    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        lm = load_for_inference(args.ckpt, args.int8)
        samples = sample_cli(lm, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"samples": samples}, ensure_ascii=False))
    else:
        print("\n---\n".join(s["text"] for s in samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
