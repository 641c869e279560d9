"""INT8: the int8 layers, their matmul kernels, and float GPT -> int8 GPT (symmetric, per channel).

Weights. Every matmul kernel (attn c_attn / c_proj, mlp c_fc / c_proj) becomes int8 with one
float32 scale per output channel, scale = max|w| / 127 over that channel, q = round(w / scale), so
the reconstruction error of every weight is at most scale / 2. By default the tied embedding `wte`
is quantized the same way per vocabulary row (one scale per row serves both the lookup and the
tied head); `embedding=False` keeps it float32. An untied `lm_head` follows the embedding (int8,
one scale per vocabulary row, or float32). LayerNorms, biases and `wpe` stay float32.

Matmuls (`int8_matmul`). With several rows (a batch of decoded tokens, a prompt, an eval batch)
the activations are quantized on the fly, per row and symmetric (`quantize_rows`, as the weights), and the
product is int8 x int8 -> int32 (`lax.dot_general(preferred_element_type=int32)`), exact in the
integers, rescaled once: the CPU's integer dot instructions do the work. A single row (batch-1
decoding) keeps the activations in float and streams the int8 weights through a float
matrix-vector product: there XLA:CPU's integer product is ~30x slower (experiments/PERF.md
"Int8 kernels"); its input is `fence`d, so XLA cannot fuse the norm or gate that makes it into
the product's loop (PERF.md "Fenced int8 products"). `set_activations(model, "float" | "int8" | "auto" | "int8x2")` forces one path
(quality and speed comparisons); "auto" is GPT-2's default. "int8x2" (the Llama family's
default: SmolLM2's activations lose too much in one int8 pass) splits each activation row into
two int8 parts, x ~ s1 q1 + s2 q2 with q2 the rounding residue of q1, and runs two exact int8
dots: the activation error is 1/254 of one pass; from 2 to INT8X2_MAX_ROWS rows (one row and
long prompts stay weight-only).

    qmodel = quantize_model(model)          # a GPT whose config has quant="int8"
    lm = jaxgpt.load(path).quantize()       # the same, on a LoadedModel

The result is an ordinary GPT module (its int8 layers are Int8Linear / Int8Embed below) that
saves and loads like any jaxgpt checkpoint; its meta carries {"quant": {"bits": 8, "embedding": ...}}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ConfigError

QMAX = 127  # symmetric range [-127, 127]; -128 is never used, so negation is exact

LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
ACTIVATION_MODES = ("auto", "int8", "float", "int8x2")
INT8X2_MAX_ROWS = 64  # "int8x2": more rows (a prompt) run weight-only, a float GEMM (PERF.md "SmolLM2")
INT8_DOT_MIN_ROWS = 2  # "auto": from this many rows on, int8 x int8 (measured: PERF.md "Int8 kernels")
FENCE_MAX_ROWS = 64  # weight-only products of up to this many rows are fenced (decoding; a prompt's
# product is a GEMM, not a loop fusion, and stays as it was)


@jax.jit
def quantize_rows(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w float [rows, cols] -> (int8 [rows, cols], float32 scale [rows]); w ~= q * scale[:, None]."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=1)  # [rows]
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)  # an all-zero row gets scale 1 (q = 0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_rows(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The float32 weights an int8 [rows, cols] + scale [rows] pair stands for."""
    return q.astype(jnp.float32) * scale[:, None]


def _tie(x, w):
    """(x, w) unchanged, but w now depends on x for XLA: inside a decode loop the int8 -> float
    conversion of w would otherwise be hoisted out as loop-invariant, materialising a float copy
    of every weight (4x the memory, and the loop then reads float32 weights)."""
    return jax.lax.optimization_barrier((x, w))


