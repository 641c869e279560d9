"""Data: tokenized once into cached .bin memmaps, reused when unchanged; batches; tokenizers."""

import numpy as np
import pytest

from jaxgpt.config import ConfigError
from jaxgpt.data.textfile import get_batch, prepare, step_rng
from jaxgpt.tokenizers.tokenizer import get_tokenizer


def test_cache_is_built_once_and_reused(corpus, tmp_path):
    d1 = prepare(str(corpus), "char", tmp_path / "cache", block_size=32)
    bins = sorted((tmp_path / "cache").iterdir())
    assert [p.name for p in bins] == ["meta.json", "train.bin", "val.bin"]
    mtimes = [p.stat().st_mtime_ns for p in bins]
    d2 = prepare(str(corpus), "char", tmp_path / "cache", block_size=32)
    assert [p.stat().st_mtime_ns for p in bins] == mtimes  # reused, not rewritten
    np.testing.assert_array_equal(d1.train, d2.train)
    # 90/10 split of the whole stream, char ids round-trip to the text
    text = corpus.read_text()
    assert len(d1.train) == int(len(text) * 0.9) and len(d1.train) + len(d1.val) == len(text)
    assert d1.tokenizer.decode(d1.train[:200]) == text[:200]
    assert d1.train.dtype == np.uint16


def test_cache_is_rebuilt_when_the_source_changes(corpus, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(corpus.read_text()[:5000])
    a = prepare(str(src), "char", tmp_path / "cache", block_size=8)
    src.write_text(corpus.read_text()[:5000].upper())
    b = prepare(str(src), "char", tmp_path / "cache", block_size=8)
    assert b.tokenizer.decode(b.train[:50]) == corpus.read_text()[:50].upper()
    assert a.tokenizer.chars != b.tokenizer.chars


def test_gpt2_tokenized_cache(corpus, tmp_path):
    d = prepare(str(corpus), "gpt2", tmp_path / "cache", block_size=32)
    tok = get_tokenizer("gpt2")
    ids = tok.encode(corpus.read_text())
    assert list(d.train[:100]) == ids[:100] and len(d.train) + len(d.val) == len(ids)


def test_batches_are_shifted_windows_and_seeded(corpus, tmp_path):
    d = prepare(str(corpus), "char", tmp_path / "cache", block_size=16)
    x, y = get_batch(d.train, 16, 5, step_rng(7, 3))
    assert x.shape == y.shape == (5, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    x2, _ = get_batch(d.train, 16, 5, step_rng(7, 3))
    x3, _ = get_batch(d.train, 16, 5, step_rng(7, 4))
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)


@pytest.mark.parametrize("content,msg", [(b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8"),
                                         (b"too short", "too short")])
def test_bad_corpora(tmp_path, content, msg):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(ConfigError, match=msg):
        prepare(str(src), "char", tmp_path / "cache", block_size=32)
    assert not (tmp_path / "cache").exists()
