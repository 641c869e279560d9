"""The Llama family (GPTConfig.llama) against transformers' LlamaForCausalLM: HF folders and GGUF
files of every supported type loaded exact to the logits, exported back, decoded (full forward
== KV cache == the slot Engine == HF greedy), int8, LoRA, and trained (FSDP == data parallel,
remat) through the one trainer."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxgpt  # noqa: E402
from jaxgpt.model import lora  # noqa: E402
from jaxgpt.config import ConfigError, GPTConfig  # noqa: E402
from jaxgpt.decode.engine import Engine, Request  # noqa: E402
from jaxgpt.decode.generate import generate  # noqa: E402
from jaxgpt.model.gpt import GPT, init_cache  # noqa: E402

from conftest import TINY, random_adapter, run_cli  # noqa: E402
from llama_helpers import hf_llama, write_gguf  # noqa: E402

VARIANTS = {
    "gqa-tied": {},
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-rope": dict(num_key_value_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}, rope_theta=500000.0),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def ids_for(T, B=2, seed=0, V=96):
    return np.random.RandomState(seed).randint(0, V, (B, T)).astype(np.int32)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = hf_llama(seed=len(request.param), **VARIANTS[request.param])
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    model = hf_llama(seed=3)
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.slow
def test_hf_folder_logits_match_and_export_round_trips(variant, tmp_path):
    hf, folder = variant
    lm = jaxgpt.load(folder)
    assert lm.config.family == "llama" and lm.config.kv_heads == hf.config.num_key_value_heads
    ids = ids_for(40)
    np.testing.assert_allclose(lm.logits(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    lm.to_hf(tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == hf.config.num_key_value_heads
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    for name, t in hf.state_dict().items():  # every weight bit for bit
        if name in back.state_dict():
            assert torch.equal(back.state_dict()[name], t), name
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(hf, ids))


@pytest.mark.slow
def test_cached_decode_engine_and_hf_greedy_agree(tiny):
    hf, folder = tiny
    lm = jaxgpt.load(folder)
    prompt = ids_for(7, B=1, seed=5)
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), max_new_tokens=40, do_sample=False,
                           min_new_tokens=40).numpy()[0]  # crosses the cache's doublings
    for use_cache in (True, False):
        got = generate(lm.model, prompt, 40, temperature=0.0, use_cache=use_cache)
        np.testing.assert_array_equal(np.asarray(got)[0], want)
    # the slot engine: rows at different positions, one shared step, grouped-query KV cache
    engine = Engine(lm.model, slots=2, max_len=64)
    a = Request(prompt[0].tolist(), 40, temperature=0.0)
    b = Request(ids_for(3, B=1, seed=9)[0].tolist(), 12, temperature=0.0)
    engine.add(a)
    engine.step()
    engine.add(b)
    engine.run()
    assert a.tokens == want[7:].tolist()
    with torch.no_grad():
        want_b = hf.generate(torch.tensor([b.prompt]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12).numpy()[0, 3:]
    assert b.tokens == want_b.tolist()


@pytest.mark.slow
def test_kv_cache_holds_the_key_value_heads_only():
    cfg = GPTConfig.llama(vocab_size=50, block_size=32, n_layer=1, n_head=6, n_kv_head=2, n_embd=48)
    cache = init_cache(cfg, batch_size=3, max_len=16)
    assert cache["k"][0].shape == (3 * 2, 16, 8)
    model = GPT(cfg, seed=1)
    ids = jnp.asarray(ids_for(12, B=3, V=50))
    full = model(ids)[0]
    a, c = model(ids[:, :5], cache=cache)
    b, _ = model(ids[:, 5:], cache=c)
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, atol=1e-5)


@pytest.mark.slow
def test_int8_llama_close_to_float_and_round_trips(tiny, tmp_path):
    hf, folder = tiny
    lm = jaxgpt.load(folder)
    q = lm.quantize()
    ids = ids_for(30)
    f, i8 = lm.logits(ids), q.logits(ids)
    assert np.corrcoef(f.ravel(), i8.ravel())[0, 1] > 0.999
    assert np.mean(f.argmax(-1) == i8.argmax(-1)) > 0.9
    q.save(tmp_path / "q")
    np.testing.assert_array_equal(jaxgpt.load(tmp_path / "q", allow_int8=True).logits(ids), i8)
    out = q.generate(ids[:1], 10, temperature=0.0)  # the int8 decode path
    assert out.shape == (1, 40)


@pytest.mark.slow
def test_lora_on_llama_blocks_merges_exactly(tiny, tmp_path):
    hf, folder = tiny
    ad = random_adapter(folder, tmp_path / "ad", 4, ["c_attn", "c_fc"], seed=2)
    lm = jaxgpt.load(folder)
    lora.load_adapter(ad, lm.model)
    ids = ids_for(20)
    unmerged = np.asarray(lm.model(jnp.asarray(ids))[0])
    merged = jaxgpt.load(ad).logits(ids)
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    assert np.abs(merged - hf_logits(hf, ids)).max() > 1e-2  # the adapter changed the model


@pytest.mark.slow
@pytest.mark.parametrize("qtype,tol", [("F32", 1e-5), ("F16", 1e-5), ("BF16", 1e-5), ("Q8_0", 1e-5),
                                       ("Q4_0", 1e-5), ("Q4_1", 1e-5), ("Q5_0", 1e-5)])
def test_gguf_types_match_transformers_on_the_same_file(tiny, tmp_path, qtype, tol):
    hf, _ = tiny
    write_gguf(hf, tmp_path / "m.gguf", qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    lm = jaxgpt.load(tmp_path / "m.gguf")
    ids = ids_for(33)
    np.testing.assert_allclose(lm.logits(ids), hf_logits(ref, ids), atol=tol, rtol=0)
    if qtype == "F32":  # the file is the HF model itself: llama.cpp's q/k order undone
        np.testing.assert_allclose(lm.logits(ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_unsupported_llama_inputs_are_one_line_errors(tiny, tmp_path):
    hf, folder = tiny
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bias"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(ConfigError, match="attention_bias"):
        jaxgpt.load(bad)
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConfigError, match="architecture 'qwen2' is not supported") as e:
        jaxgpt.load(tmp_path / "q.gguf")
    assert "\n" not in str(e.value)


def losses(out) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in rows for k in ("train_loss", "val_loss") if k in r}


@pytest.mark.slow
def test_llama_trains_fsdp_equals_one_device_and_remat(corpus, tmp_path):
    args = ["--data", corpus, "--preset", "baby-llama", *TINY, "--max-iters", "20",
            "--eval-interval", "10", "--log-interval", "5"]
    one = run_cli("jaxgpt.train", *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    four = run_cli("jaxgpt.train", *args, "--out", tmp_path / "four", "--mesh", "data=2,fsdp=2", "--remat",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert a.keys() == b.keys() and len(a) >= 5
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5
    assert a[(20, "val_loss")] < a[(10, "val_loss")] or a[(20, "train_loss")] < 4.0