@jax.named_scope("fence")  # (the parts of experiments/decode_profile.py)
def fence(x: jax.Array) -> jax.Array:
    """x unchanged, but as a buffer of its own that XLA cannot fuse through: an identity `lax.cond`.

    XLA:CPU fuses the producers of a one-row int8 product's input (the RMSNorm / LayerNorm, the
    embedding lookup, silu(gate) * up, the attention's re-assembly) into the product's loop, where
    they run again for every block of output rows: inside the model the products took 1.6-2.3x
    their time alone, and the LayerNorm fused into GPT-2's 50257-row head was worse still
    (experiments/PERF.md "Fenced int8 products"). `lax.optimization_barrier` is gone before fusion
    runs; a conditional is not, so the producers write x once and the product streams the weights
    at its own speed. The predicate is true unless x[0, 0] is NaN; the other branch is elementwise
    (NaNs stay NaN, rows stay independent), so the result equals x in every case that matters."""
    return jax.lax.cond(x[0, 0] == x[0, 0], lambda v: v, lambda v: v + 0.0 * v, x)


def set_fence(model, on: bool) -> None:
    """Fence (`fence`) the one-row weight-only products of every int8 layer of `model` (the
    default), or not (on=False: XLA fuses as it likes; for speed comparisons)."""
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, (Int8Linear, Int8Embed)):
            layer.fenced = bool(on)


@jax.named_scope("product")
def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, mode: str = "auto",
                fenced: bool = False) -> jax.Array:
    """x float [N, K] times int8 weights q [M, K] (one row per output channel) with scales [M]:
    float32 [N, M] ~= x @ (q * scale[:, None]).T.

    "int8" (and "auto" from INT8_DOT_MIN_ROWS rows): x is quantized per row and the product runs
    int8 x int8 -> int32, exact, then * x_scale * scale; its distance from the weight-only result
    is at most x_scale / 2 * scale[m] * sum_k |q[m, k]| (the activation rounding). "float" (and
    "auto" for one row): x @ q.T in x's float dtype, q converted inside the product, * scale;
    `fenced`: x (up to FENCE_MAX_ROWS rows) goes through `fence` first, so the product reads it as
    a buffer (the layers' default).
    """
    dot = lambda a: jax.lax.dot_general(a, q, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.int32).astype(jnp.float32)  # [N, M], exact
    if mode == "int8" or (mode == "auto" and x.shape[0] >= INT8_DOT_MIN_ROWS):
        xq, x_scale = quantize_rows(x)  # per row, symmetric: |x - xq * x_scale| <= x_scale / 2
        return dot(xq) * x_scale[:, None] * scale.astype(jnp.float32)
    if mode == "int8x2" and INT8_DOT_MIN_ROWS <= x.shape[0] <= INT8X2_MAX_ROWS:
        x = x.astype(jnp.float32)
        xq, s1 = quantize_rows(x)  # x = xq * s1 + r, |r| <= s1 / 2
        rq, s2 = quantize_rows(x - xq.astype(jnp.float32) * s1[:, None])  # r ~ rq * s2
        return (dot(xq) * s1[:, None] + dot(rq) * s2[:, None]) * scale.astype(jnp.float32)
    x, q = _tie(fence(x) if fenced and x.shape[0] <= FENCE_MAX_ROWS else x, q)
    return (x @ q.astype(x.dtype).T).astype(jnp.float32) * scale.astype(jnp.float32)


class Int8Linear(nnx.Module):
    """y = int8_matmul(x, W_int8, scale) + bias, with W stored int8 [out, in] and scale float32 [out].

    The kernel is kept transposed relative to nnx.Linear ([out, in], one row per output channel):
    for a single decoded token XLA's CPU matrix-vector product then reads the int8 rows directly,
    whereas an int8 [in, out] operand is first converted to a float copy (measured ~2x slower).
    `activations` picks int8_matmul's mode (static; see set_activations).
    """

    def __init__(self, d_in: int, d_out: int, dtype, use_bias: bool = True, activations: str = "auto"):
        self.kernel = nnx.Param(jnp.zeros((d_out, d_in), jnp.int8))  # [out, in]
        self.scale = nnx.Param(jnp.ones((d_out,), jnp.float32))  # [out]
        # [out]; None for the bias-free untied lm_head
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if use_bias else None
        self.dtype = dtype
        self.activations = activations
        self.fenced = True  # see fence / set_fence

    def __call__(self, x):
        y = int8_matmul(x.astype(self.dtype), self.kernel[...], self.scale[...], self.activations,
                        self.fenced)
        y = y if self.bias is None else y + self.bias[...]
        return y.astype(self.dtype)  # [N, out]


