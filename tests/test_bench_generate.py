"""experiments/bench_generate.py runs end to end on a tiny shape and its pieces count right (no timing asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # servers, processes or the real model: the slow tier

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_generate"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_generate", None)


def test_weight_params_gpt2_small(bench):
    layer, head = bench.weight_params(12, 768, 50257)
    assert layer == 84_934_656 and head == 38_597_376  # 123.5M: what one decode step reads


def test_roofline_fractions(bench):
    impl = bench.Impl("x", None, 4, True)
    row = dict(mode="greedy", batch=2, impl=impl, tps=[20.0])  # step = 2 / 20 = 0.1 s
    fb, fc = bench.roofline(row, (1e9, 1e9), (10**7, 0))
    assert fb == pytest.approx(4e7 / 0.1 / 1e9) and fc == pytest.approx(2 * 10**7 * 2 / 0.1 / 1e9)


def test_tokenizer_matches_gpt2_bpe(bench):
    tok = bench.hf_tokenizer()
    assert len(tok) == 50257 and tok.encode("Hello world, this is") == [15496, 995, 11, 428, 318]


def test_tiny_run_prints_one_table(bench, capsys):
    bench.main(["--tiny", "--new", "4", "--repeats", "1", "--prefill", "32", "--batches", "1,2",
                "--profile-reps", "2"])
    out = capsys.readouterr().out
    assert "memory-read bandwidth" in out and "GFLOP/s" in out
    main_table = out.split("\n\n")[0]  # (the per-part profile follows after a blank line)
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows]
    names = {tuple(c[:3]) for c in cells}
    for batch in ("1", "2"):
        assert (batch, "greedy", "jaxgpt float32") in names and (batch, "sampled", "jaxgpt int8") in names
        assert (batch, "greedy", "HF generate") in names
    assert ("1", "prefill 32", "jaxgpt int8") in names
    ran = [c for c in cells if not c[3].startswith("skipped")]  # (peers that are not installed)
    greedy = [c for c in ran if c[1] == "greedy"]
    assert all(c[-1] == "same ids as HF: yes" for c in greedy if c[2].endswith("float32"))
    assert all(c[-1].startswith("agree ") for c in greedy if c[2].endswith("int8"))
    assert all(c[-1].endswith("x greedy") for c in ran if c[1] == "sampled")
    assert all(c[3].startswith("skipped (") for c in cells if c not in ran)
    assert "One greedy decode step by part" in out and "| jaxgpt int8 | 2 |" in out
    if "ctranslate2" in sys.modules:
        assert ("2", "sampled", "CTranslate2 int8") in names
    assert "jax compiling inside the timed rounds: 0.0 s" in out


def test_no_peers_rows_say_skipped(bench, capsys):
    bench.main(["--tiny", "--new", "2", "--repeats", "1", "--prefill", "0", "--batches", "1",
                "--no-sampled", "--no-peers", "--no-profile"])
    out = capsys.readouterr().out
    assert "| 1 | greedy | CTranslate2 int8 | skipped (--no-peers) |" in out
    assert "same ids as HF: yes" in out
