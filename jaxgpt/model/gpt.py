"""The GPT-2 decoder as a Flax NNX module, plus the explicit KV-cache pytree it decodes with.

Reads top to bottom like GPT-2 itself: token + position embeddings, N pre-LayerNorm blocks of
causal self-attention and a GELU MLP with residuals, a final LayerNorm, and logits through the
token embedding (tied head). Parameter names follow GPT-2/HF (`wte`, `h.0.attn.c_attn`, ...).
The GPT2Config variants that change the math are config fields: the MLP's activation and width
(activation_function, n_inner), the attention scaling flags, and an untied `lm_head`.

The Llama family (SmolLM2, Llama 2/3, ...) is the same module with four knobs turned
(GPTConfig.llama): RMSNorm for LayerNorm, rotary positions on q and k instead of the `wpe` table,
grouped-query attention (n_kv_head key/value heads shared by n_head query heads) and a gated MLP,
c_proj(silu(gate) * up), with no biases. `c_attn` then holds [q | k | v] (H + 2 KV heads) and
`c_fc` [gate | up]: the fused projections, LoRA targets, int8 kernels, decode copy and KV cache
are the same code for both families.

Between blocks the activations are kept 2-D, `[B*T, C]`: on CPU this avoids XLA fusing the
GELU backward with a transpose (measured ~30% faster on the baby model); attention reshapes
to `[B, H, T, D]` internally.

With `config.quant == "int8"` the Linear layers (and, unless `quant_embedding` is off, the tied
embedding) are `Int8Linear` / `Int8Embed` (jaxgpt/model/quant.py): int8 weights plus float32
per-output-channel scales; no float copy of the model is kept.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import ACTIVATIONS, GPTConfig
from jaxgpt.parallel import gpu_ops_deterministic
from jaxgpt.model.quant import Int8Embed, Int8Linear  # noqa: F401  (the int8 layers live with their kernels)

_tanh_gelu = lambda x: jax.nn.gelu(x, approximate=True)  # 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
_erf_gelu = lambda x: jax.nn.gelu(x, approximate=False)  # 0.5x(1 + erf(x / sqrt(2)))

# The MLP nonlinearity for each config.activation_function, as transformers.activations defines it.
ACTIVATION_FNS = {
    "gelu_new": _tanh_gelu,  # GPT-2's
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_python_tanh": _tanh_gelu,
    "gelu_accurate": _tanh_gelu,
    "gelu": _erf_gelu,
    "gelu_python": _erf_gelu,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_10": lambda x: jnp.clip(_erf_gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}
assert tuple(ACTIVATION_FNS) == ACTIVATIONS  # config.py validates the names, this defines them

# A KV cache is a plain pytree: {"k": L x [B*KV, S, D], "v": L x [B*KV, S, D], "index": int32[]}
# (KV = the key/value heads: n_head for GPT-2, fewer with grouped-query attention)
# (one 3-D buffer per layer, updated in place inside a decode loop; see CausalSelfAttention).
# `index` is how many positions are filled; it is passed in and returned, never hidden in the model.
# It is one int32 scalar when all rows are at the same position, or int32 [B], one per row (rows
# at different positions, as jaxgpt.engine's slots are).
Cache = dict[str, Any]


def init_cache(config: GPTConfig, batch_size: int, max_len: int | None = None) -> Cache:
    """An empty KV cache for `batch_size` sequences of up to `max_len` (default: block_size)."""
    max_len = max_len or config.block_size
    shape = (batch_size * config.kv_heads, max_len, config.head_dim)
    zeros = lambda: [jnp.zeros(shape, jnp.dtype(config.dtype)) for _ in range(config.n_layer)]
    return {"k": zeros(), "v": zeros(), "index": jnp.array(0, jnp.int32)}


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op when rate is 0 or no key is given (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def fused_attention(dtype) -> str | None:
    """The `jax.nn.dot_product_attention` implementation to use for full (uncached) causal
    attention, or None for the plain masked softmax below. cuDNN's fused (flash) attention on a GPU
    in 16-bit compute; None elsewhere: on CPU the XLA implementation materialises the same
    [B, H, T, T] scores as the plain code and was measured slower (experiments/PERF.md)."""
    # XLA's deterministic-ops mode (which jaxgpt.train asks for) fails to compile the cuDNN call
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and not gpu_ops_deterministic():
        return "cudnn"
    return None


def _split(key: jax.Array | None, n: int) -> list:
    """n independent dropout keys, or n Nones when there is no key."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def _remat(f):
    """f(state, x, key) with activation rematerialisation: the forward pass keeps only the inputs
    and the backward pass recomputes f's internals from them.

    Plain `jax.checkpoint` saves no memory on XLA:CPU (measured: GPT-2 124M train step temps
    21.03 GiB with and without it): XLA:CPU removes the optimization barriers that keep the
    recomputation apart, CSE merges it with the forward pass, and every block's activations are
    kept again. Here the recomputation's input depends on the incoming cotangent (x, or NaN where
    the cotangent is NaN -- the gradient is NaN then anyway), which nothing can fold or hoist.
    """

    @jax.custom_vjp
    def run(state, x, key):
        return f(state, x, key)

    def fwd(state, x, key):
        return f(state, x, key), (state, x, key)

    def bwd(res, ct):
        state, x, key = res
        x = jnp.where(jnp.isnan(ct.reshape(-1)[0]), jnp.nan, x).astype(x.dtype)
        _, vjp = jax.vjp(lambda s, h: f(s, h, key), state, x)
        return (*vjp(ct), None)

    run.defvjp(fwd, bwd)
    return run


