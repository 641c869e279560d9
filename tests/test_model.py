"""The GPT module: GPT-2's exact shapes, causality, dropout, the KV cache, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig, count_params, init_cache
from jaxgpt.config import ConfigError

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64)


@nnx.jit
def fwd(model, ids, key=None):
    """A jitted forward's logits (eager NNX dispatches op by op, which is slow for tests)."""
    logits, cache = model(ids, key=key)
    assert cache is None  # no cache in, None out: __call__ always returns (out, cache | None)
    return logits


@nnx.jit
def fwd_cached(model, ids, cache):
    return model(ids, cache=cache)


def test_gpt2_preset_has_124m_params_and_hf_shapes():
    cfg = GPTConfig.from_preset("gpt2")
    model = nnx.eval_shape(lambda: GPT(cfg))  # shapes only, nothing allocated
    assert count_params(model) == 124_439_808
    p = nnx.state(model, nnx.Param)
    assert p["wte"]["embedding"].shape == (50257, 768)
    assert p["wpe"]["embedding"].shape == (1024, 768)
    assert len(model.h) == 12
    assert p["h"][0]["attn"]["c_attn"]["kernel"].shape == (768, 3 * 768)
    assert p["h"][0]["mlp"]["c_fc"]["kernel"].shape == (768, 4 * 768)
    assert p["h"][11]["mlp"]["c_proj"]["kernel"].shape == (4 * 768, 768)
    assert "lm_head" not in p  # the head is tied to wte


@pytest.mark.parametrize("cfg", [GPTConfig.gpt2(), GPTConfig.smollm2_135m(), GPTConfig.baby_llama(),
                                 GPTConfig.gpt2(quant="int8", quant_embedding=True)],
                         ids=["gpt2", "smollm2", "baby_llama", "gpt2-int8"])
def test_abstract_model_is_the_traced_init_without_its_random_draws(cfg):
    # GPT.abstract (what the loaders fill) stands in a key source for nnx.Rngs: the same module
    # tree and the same shapes and dtypes as tracing the real init
    traced_def, traced = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))
    def_, state = nnx.split(GPT.abstract(cfg))
    assert def_ == traced_def
    as_shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(s))
    assert as_shapes(state) == as_shapes(traced)


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080)])
def test_larger_presets_param_counts(name, n):
    # the published (HF) parameter counts of GPT-2 medium/large/xl, tied head counted once
    model = nnx.eval_shape(lambda: GPT(GPTConfig.from_preset(name)))
    assert count_params(model) == n


def test_output_shape_and_dtype():
    model = GPT(TINY, seed=0)
    ids = jnp.zeros((3, 17), jnp.int32)
    logits = fwd(model, ids)
    assert logits.shape == (3, 17, 97) and logits.dtype == jnp.float32


def test_causal_mask_later_tokens_never_change_earlier_logits():
    model = GPT(TINY, seed=1)
    ids = jax.random.randint(jax.random.key(0), (2, 20), 0, 97)
    changed = ids.at[:, 12:].set((ids[:, 12:] + 5) % 97)
    a, b = fwd(model, ids), fwd(model, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :12]), np.asarray(b[:, :12]))
    assert not np.allclose(np.asarray(a[:, 12:]), np.asarray(b[:, 12:]))


@pytest.mark.slow
def test_dropout_only_with_a_key():
    model = GPT(GPTConfig(**{**TINY.to_dict(), "dropout": 0.3}), seed=0)
    ids = jnp.ones((2, 10), jnp.int32)
    np.testing.assert_array_equal(np.asarray(fwd(model, ids)), np.asarray(fwd(model, ids)))  # eval
    k1 = fwd(model, ids, jax.random.key(1))
    k2 = fwd(model, ids, jax.random.key(2))
    assert not np.allclose(np.asarray(k1), np.asarray(fwd(model, ids)))
    assert not np.allclose(np.asarray(k1), np.asarray(k2))


def test_cached_decode_equals_full_forward():
    model = GPT(TINY, seed=2)
    ids = jax.random.randint(jax.random.key(3), (2, 24), 0, 97)
    full = fwd(model, ids)
    cache = init_cache(TINY, 2)
    parts, cache_out = [], cache
    for chunk in (ids[:, :9], ids[:, 9:10], ids[:, 10:23], ids[:, 23:]):
        logits, cache_out = fwd_cached(model, chunk, cache_out)
        parts.append(logits)
    assert int(cache_out["index"]) == 24
    np.testing.assert_allclose(np.asarray(jnp.concatenate(parts, 1)), np.asarray(full), atol=1e-5)


def test_bfloat16_computes_in_bf16_but_keeps_float32_params():
    cfg = GPTConfig(**{**TINY.to_dict(), "dtype": "bfloat16"})
    model = GPT(cfg, seed=0)
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    ids = jnp.arange(16)[None] % 97
    lo, hi = fwd(model, ids), fwd(GPT(TINY, seed=0), ids)  # same init, different compute dtype
    assert lo.dtype == jnp.float32
    assert float(jnp.abs(lo - hi).max()) < 0.1 and not np.array_equal(np.asarray(lo), np.asarray(hi))


@pytest.mark.parametrize("kw,msg", [({"n_embd": 30, "n_head": 4}, "divisible"),
                                    ({"n_layer": 0}, "positive"), ({"dtype": "int8"}, "dtype")])
def test_bad_configs_are_rejected(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        GPTConfig(**{**TINY.to_dict(), **kw})
    with pytest.raises(ConfigError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_grads():
    """--remat recomputes activations in the backward pass: same numbers, less memory."""
    ids = jnp.arange(2 * 24).reshape(2, 24) % 97
    out = []
    for remat in (False, True):
        model = GPT(GPTConfig(**{**TINY.to_dict(), "dropout": 0.1, "remat": remat}), seed=0)
        graphdef, params = nnx.split(model)

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(ids[:, :-1], key=jax.random.key(3))  # dropout on
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

        out.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), (l1, g1) = out
    assert abs(float(l0) - float(l1)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.slow
def test_fused_attention_path_equals_the_masked_softmax(monkeypatch):
    """On a GPU in 16-bit the model calls jax.nn.dot_product_attention (cuDNN). Its plumbing
    (layouts, causal flag, scale) is checked here on CPU with the XLA implementation of the same
    call, in float32: logits and gradients equal the plain masked-softmax path, and the cached
    decode path does not take it."""
    import jaxgpt.model.gpt as model_mod

    ids = jnp.arange(2 * 24).reshape(2, 24) % 97
    calls = []

    def xla_fused(dtype):
        calls.append(dtype)
        return "xla"

    out = []
    for patch in (None, xla_fused):
        if patch:
            monkeypatch.setattr(model_mod, "fused_attention", patch)
        graphdef, params = nnx.split(GPT(TINY, seed=0))

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(ids[:, :-1])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

        logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ids)[0])(params)  # a fresh trace each time
        out.append((jax.jit(jax.value_and_grad(loss))(params), np.asarray(logits)))
    assert calls, "the patched selector was never consulted"
    ((l0, g0), y0), ((l1, g1), y1) = out
    np.testing.assert_allclose(y0, y1, atol=1e-5)
    assert abs(float(l0) - float(l1)) <= 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
