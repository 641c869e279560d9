"""Perplexity evaluation: window layout, agreement with transformers' loss, the eval CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.evaluate import scoring as ev  # noqa: E402

torch.set_num_threads(2)
L = 16  # the tiny model's context


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=L)).eval()
    model.save_pretrained(root / "hf")
    return model, root / "hf"


def test_windows_layout():
    # non-overlapping: [0,16) [16,32) [32,40); each scores its length - 1 tokens
    assert ev.windows(40, 16) == [(0, 16, 1), (16, 32, 17), (32, 40, 33)]
    assert ev.windows(33, 16) == [(0, 16, 1), (16, 32, 17)]  # a lone last token is not a window
    # stride = context: the non-overlapping layout (a window's first token is never predicted)
    assert ev.windows(40, 16, 16) == ev.windows(40, 16)
    # sliding: every position but the first scored exactly once, each with <= 16 tokens of window
    for n, stride in [(40, 5), (40, 15), (16, 3), (100, 1)]:
        scored = []
        for start, end, score_from in ev.windows(n, 16, stride):
            assert end - start <= 16 and start < score_from
            scored += range(score_from, end)
        assert scored == list(range(1, n)), (n, stride)


def hf_window_loss(model, ids, wins):
    """Mean NLL of the scored tokens, with transformers computing each window's loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end, score_from in wins:
            x = torch.tensor(ids[start:end])[None]
            labels = x.clone()
            labels[0, : score_from - start] = -100  # HF shifts labels; -100 = not scored
            n = int((labels[0, 1:] != -100).sum())
            total += model(x, labels=labels).loss.item() * n
            count += n
    return total / count, count


@pytest.mark.slow
@pytest.mark.parametrize("stride", [None, 5])
def test_loss_matches_transformers(tiny, stride):
    model, folder = tiny
    lm = jaxgpt.load(folder)
    ids = np.random.RandomState(0).randint(0, 50257, 53)
    got = ev.evaluate(lm.model, ids, stride=stride)
    want, n = hf_window_loss(model, ids, ev.windows(len(ids), L, stride))
    assert got["tokens"] == n == (49 if stride is None else 52)
    assert abs(got["loss"] - want) < 1e-4
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))


def test_one_compile_for_any_length(tiny):
    lm = jaxgpt.load(tiny[1])
    ev._token_scores.clear_cache()
    for n in (7, 40, 123):
        ev.evaluate(lm.model, np.arange(n) % 50257, batch_size=4)
    assert ev._token_scores._cache_size() == 1


@pytest.mark.slow
def test_cli(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxgpt.eval", str(tiny[1]), *a],
                                    capture_output=True, text=True, env=env, timeout=120)
    p = run("--text", str(text), "--json", "--stride", "4")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    ids = jaxgpt.get_tokenizer("gpt2").encode(text.read_text())
    want, n = hf_window_loss(tiny[0], ids, ev.windows(len(ids), L, 4))
    assert got["tokens"] == n == len(ids) - 1 and abs(got["loss"] - want) < 1e-4
    for bad, needle in [(["--text", str(text), "--stride", "0"], "--stride"),
                        (["--text", str(tmp_path / "missing.txt")], "missing.txt")]:
        p = run(*bad)
        assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert needle in p.stderr