def _linear(cfg: GPTConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs):
    """A GPT-2 Linear (HF calls it Conv1D): kernel [in, out] ~ N(0, std), zero bias (none
    without cfg.bias).

    With cfg.quant == "int8" an (unfilled) Int8Linear instead; jaxgpt.quant fills it."""
    if cfg.quant == "int8":
        return Int8Linear(d_in, d_out, jnp.dtype(cfg.dtype), use_bias=cfg.bias, activations=cfg.quant_activations)
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias, kernel_init=nnx.initializers.normal(std),
                      bias_init=nnx.initializers.zeros_init(), dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    """GPT-2's LayerNorm (scale and bias), or with cfg.norm == "rmsnorm" Llama's RMSNorm,
    x / sqrt(mean(x^2) + eps) * scale (statistics in float32 either way)."""
    norm = nnx.RMSNorm if cfg.norm == "rmsnorm" else nnx.LayerNorm
    return norm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.float32, rngs=rngs)


# ---- rotary positions (the Llama family) ------------------------------------------------------
def rope_frequencies(cfg: GPTConfig) -> np.ndarray:
    """The rotary inverse frequencies, float32 [D/2]: theta^(-2i/D), as Hugging Face computes them
    (float32), then rescaled for cfg.rope_scaling ("linear": / factor; "llama3": long
    wavelengths / factor, short ones kept, a smooth blend between)."""
    D = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, D, 2).astype(np.float32) / np.float32(D))))
    inv = inv.astype(np.float32)
    if cfg.rope_scaling == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_scaling == "llama3":
        old = float(cfg.rope_original_max_len)
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(is_mid, mid, scaled).astype(np.float32)
    return inv


