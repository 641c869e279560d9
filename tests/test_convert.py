"""Conversion HF GPT-2 / nanoGPT <-> jaxgpt: logits parity with transformers, round trips, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.formats.hf import rename_table  # noqa: E402
from conftest import cli  # noqa: E402

torch.set_num_threads(2)
TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32)  # GPT-2 vocabulary, tiny body


def hf_model(seed=0, **shape):
    """A randomly initialised GPT2LMHeadModel (float32, eval mode)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**shape)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and LayerNorm params non-trivial, so a mix-up shows
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def save_bin(model, folder):
    """A legacy HF folder: config.json + pytorch_model.bin with the old `h.0...` key spelling and
    the causal-mask buffers that old GPT-2 checkpoints carry."""
    folder.mkdir(parents=True)
    model.config.to_json_file(str(folder / "config.json"))
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, folder / "pytorch_model.bin")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, safetensors folder, .bin folder) for the tiny shape."""
    root = tmp_path_factory.mktemp("tiny")
    model = hf_model(**TINY)
    model.save_pretrained(root / "st")
    save_bin(model, root / "bin")
    return model, root / "st", root / "bin"


def ids_for(T, B=2, seed=0):
    return np.random.RandomState(seed).randint(0, 50257, (B, T))


@pytest.mark.slow
def test_rename_table_covers_hf_parameters(tiny):
    model, _, _ = tiny
    cfg = jaxgpt.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    hf_names = {k.removeprefix("transformer.") for k, _ in model.named_parameters()} - {"lm_head.weight"}
    table = rename_table(cfg)
    assert {e.hf for e in table} == hf_names
    shapes = {k.removeprefix("transformer."): tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(shapes[e.hf] == e.shape for e in table)  # Conv1D [in, out] == our kernel layout


@pytest.mark.parametrize("fmt", ["st", "bin"])
def test_tiny_logits_match_transformers(tiny, fmt):
    model, st, binary = tiny
    lm = jaxgpt.load(st if fmt == "st" else binary)
    ids = ids_for(32)  # the full context
    assert np.abs(lm.logits(ids) - hf_logits(model, ids)).max() <= 1e-4


@pytest.mark.slow
def test_gpt2_124m_logits_match_transformers(tmp_path):
    """The real GPT-2 small shape (random weights), from safetensors and from pytorch_model.bin."""
    model = hf_model(seed=1)  # GPT2Config() defaults = gpt2 124M
    model.save_pretrained(tmp_path / "st")
    save_bin(model, tmp_path / "bin")
    ids = ids_for(12, B=1, seed=1)
    ref = hf_logits(model, ids)
    for folder in ("st", "bin"):
        lm = jaxgpt.load(tmp_path / folder)
        assert (lm.config.n_layer, lm.config.n_embd, lm.config.block_size) == (12, 768, 1024)
        assert np.abs(lm.logits(ids) - ref).max() <= 1e-4, folder


def test_round_trip_hf_jaxgpt_hf(tiny, tmp_path):
    model, st, _ = tiny
    ids = ids_for(20)
    lm = jaxgpt.load(st)
    lm.save(tmp_path / "jx")
    lm2 = jaxgpt.load(tmp_path / "jx")
    assert lm2.meta["source_format"] == "huggingface" and lm2.tokenizer is not None
    lm2.to_hf(tmp_path / "hf")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(hf_logits(back, ids) - hf_logits(model, ids)).max() <= 1e-5
    for name, p in model.state_dict().items():  # bit-identical weights, buffers aside
        if not name.endswith(("attn.bias", "attn.masked_bias")):
            assert torch.equal(p, back.state_dict()[name]), name
    # the GPT-2 tokenizer files travel along, so transformers can tokenize too
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode("Hello world") == lm.tokenizer.encode("Hello world")


def test_checkpoint_step_dir_and_no_opt_state(tiny, tmp_path):
    _, st, _ = tiny
    jaxgpt.load(st).save(tmp_path / "jx")
    assert not (tmp_path / "jx" / "checkpoints" / "0" / "opt_state").exists()
    lm = jaxgpt.load(tmp_path / "jx" / "checkpoints" / "0")  # a step dir works too
    assert lm.config.n_embd == 32


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_ckpt(tiny, tmp_path, bias):
    """nanoGPT's ckpt.pt: nn.Linear weights [out, in] (transposed), '_orig_mod.' from torch.compile.
    nanoGPT's MLP is nn.GELU() (exact, erf): the HF reference is activation_function "gelu"."""
    model = hf_model(**TINY, activation_function="gelu")
    sd = {}
    for k, v in model.state_dict().items():
        if not bias and k.endswith("bias"):
            continue
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t().contiguous()  # Conv1D [in, out] -> nn.Linear [out, in]
        sd["_orig_mod." + k] = v
    if not bias:
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if k.endswith("bias"):
                    p.zero_()
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=bias, vocab_size=50257, dropout=0.0)
    torch.save({"model": sd, "model_args": args, "iter_num": 7, "best_val_loss": 3.0,
                "optimizer": {"state": {}, "param_groups": []}, "config": {"dataset": "owt"}},
               tmp_path / "ckpt.pt")
    lm = jaxgpt.load(tmp_path)  # a folder holding ckpt.pt
    ids = ids_for(16)
    assert np.abs(lm.logits(ids) - hf_logits(model, ids)).max() <= 1e-4


