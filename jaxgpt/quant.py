"""INT8 weight quantization: float GPT -> int8 GPT (symmetric, per-output-channel scales).

Every matmul kernel (attn c_attn / c_proj, mlp c_fc / c_proj) becomes int8 with one float32
scale per output channel, scale = max|w| / 127 over that channel, q = round(w / scale), so the
reconstruction error of every weight is at most scale / 2. By default the tied embedding `wte`
is quantized the same way per vocabulary row (one scale per row serves both the lookup and the
tied head); `embedding=False` keeps it float32. An untied `lm_head` follows the embedding (int8,
one scale per vocabulary row, or float32). LayerNorms, biases and `wpe` stay float32.

    qmodel = quantize_model(model)          # a GPT whose config has quant="int8"
    lm = jaxgpt.load(path).quantize()       # the same, on a LoadedModel

The result is an ordinary GPT module (see Int8Linear / Int8Embed in jaxgpt.model) that saves and
loads like any jaxgpt checkpoint; its meta carries {"quant": {"bits": 8, "embedding": ...}}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ConfigError
from jaxgpt.model import GPT

QMAX = 127  # symmetric range [-127, 127]; -128 is never used, so negation is exact

LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


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


def is_quantized(config) -> bool:
    return getattr(config, "quant", None) is not None


def quant_meta(config) -> dict | None:
    """{"bits": 8, "embedding": bool} for a quantized config, else None (goes into checkpoint meta)."""
    if not is_quantized(config):
        return None
    return {"bits": 8, "embedding": bool(config.quant_embedding)}


def quantize_model(model: GPT, embedding: bool = True) -> GPT:
    """An int8 copy of float `model` (the float model is left untouched).

    Only the int8 weights, their scales and the small float leftovers are allocated for the new
    model; the float model's arrays are read one matrix at a time.
    """
    if is_quantized(model.config):
        raise ConfigError("this model is already int8-quantized; quantize its float32 source instead")
    qcfg = dataclasses.replace(model.config, quant="int8", quant_embedding=bool(embedding))
    graphdef, qstate = nnx.split(nnx.eval_shape(lambda: GPT(qcfg)))  # shapes only, no allocation
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # nested dict of float arrays
    for i in range(qcfg.n_layer):
        block = pure["h"][i]
        for sub, name in LINEARS:
            lin = block[sub][name]
            q, scale = quantize_rows(lin["kernel"].T)  # kernel [in, out] -> rows = output channels
            block[sub][name] = {"kernel": q, "scale": scale, "bias": lin["bias"]}
    if embedding:
        q, scale = quantize_rows(pure["wte"]["embedding"])  # [V, C]: one scale per vocabulary row
        pure["wte"] = {"embedding": q, "scale": scale}
        if not qcfg.tie_word_embeddings:  # the untied head [C, V] goes int8 with the embedding
            q, scale = quantize_rows(pure["lm_head"]["kernel"].T)  # rows = vocabulary entries
            pure["lm_head"] = {"kernel": q, "scale": scale}
    nnx.replace_by_pure_dict(qstate, pure)
    return nnx.merge(graphdef, qstate)