def rope_tables(cfg: GPTConfig, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), float32 [..., T, D], for positions pos int [T] or [B, T]: the angles
    pos * freq over the first D/2 dimensions, repeated for the second half (HF's layout)."""
    angles = pos[..., None].astype(jnp.float32) * jnp.asarray(rope_frequencies(cfg))  # [..., T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., T, D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope) -> jax.Array:
    """x [B, heads, T, D] rotated by the position tables (cos, sin) [T, D] or [B, T, D]:
    x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for the halves x1, x2 of D."""
    cos, sin = (t if t.ndim == 2 else t[:, None] for t in rope)  # broadcast over heads
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def _cache_write(cache: jax.Array, new: jax.Array, index, H: int) -> jax.Array:
    """cache [B*H, S, D] with new [B*H, T, D] written at position `index` (H: the cache's heads
    per row): one in-place dynamic_update_slice for a scalar index, a scatter (row b's heads at
    index[b]) for [B]."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index, 0))
    write = lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0))  # one row [S, D]
    return jax.vmap(write)(cache, new, jnp.repeat(index, H))


BLOCKWISE_FROM = 1024  # caches of this many positions or more are attended in blocks (attend_blocks)
ATTN_BLOCK = 256


def attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, last: jax.Array, scale: float,
                  sdtype, block: int = ATTN_BLOCK) -> jax.Array:
    """softmax(q k^T * scale, keys at positions <= last) v over a long cache, ATTN_BLOCK
    positions at a time, only as far as the furthest query sees (a loop with a traced trip
    count, the running maximum and sum of an online softmax): a step costs what the filled
    positions cost, not the cache's length, so one compiled program serves a cache of a whole
    context from its first token on (jaxgpt.engine's slots). q [N, Q, D], k and v [N, S, D],
    last int [Q] or [N, Q] (the last key position each query sees; position 0 always is)."""
    N, Q, D = q.shape
    S = k.shape[1]
    block = min(block, S)
    neg = jnp.finfo(jnp.float32).min
    last = jnp.broadcast_to(last, (N, Q))

    def body(j, carry):
        m, total, acc = carry  # [N, Q] running max, [N, Q] sum, [N, Q, D] weighted values
        lo = j * block
        start = jnp.minimum(lo, S - block)  # (a last block that would run past S: shifted back,
        pos = start + jnp.arange(block)  # the positions before lo masked)
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=1).astype(sdtype)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=1)
        s = (jnp.einsum("nqd,nsd->nqs", q, kb) * scale).astype(jnp.float32)
        s = jnp.where((pos >= lo) & (pos <= last[..., None]), s, neg)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        fix = jnp.exp(m - m_new)
        acc = acc * fix[..., None] + jnp.einsum("nqs,nsd->nqd", p.astype(v.dtype), vb).astype(jnp.float32)
        return m_new, total * fix + jnp.sum(p, axis=-1), acc

    n = jnp.minimum(jnp.max(last) // block + 1, -(-S // block))
    init = (jnp.full((N, Q), neg, jnp.float32), jnp.zeros((N, Q), jnp.float32), jnp.zeros((N, Q, D), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, n, body, init)
    return (acc / total[..., None]).astype(v.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (`c_attn`) and a causal mask.

    Scores are q.k / sqrt(head_dim) (GPT-2), without the 1/sqrt(head_dim) when
    cfg.scale_attn_weights is off, and further / (layer_idx + 1) with
    cfg.scale_attn_by_inverse_layer_idx. cfg.reorder_and_upcast_attn computes q.k and the softmax
    in float32 whatever the compute dtype (HF's mixed-precision option; a no-op in float32).

    Grouped-query attention (cfg.n_kv_head = KV < H): c_attn gives H query heads and KV key/value
    heads; query head h reads key/value head h // (H / KV), as HF's repeat_kv. The G = H / KV
    query heads of a group are stacked along the query axis ([B, KV, G*T, D]), so the score and
    value products below are GPT-2's with KV heads and G*T queries: nothing is repeated and the
    KV cache holds KV heads. With rotary positions (`rope`: the (cos, sin) tables of this
    chunk's positions) q and k are rotated before k enters the cache."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, layer_idx: int = 0):
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.n_kv_head = cfg.kv_heads
        self.scale = (1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0) / (
            layer_idx + 1.0 if cfg.scale_attn_by_inverse_layer_idx else 1.0)
        self.upcast = cfg.reorder_and_upcast_attn
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled init of residual projections
        self.c_attn = _linear(cfg, cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, 0.02, rngs)
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, proj_std, rngs)

    def _qkv(self, x, B: int, T: int, rope):
        """q [B, H, T, D] and k, v [B, KV, T, D] from x [B*T, C] (q and k rotated with rope)."""
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        if KV == H:  # GPT-2: [q | k | v], each C wide
            qkv = self.c_attn(x).reshape(B, T, 3, H, D)  # [B, T, 3, H, D]
            q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # each [B, H, T, D]
        else:
            qkv = self.c_attn(x).reshape(B, T, H + 2 * KV, D)  # [B, T, H + 2 KV, D]
            q, k, v = (a.transpose(0, 2, 1, 3) for a in jnp.split(qkv, [H, H + KV], axis=2))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    @jax.named_scope("attention")
    def __call__(self, x, B: int, T: int, kv=None, index=None, key=None, rope=None):
        # x: [B*T, C]. kv: optional (k_cache, v_cache), each [B*KV, S, D]; index: first position
        # of x. rope: (cos, sin) of the positions of x, with rotary positions.
        C, H, KV, D = x.shape[-1], self.n_head, self.n_kv_head, self.head_dim
        G = H // KV  # query heads per key/value head (1 for GPT-2)
        k_attn, k_resid = _split(key, 2)
        q, k, v = self._qkv(x, B, T, rope)  # [B, H, T, D], [B, KV, T, D], [B, KV, T, D]
        scale, neg = self.scale, jnp.finfo(jnp.float32).min
        sdtype = jnp.float32 if self.upcast else q.dtype  # the dtype q.k is computed in
        fused = None if self.upcast or (self.dropout > 0.0 and k_attn is not None) \
            else fused_attention(q.dtype)
        if kv is None and fused:
            # GPU, 16-bit, no attention dropout: one fused kernel that never materialises the
            # [B, H, T, T] scores. It takes [B, T, H, D]; XLA cancels the transposes in and out.
            y = jax.nn.dot_product_attention(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)),
                                             scale=scale, is_causal=True, implementation=fused)
            y = y.transpose(0, 2, 1, 3)  # [B, H, T, D]
        elif kv is None:
            # Training / full forward: keys are exactly this chunk; query i sees keys j <= i.
            causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [T, T]
            qg = q.reshape(B, KV, G * T, D)  # a group's G query heads stacked: [B, KV, G*T, D]
            att = jnp.einsum("bhtd,bhsd->bhts", qg.astype(sdtype), k.astype(sdtype))  # [B, KV, G*T, T]
            att = att * scale
            att = jnp.where(jnp.tile(causal, (G, 1)), att.astype(jnp.float32), neg)
            att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
            att = dropout(att, self.dropout, k_attn)
            y = jnp.einsum("bhts,bhsd->bhtd", att, v).reshape(B, H, T, D)  # [B, H, T, D]
        else:
            # Decoding: write this chunk into the cache at `index`, attend over the cache.
            # The cache is 3-D, [B*H, S, D]: with a 4-D [B, H, S, D] cache the reshape feeding
            # the attention dot made XLA fuse the update into two consumers and copy every cache
            # buffer 4x per layer per step (96 copies per token for GPT-2 small; none now).
            k_cache, v_cache = kv  # [B*KV, S, D]
            S = k_cache.shape[1]
            k = _cache_write(k_cache, k.reshape(B * KV, T, D).astype(k_cache.dtype), index, KV)
            v = _cache_write(v_cache, v.reshape(B * KV, T, D).astype(v_cache.dtype), index, KV)
            kv = (k, v)  # [B*KV, S, D]; positions >= index + T are masked out below
            if jnp.ndim(index) == 0:
                mask = jnp.arange(S)[None, :] <= index + jnp.arange(T)[:, None]  # [T, S] causal
            else:  # a position per row: [B*KV, T, S]
                last = jnp.repeat(index, KV)[:, None] + jnp.arange(T)[None, :]  # [B*KV, T]
                mask = jnp.arange(S)[None, None, :] <= last[:, :, None]
            if G > 1:  # the G query heads of a group stacked along the query axis
                mask = jnp.tile(mask, (G, 1)) if mask.ndim == 2 else jnp.tile(mask, (1, G, 1))
            qn = q.reshape(B * KV, G * T, D).astype(sdtype)
            if S >= BLOCKWISE_FROM and (self.dropout == 0.0 or k_attn is None):
                last = index + jnp.arange(T) if jnp.ndim(index) == 0 else last  # [T] or [B*KV, T]
                last = jnp.tile(last, (G,) if last.ndim == 1 else (1, G))  # as the queries of qn
                y = attend_blocks(qn, k, v, last, scale, sdtype).reshape(B, H, T, D)
            else:
                att = jnp.einsum("ntd,nsd->nts", qn, k.astype(sdtype)) * scale  # [B*KV, G*T, S]
                att = jnp.where(mask, att.astype(jnp.float32), neg)
                att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
                att = dropout(att, self.dropout, k_attn)
                y = jnp.einsum("nts,nsd->ntd", att, v).reshape(B, H, T, D)  # [B, H, T, D]
        y = y.transpose(0, 2, 1, 3).reshape(B * T, C)  # re-assemble heads: [B*T, C]
        y = dropout(self.c_proj(y), self.dropout, k_resid)
        return y, kv


class MLP(nnx.Module):
    """Position-wise feed-forward: C -> 4C -> GELU (tanh approximation, as GPT-2) -> C.

    The hidden width is cfg.mlp_dim (n_inner, default 4C) and the nonlinearity
    cfg.activation_function (ACTIVATION_FNS, default GPT-2's tanh GELU). With cfg.gated_mlp
    (Llama's SwiGLU) c_fc makes [gate | up], 2 x mlp_dim wide, and the hidden state is
    act(gate) * up."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.dropout, self.gated = cfg.dropout, cfg.gated_mlp
        self.activation = cfg.activation_function  # a name: static, hashable module state
        width = cfg.mlp_dim * (2 if cfg.gated_mlp else 1)
        self.c_fc = _linear(cfg, cfg.n_embd, width, 0.02, rngs)
        self.c_proj = _linear(cfg, cfg.mlp_dim, cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), rngs)

    def __call__(self, x, key=None):
        act = ACTIVATION_FNS[self.activation]
        if self.gated:
            gate, up = jnp.split(self.c_fc(x), 2, axis=-1)  # each [B*T, mlp_dim]
            h = act(gate) * up
        else:
            h = act(self.c_fc(x))  # [B*T, 4C] (4C = mlp_dim)
        return dropout(self.c_proj(h), self.dropout, key)  # [B*T, C]


class Block(nnx.Module):
    """One transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm)."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, layer_idx: int = 0):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs, layer_idx=layer_idx)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, B: int, T: int, kv=None, index=None, key=None, rope=None):
        k_attn, k_mlp = _split(key, 2)
        a, kv = self.attn(self.ln_1(x), B, T, kv, index, k_attn, rope)
        x = x + a  # [B*T, C]
        x = x + self.mlp(self.ln_2(x), k_mlp)
        return x, kv


@jax.named_scope("product")
def head_rows(wte: nnx.Embed, x: jax.Array) -> jax.Array:
    """The tied head for a few rows (decoding): x [N, C] -> logits [N, V], as `wte.attend(x)`.

    Computed as (wte @ x^T)^T: with the table [V, C] as the dot's left operand, XLA:CPU runs a
    row-major matrix-vector product over wte as stored. `x @ wte.T` (attend) instead becomes a
    loop fusion that reads wte transposed and recomputes ln_f inside it (batch-1 decode of the
    124M shape: ~3 ms/token more; experiments/PERF.md "Decode (batch 1)"). Same products, same
    dtype promotion as nnx.Embed.attend; only the summation order may differ.
    """
    x, table = wte.promote_dtype((x, wte.embedding[...]), dtype=wte.dtype)  # [N, C], [V, C]
    # one product per row, as RowLinear: `jnp.dot(table, x.T)` on 8 rows reads wte at ~13 GB/s,
    # this at ~19 GB/s (the same at 1 row; experiments/PERF.md "Int8 kernels and sampling")
    return jax.vmap(lambda r: jnp.dot(table, r[None].T).T[0])(x)  # [N, V]


class _ShapeOnlyRngs:
    """Stands in for nnx.Rngs when only shapes are wanted (GPT.abstract): every stream gives the
    same key and keeps no count. A real Rngs updates its count Variable on each draw, and under
    eval_shape each update makes JAX build an error message that walks the whole trace so far
    (quadratic: SmolLM2's 30 layers took 2.2 s of tracing, 0.86 s with this)."""

    def __getattr__(self, name):
        return lambda: jax.random.key(0)

    def __call__(self):
        return jax.random.key(0)


class GPT(nnx.Module):
    """GPT-2 (or a Llama-family model, GPTConfig.llama): `model(ids)` -> (logits [B, T, vocab],
    None); `model(ids, cache=c)` -> (logits, cache)."""

    @classmethod
    def abstract(cls, config: GPTConfig) -> "GPT":
        """The model of `config` with ShapeDtypeStructs for weights: no init, no allocation."""
        return nnx.eval_shape(lambda: cls(config, rngs=_ShapeOnlyRngs()))

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        self.config = config
        cfg, dtype = config, jnp.dtype(config.dtype)
        embed_init = nnx.initializers.normal(0.02)
        if cfg.quant == "int8" and cfg.quant_embedding:
            self.wte = Int8Embed(cfg.vocab_size, cfg.n_embd, dtype, cfg.quant_activations)  # int8 rows + row scales
        else:
            self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init, dtype=dtype,
                                 param_dtype=jnp.float32, rngs=rngs)  # token embedding, also the head
        if cfg.position == "learned":  # learned positions; rotary ones (rope) have no table
            self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=embed_init, dtype=dtype,
                                 param_dtype=jnp.float32, rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs=rngs, layer_idx=i) for i in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        if not cfg.tie_word_embeddings:  # a separate output head (HF lm_head), made last: a tied
            # model's init draws exactly the same random numbers as before this option existed
            if cfg.quant == "int8" and cfg.quant_embedding:
                self.lm_head = Int8Linear(cfg.n_embd, cfg.vocab_size, dtype, use_bias=False,
                                          activations=cfg.quant_activations)
            else:
                self.lm_head = nnx.Linear(cfg.n_embd, cfg.vocab_size, use_bias=False,
                                          kernel_init=nnx.initializers.normal(0.02), dtype=dtype,
                                          param_dtype=jnp.float32, rngs=rngs)  # kernel [C, V]

    def __call__(self, ids: jax.Array, *, cache: Cache | None = None, key: jax.Array | None = None,
                 logits_at: jax.Array | int | None = None, hidden: bool = False):
        """ids: int [B, T] -> (out, cache | None): one shape of result whatever the arguments.

        out is float32 logits [B, T, V]. Without a cache the second item is None; with one, `ids`
        continue the sequences at position cache["index"] and it is the new cache. `key`
        enables dropout (training only). `logits_at` (an int or a traced int32 scalar, an index
        into the T positions) computes the head at that one position only: logits [B, 1, V]
        (decoding needs just the last real position's logits). `hidden=True` skips the head: out
        is then the final hidden states (after ln_f) in place of the logits, [B*T, C] (or [B, C]
        with `logits_at`), for a loss that applies the head itself (jaxgpt.training.pretrain.head_loss, in
        chunks) or a decoder that picks tokens from them (`head`).
        """
        B, T = ids.shape
        index = None if cache is None else cache["index"]
        pos = jnp.arange(T) if cache is None else index[..., None] + jnp.arange(T)  # [T] or [B, T]
        keys = _split(key, self.config.n_layer + 1)
        x = self.wte(ids)  # [B, T, C]
        rope = None
        if self.config.position == "rope":
            rope = rope_tables(self.config, pos)  # (cos, sin) [T, D] or [B, T, D]
        else:
            x = x + self.wpe(pos).reshape(-1, T, self.config.n_embd)  # [B, T, C]
        x = dropout(x, self.config.dropout, keys[0]).reshape(B * T, -1)  # [B*T, C]
        new_k, new_v = [], []
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            if self.config.remat and cache is None:
                # activation rematerialisation: the backward pass recomputes the block's
                # internals from its input instead of keeping them (a pure function of the
                # block's state, so it works under any outer transform)
                gdef, bstate = nnx.split(block)
                run = _remat(lambda s, h, k, gdef=gdef: nnx.merge(gdef, s)(h, B, T, key=k, rope=rope)[0])
                x = run(bstate, x, keys[i + 1])
                continue
            x, kv = block(x, B, T, kv, index, keys[i + 1], rope)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        if logits_at is not None:  # the head is T x cheaper at one position
            x = jax.lax.dynamic_index_in_dim(x.reshape(B, T, -1), logits_at, axis=1, keepdims=False)
        x = self.ln_f(x)  # [B*T, C], or [B, C] with logits_at
        new_cache = None if cache is None else {"k": new_k, "v": new_v, "index": index + T}
        if hidden:
            return x, new_cache
        logits = self.head(x, rows=logits_at is not None).reshape(B, -1, self.config.vocab_size)
        return logits, new_cache

    def head(self, x: jax.Array, rows: bool = False) -> jax.Array:
        """The output head: final hidden states x [N, C] -> float32 logits [N, V]; tied to wte,
        or the separate `lm_head` when config.tie_word_embeddings is off.
        `rows=True` says N is a handful of decoded rows (one per sequence): see head_rows."""
        if not self.config.tie_word_embeddings:
            return self.lm_head(x).astype(jnp.float32)  # [N, V]
        if rows and isinstance(self.wte, nnx.Embed):
            return head_rows(self.wte, x).astype(jnp.float32)  # [N, V]
        return self.wte.attend(x).astype(jnp.float32)  # [N, V] (or int8 table rows, Int8Embed)


def rebuilt(model: GPT, config: GPTConfig) -> GPT:
    """The same weights in modules built for `config` (same shapes; another compute dtype,
    dropout or remat): nothing is copied or initialised."""
    if config == model.config:
        return model
    return nnx.merge(nnx.graphdef(GPT.abstract(config)), nnx.state(model))


def param_bytes(model_or_state) -> int:
    """Bytes of all parameters (int8 weights count 1 byte each, float32 4); works on abstract shapes."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def count_params(model_or_state) -> int:
    """Number of parameters (the tied head is counted once, as GPT-2's 124M does; an untied
    lm_head is counted as its own parameters)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(x.size for x in jax.tree.leaves(state))


# ---- a model from named weights (the file formats' loaders) -------------------------------------
def param_path(dotted: str) -> tuple:
    """'h.0.attn.c_attn.kernel' -> ('h', 0, 'attn', 'c_attn', 'kernel'), nnx's state path."""
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def model_with(cfg: GPTConfig, params: dict[tuple, np.ndarray]) -> GPT:
    """A GPT of `cfg` whose parameters are `params` (path -> array), without a random init of the real size."""
    graphdef, state = nnx.split(GPT.abstract(cfg))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