# ---- GPT2Config variants: every field that changes the math -------------------------------------
ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast", "quick_gelu", "relu", "silu")
VARIANTS = {
    **{f"act_{a}": dict(activation_function=a) for a in ACTS},
    "n_inner_48": dict(n_inner=48),  # 1.5C instead of 4C
    "no_scale_attn_weights": dict(scale_attn_weights=False),
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "untied_lm_head": dict(tie_word_embeddings=False),
    "all_at_once": dict(activation_function="gelu", n_inner=80, scale_attn_weights=False,
                        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                        tie_word_embeddings=False),
}
# weights scaled up from GPT-2's init (std 0.02) so that activations and scores leave the
# near-linear range: then a wrong activation or scale moves the logits by >> the 1e-4 tolerance
BOOST = {"wte.weight": 10, "lm_head.weight": 10, "c_fc.weight": 10, "mlp.c_proj.weight": 10,
         "attn.c_attn.weight": 5}


def hf_variant(seed=0, **fields):
    """A random GPT2LMHeadModel of the TINY shape with these GPT2Config fields, weights boosted."""
    model = hf_model(seed, **TINY, **fields)
    with torch.no_grad():
        for name, p in model.named_parameters():
            for suffix, factor in BOOST.items():
                if name.endswith(suffix):
                    p.mul_(factor)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(fields, HF model, its safetensors folder) for each entry of VARIANTS."""
    fields = VARIANTS[request.param]
    model = hf_variant(**fields)
    folder = tmp_path_factory.mktemp(request.param) / "st"
    model.save_pretrained(folder)
    return fields, model, folder


def test_activations_match_transformers():
    """Each activation jaxgpt implements is transformers' ACT2FN of the same name (all of them,
    not only the ones the model tests below run end to end)."""
    from transformers.activations import ACT2FN

    from jaxgpt.config import ACTIVATIONS
    from jaxgpt.model.gpt import ACTIVATION_FNS

    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    for name in ACTIVATIONS:
        ref = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(ACTIVATION_FNS[name](x)), ref, atol=2e-6, rtol=1e-5,
                                   err_msg=name)


@pytest.mark.slow
def test_variant_logits_match_transformers_and_round_trip(variant, tmp_path):
    """Logits equal GPT2LMHeadModel's (<= 1e-4); jaxgpt -> HF writes the fields back (config.json)
    and reproduces the model bit for bit; a jaxgpt checkpoint keeps them too."""
    fields, model, folder = variant
    lm = jaxgpt.load(folder)
    for key, value in fields.items():
        assert getattr(lm.config, key) == value, key
    ids = ids_for(32)
    ref = hf_logits(model, ids)
    assert np.abs(lm.logits(ids) - ref).max() <= 1e-4
    lm.to_hf(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: written[k] for k in fields} == fields
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    for key, value in fields.items():
        assert getattr(back.config, key) == value, key
    assert np.abs(hf_logits(back, ids) - ref).max() <= 1e-5
    sd = back.state_dict()
    for name, p in model.state_dict().items():  # bit-identical weights (lm_head too), buffers aside
        if not name.endswith(("attn.bias", "attn.masked_bias")):
            assert torch.equal(p, sd[name]), name
    if not fields.get("tie_word_embeddings", True):  # a real untied head, kept untied
        assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    lm.save(tmp_path / "jx")
    again = jaxgpt.load(tmp_path / "jx")
    assert again.config == lm.config
    assert np.abs(again.logits(ids) - ref).max() <= 1e-4


@pytest.mark.parametrize("fields", [dict(activation_function="gelu"), dict(scale_attn_weights=False),
                                    dict(scale_attn_by_inverse_layer_idx=True)], ids=str)
def test_variant_fields_change_the_logits(fields):
    """The parity tests above can tell: with the same weights under GPT-2's default for the field,
    the logits move by far more than their 1e-4 tolerance. (n_inner changes the weight shapes;
    reorder_and_upcast_attn is a precision option, the same math in float32; the untied head has
    weights of its own.)"""
    import dataclasses

    from jaxgpt.formats.load import LoadedModel
    from jaxgpt.formats.hf import config_from_hf, model_from_tensors

    model = hf_variant(**fields)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = config_from_hf(model.config.to_dict(), "test")
    default = dataclasses.replace(cfg, **{k: jaxgpt.GPTConfig.__dataclass_fields__[k].default
                                          for k in fields})
    ids = ids_for(32)
    wrong = LoadedModel(model_from_tensors(default, tensors, "test"), None, {})
    assert np.abs(wrong.logits(ids) - hf_logits(model, ids)).max() > 1e-3


def test_untied_head_params_and_init_order():
    """An untied config adds one parameter, lm_head.kernel [C, V] (no bias); every other parameter
    is drawn exactly as for the tied default, so default configs train as before."""
    from flax import nnx

    from jaxgpt.model.gpt import GPT

    tied_cfg = jaxgpt.GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    untied_cfg = jaxgpt.GPTConfig(**{**tied_cfg.to_dict(), "tie_word_embeddings": False})
    flat = lambda m: {p: np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    tied, untied = flat(GPT(tied_cfg, seed=3)), flat(GPT(untied_cfg, seed=3))
    assert set(untied) - set(tied) == {("lm_head", "kernel")}
    assert untied[("lm_head", "kernel")].shape == (32, 97)
    for path, x in tied.items():
        np.testing.assert_array_equal(untied[path], x, err_msg=str(path))


@pytest.mark.slow
def test_untied_greedy_generate_matches_transformers(tmp_path):
    """Greedy decoding picks tokens through lm_head, not wte: the same ids as HF's generate for a
    batch of 2 (full head), batch 1 through the decode copy (the int8 screen of lm_head's table),
    batch 1 without the decode copy, and without a cache."""
    from jaxgpt.decode.sample import _DERIVED, generate

    model = hf_model(**TINY, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "st")
    lm = jaxgpt.load(tmp_path / "st")
    n = 20

    def hf_greedy(prompt):
        with torch.no_grad():
            return model.generate(torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=50256,
                                  attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()

    prompt2 = ids_for(5, B=2, seed=1)
    np.testing.assert_array_equal(np.asarray(generate(lm.model, prompt2, n, temperature=0.0)),
                                  hf_greedy(prompt2))
    prompt1 = ids_for(7, B=1, seed=2)
    ref = hf_greedy(prompt1)
    fast = np.asarray(generate(lm.model, prompt1, n, temperature=0.0, fast_decode=True))
    table = _DERIVED[("kernel.T", id(lm.model.lm_head.kernel[...]))][1]  # lm_head as [V, C]
    assert ("screen", id(table)) in _DERIVED  # the screen of lm_head's table was used
    for out in (fast, generate(lm.model, prompt1, n, temperature=0.0, fast_decode=False),
                generate(lm.model, prompt1, n, temperature=0.0, use_cache=False)):
        np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.slow
@pytest.mark.parametrize("embedding", [True, False])
def test_untied_head_int8(embedding, tmp_path):
    """int8 quantization of an untied model: lm_head goes int8 with the embedding (one scale per
    vocabulary row) or stays float32; the logits stay close to the float model's."""
    from jaxgpt.model.gpt import Int8Linear

    model = hf_model(**TINY, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "st")
    lm = jaxgpt.load(tmp_path / "st")
    q = lm.quantize(embedding=embedding)
    assert (type(q.model.lm_head) is Int8Linear) == embedding
    ids = ids_for(16)
    ref = lm.logits(ids)
    assert np.abs(q.logits(ids) - ref).max() <= 0.02 * np.abs(ref).max()
    q.save(tmp_path / "q")
    again = jaxgpt.load(tmp_path / "q", allow_int8=True)
    np.testing.assert_array_equal(again.logits(ids), q.logits(ids))


def test_reorder_and_upcast_attn_scores_in_float32():
    """In 16-bit compute, reorder_and_upcast_attn makes q.k (the [B, H, T, S] scores) a float32
    product, in the full forward and in cached decoding; without it the scores are bfloat16."""
    import jax
    import jax.numpy as jnp

    from jaxgpt.model.gpt import GPT, init_cache

    def score_dtypes(cfg):
        model, ids = GPT(cfg), jnp.zeros((2, 8), jnp.int32)
        cache = init_cache(cfg, 2, 16)
        dtypes = set()

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] in (8, 16) \
                        and eqn.outvars[0].aval.shape[-2] == 8:  # [.., T, T] or [.., T, S]
                    dtypes.add(str(eqn.invars[0].aval.dtype))
                for sub in eqn.params.values():  # nested jaxprs (pjit, custom_jvp, ...)
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        walk(getattr(sub, "jaxpr", sub))

        walk(jax.make_jaxpr(lambda x: model(x))(ids).jaxpr)
        walk(jax.make_jaxpr(lambda x, c: model(x, cache=c))(ids, cache).jaxpr)
        return dtypes

    cfg = jaxgpt.GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=48,
                           dtype="bfloat16")  # head_dim 24: att @ v is [.., 8, 24], not matched
    assert score_dtypes(cfg) == {"bfloat16"}
    assert score_dtypes(jaxgpt.GPTConfig(**{**cfg.to_dict(), "reorder_and_upcast_attn": True})) \
        == {"float32"}


