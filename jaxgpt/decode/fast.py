"""The CPU decode copy: layer kernels stored transposed for one-row products (RowLinear), and
the int8 screen of the output head (greedy_screen / screened_argmax: the exact argmax while
reading mostly int8). Derived once per set of weights and cached; decoding only."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model.quant import LINEARS, dequantize_rows, fence, quantize_rows
from jaxgpt.decode.sampling import NEG_INF, adjust_logits, allowed_ids


ROW_PRODUCT_MAX_ROWS = 64  # RowLinear: one product per row up to this many rows, a GEMM above


class RowLinear(nnx.Module):
    """y = (W @ x^T)^T + bias with the kernel W stored [out, in] (PyTorch's layout): the decode copy.

    For a few rows (decoding), XLA:CPU runs `W @ x^T` as a row-major matrix-vector product that
    streams W as stored, ~15-20% faster than the column-major product over nnx.Linear's [in, out]
    kernel (batch-1 and batch-8 decode of GPT-2 124M; experiments/PERF.md). decode_copy builds
    these from nnx.Linear layers for decoding; training keeps nnx.Linear. A prompt (more than
    ROW_PRODUCT_MAX_ROWS rows) runs as one GEMM x @ W^T instead (512-token prefill of 124M:
    726 -> 782 tokens/s; experiments/PERF.md "A KV cache that grows").
    """

    def __init__(self, kernel_t: jax.Array, bias: jax.Array | None, dtype):
        self.kernel = nnx.Param(kernel_t)  # [out, in]
        self.bias = None if bias is None else nnx.Param(bias)  # [out], None without biases
        self.dtype = dtype

    @jax.named_scope("product")  # (the parts of experiments/decode_profile.py)
    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        kernel = self.kernel[...].astype(dtype)
        bias = 0.0 if self.bias is None else self.bias[...].astype(dtype)
        # one product per row, W @ [in, 1]: written as a vmap so that XLA:CPU keeps W the left
        # operand of a plain dot; `jnp.dot(W, x.T)` on [N, in] is rewritten into x @ W^T, which
        # runs ~35% slower at 8 rows (the same at 1; experiments/PERF.md "Decode (batch 8)")
        x = x.astype(dtype)
        if x.shape[0] > ROW_PRODUCT_MAX_ROWS:  # a prompt: one GEMM, x @ W^T
            return jax.lax.dot_general(x, kernel, (((1,), (1,)), ((), ()))) + bias
        y = jax.vmap(lambda r: jnp.dot(kernel, r[None].T).T[0])(x)  # [N, out]
        return y + bias



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