class Int8Embed(nnx.Module):
    """A token embedding stored int8 [V, C] with one float32 scale per row (per vocabulary entry).

    The row scale serves both uses: the lookup (`emb[id] * scale[id]`) and the tied head
    (`attend`: logits[v] = (x . emb[v]) * scale[v], a per-output-channel scale, int8_matmul).
    """

    def __init__(self, num: int, features: int, dtype, activations: str = "auto"):
        self.embedding = nnx.Param(jnp.zeros((num, features), jnp.int8))  # [V, C]
        self.scale = nnx.Param(jnp.ones((num,), jnp.float32))  # [V]
        self.dtype = dtype
        self.activations = activations
        self.fenced = True  # see fence / set_fence

    def __call__(self, ids):
        rows = self.embedding[...][ids].astype(self.dtype)  # [..., C]
        return rows * self.scale[...][ids][..., None].astype(self.dtype)

    def attend(self, x):
        y = int8_matmul(x.astype(self.dtype), self.embedding[...], self.scale[...], self.activations,
                        self.fenced)
        return y.astype(self.dtype)  # [N, V]


def set_activations(model, mode: str) -> None:
    """Make every int8 layer of `model` use int8_matmul mode `mode` ("auto", "int8", "float")."""
    if mode not in ACTIVATION_MODES:
        raise ConfigError(f"int8 activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, (Int8Linear, Int8Embed)):
            layer.activations = mode


def is_quantized(config) -> bool:
    return getattr(config, "quant", None) is not None


def quant_meta(config) -> dict | None:
    """{"bits": 8, "embedding": bool} for a quantized config, else None (goes into checkpoint meta)."""
    if not is_quantized(config):
        return None
    return {"bits": 8, "embedding": bool(config.quant_embedding)}


def quantize_model(model, embedding: bool = True, activations: str | None = None):
    """An int8 copy of float `model` (the float model is left untouched). `activations`: the int8
    layers' matmul mode (GPTConfig.quant_activations); default "auto" for GPT-2, "int8x2"
    (two-part activations) for other families.

    Only the int8 weights, their scales and the small float leftovers are allocated for the new
    model; the float model's arrays are read one matrix at a time.
    """
    if is_quantized(model.config):
        raise ConfigError("this model is already int8-quantized; quantize its float32 source instead")
    if activations is None:
        activations = "auto" if model.config.family == "gpt2" else "int8x2"
    qcfg = dataclasses.replace(model.config, quant="int8", quant_embedding=bool(embedding),
                               quant_activations=activations)
    graphdef, qstate = nnx.split(type(model).abstract(qcfg))  # shapes only, no allocation
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # nested dict of float arrays
    for i in range(qcfg.n_layer):
        block = pure["h"][i]
        for sub, name in LINEARS:
            lin = block[sub][name]
            q, scale = quantize_rows(lin["kernel"].T)  # kernel [in, out] -> rows = output channels
            block[sub][name] = {"kernel": q, "scale": scale, **({"bias": lin["bias"]} if "bias" in lin else {})}
    if embedding:
        q, scale = quantize_rows(pure["wte"]["embedding"])  # [V, C]: one scale per vocabulary row
        pure["wte"] = {"embedding": q, "scale": scale}
        if not qcfg.tie_word_embeddings:  # the untied head [C, V] goes int8 with the embedding
            q, scale = quantize_rows(pure["lm_head"]["kernel"].T)  # rows = vocabulary entries
            pure["lm_head"] = {"kernel": q, "scale": scale}
    nnx.replace_by_pure_dict(qstate, pure)
    return nnx.merge(graphdef, qstate)
