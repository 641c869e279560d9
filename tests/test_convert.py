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
from jaxgpt.convert import rename_table  # noqa: E402

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
    """nanoGPT's ckpt.pt: nn.Linear weights [out, in] (transposed), '_orig_mod.' from torch.compile."""
    model = hf_model(**TINY)
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
    cases["arch"] = (hf_folder("arch", good, {"model_type": "llama"}), ["model_type", "llama"])
    cases["act"] = (hf_folder("act", good, {"activation_function": "relu"}), ["relu"])
    return cases


def test_cli_bad_inputs_exit_2_and_write_nothing(tiny, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name, (folder, needles) in _broken_folders(tiny, src).items():
        rc, out, err = run("jaxgpt.convert", str(folder), str(dst / name))
        assert_clean_failure(rc, out, err, *needles)
    # an unknown hub name, offline
    rc, out, err = run("jaxgpt.convert", "no-such-model-xyz", str(dst / "hub"))
    assert_clean_failure(rc, out, err, "no-such-model-xyz", "local folder")
    assert list(dst.iterdir()) == []  # nothing written, not even temp dirs