@pytest.mark.parametrize("key,value,needles", [
    ("activation_function", "mish_xl", ["activation_function='mish_xl'"]),
    ("activation_function", "xielu", ["activation_function='xielu'"]),
    ("add_cross_attention", True, ["add_cross_attention=true"]),
    ("n_inner", -8, ["n_inner", "-8"]),
    ("scale_attn_weights", "yes", ["scale_attn_weights", "'yes'"]),
])
def test_unsupported_config_values_are_one_line_errors(key, value, needles):
    from jaxgpt.config import ConfigError
    from jaxgpt.formats.hf import config_from_hf

    hf = {**transformers.GPT2Config(**TINY).to_dict(), key: value}
    with pytest.raises(ConfigError) as e:
        config_from_hf(hf, "x/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x/config.json: ")
    for needle in needles:
        assert needle in msg, msg


# ---- CLI ---------------------------------------------------------------------------------------
def run(*args, env=None):
    """Run a jaxgpt CLI in a subprocess; (returncode, stdout, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_clean_failure(rc, out, err, *needles):
    """Exit 2, one line on stderr saying what is wrong, nothing on stdout."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_cli_both_directions(tiny, tmp_path):
    model, st, _ = tiny
    rc, _, err = run("jaxgpt.convert", str(st), str(tmp_path / "jx"))
    assert rc == 0, err
    rc, _, err = run("jaxgpt.convert", "--to-hf", str(tmp_path / "jx"), str(tmp_path / "hf"))
    assert rc == 0, err
    ids = ids_for(10)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(hf_logits(back, ids) - hf_logits(model, ids)).max() <= 1e-5
    # onto a non-empty folder: refused without --force (untouched), replaced with it
    marker = tmp_path / "hf" / "config.json"
    rc, out, err = run("jaxgpt.convert", "--to-hf", str(tmp_path / "jx"), str(tmp_path / "hf"))
    assert_clean_failure(rc, out, err, "--force")
    rc, _, err = run("jaxgpt.convert", "--to-hf", "--force", str(tmp_path / "jx"), str(tmp_path / "hf"))
    assert rc == 0 and marker.exists(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "jx"]  # no temp dirs left behind


def _broken_folders(tiny, root):
    """name -> (folder, words the error line must contain)."""
    model, st, _ = tiny
    cases = {}

    def hf_folder(name, tensors=None, config=None):
        from safetensors.numpy import save_file
        d = root / name
        d.mkdir()
        cfg = {**json.loads((st / "config.json").read_text()), **(config or {})}
        (d / "config.json").write_text(json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    good = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cases["no_weights"] = (hf_folder("no_weights"), ["no weights"])
    (root / "empty").mkdir()
    cases["empty"] = (root / "empty", ["no weights"])
    trunc = hf_folder("truncated")
    data = (st / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (trunc, ["model.safetensors"])
    bad = dict(good)
    bad["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
    cases["shape"] = (hf_folder("shape", bad), ["h.1.mlp.c_fc.weight", "shape"])
    missing = {k: v for k, v in good.items() if k != "transformer.h.0.ln_2.bias"}
    cases["missing"] = (hf_folder("missing", missing), ["missing tensor h.0.ln_2.bias"])
    extra = {**good, "transformer.h.0.attn.q_norm.weight": np.zeros(32, np.float32)}
    cases["unexpected"] = (hf_folder("unexpected", extra), ["h.0.attn.q_norm.weight"])
    cases["arch"] = (hf_folder("arch", good, {"model_type": "bert"}), ["model_type", "bert", "gpt2 and llama"])
    cases["act"] = (hf_folder("act", good, {"activation_function": "xielu"}),
                    ["activation_function", "xielu"])  # learned parameters: not implemented
    cases["cross"] = (hf_folder("cross", good, {"add_cross_attention": True}),
                      ["add_cross_attention=true"])
    return cases


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name, (folder, needles) in _broken_folders(tiny, src).items():
        r = cli("jaxgpt.convert", folder, dst / name)  # (in this process: a refusal needs no interpreter of its own)
        assert_clean_failure(r.returncode, r.stdout, r.stderr, *needles)
    # an unknown hub name, offline (a subprocess: HF_HUB_OFFLINE is read when huggingface_hub is imported)
    rc, out, err = run("jaxgpt.convert", "no-such-model-xyz", str(dst / "hub"))
    assert_clean_failure(rc, out, err, "no-such-model-xyz", "local folder")
    assert list(dst.iterdir()) == []  # nothing written, not even temp dirs
