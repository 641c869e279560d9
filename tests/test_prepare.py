"""jaxgpt.prepare (sources -> llm.c shards) and jaxgpt.data.shards.ShardDataset (windows, batches)."""

import gzip
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data import prepare as prep
from jaxgpt.config import ConfigError
from jaxgpt.data.shards import MANIFEST, STATE, ShardDataset, read_header, read_shard, write_shard
from jaxgpt.tokenizers.tokenizer import get_tokenizer, tokenizer_from_dict

REPO = Path(__file__).resolve().parents[1]
SHAKES = (REPO / "jaxgpt" / "assets" / "tinyshakespeare.txt").read_text()
EOT = 50256
ENC = get_tokenizer("gpt2").enc
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None
SMALL = dict(shard_tokens=1000, val_tokens=700, piece_chars=700)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 1500)  # many worker tasks in flight


def _write_corpus(root: Path) -> tuple[list[str], list[str]]:
    """Every kind of source; returns (SOURCE args, the documents in stream order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = SHAKES
    docs = []
    (root / "texts" / "nested").mkdir(parents=True)
    t = {"texts/a.txt": s[:3000],
         "texts/b.txt": "unicode: héllo wörld 你好 🙂\n\n  spaces\t\ttabs\r\n" + s[3000:4200],
         "texts/nested/c.txt": s[4200:4300] + " <|endoftext|> is plain text here\n"}
    for name, text in t.items():
        (root / name).write_text(text)
        docs.append(text)
    recs = [s[5000 + 400 * i:5000 + 400 * i + 50 + 97 * i] for i in range(5)] + [""]
    (root / "r.jsonl").write_text("".join(json.dumps({"id": i, "text": r}) + "\n"
                                          for i, r in enumerate(recs)))
    docs += recs
    rows = [s[8000:11000], "short", s[11000:11500]]
    pq.write_table(pa.table({"text": rows, "n": [1, 2, 3]}), root / "p.parquet", row_group_size=2)
    docs += rows
    gz_text = s[12000:14500]
    with gzip.open(root / "g.txt.gz", "wt") as f:
        f.write(gz_text)
    docs.append(gz_text)
    gz_recs = [s[15000:15300], s[15300:17900]]
    with gzip.open(root / "g.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": r}) + "\n" for r in gz_recs)
    docs += gz_recs
    zs = [s[18000:18700], s[18700:18800]]
    if HAVE_ZSTD:  # zstandard is in the optional `data` extra
        import zstandard
        (root / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": r}) + "\n" for r in zs).encode()))
        docs += zs
    arr = [s[19000:19400], s[19400:21000]]
    (root / "arr.json").write_text(json.dumps([{"text": r} for r in arr]))
    docs += arr
    srcs = [str(root / "texts"), str(root / "r.jsonl"), str(root / "p.parquet"),
            str(root / "g.*.gz"), str(root / "z.jsonl.zst"), str(root / "arr.json")]
    srcs = [x for x in srcs if HAVE_ZSTD or not x.endswith(".zst")]
    # the glob g.*.gz sorts g.jsonl.gz before g.txt.gz
    docs = docs[:12] + gz_recs + [gz_text] + docs[15:]
    return srcs, docs


def _expected(docs) -> np.ndarray:
    return np.concatenate([[EOT] + ENC.encode_ordinary(d) for d in docs]).astype(np.uint16)


def _stream(out) -> np.ndarray:
    m = json.loads((Path(out) / MANIFEST).read_text())
    return np.concatenate([read_shard(Path(out) / s["file"]) for s in m["shards"]])


def _shas(out) -> list[str]:
    return [s["sha256"] for s in json.loads((Path(out) / MANIFEST).read_text())["shards"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return _write_corpus(root)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted 1-worker preparation of the mixed corpus."""
    out = tmp_path_factory.mktemp("ref") / "out"
    prep.CHUNK_CHARS, old = 1500, prep.CHUNK_CHARS
    try:
        m = prep.prepare(corpus[0], out, workers=1, **SMALL)
    finally:
        prep.CHUNK_CHARS = old
    return out, m


# ----------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("workers,backend", [(1, "threads"), (3, "threads"), (3, "processes")])
def test_tokens_are_encode_ordinary_with_eot(corpus, reference, tmp_path, workers, backend):
    srcs, docs = corpus
    m = prep.prepare(srcs, tmp_path / "out", workers=workers, backend=backend, **SMALL)
    np.testing.assert_array_equal(_stream(tmp_path / "out"), _expected(docs))
    assert m["documents"] == len(docs)
    assert m["tokenizer"]["name"] == "gpt2" and m["sources"] == srcs
    splits = [s["split"] for s in m["shards"]]
    assert splits[0] == "val" and set(splits[1:]) == {"train"} and len(splits) > 4
    assert m["shards"][0]["tokens"] == 700 and all(
        s["tokens"] == 1000 for s in m["shards"][1:-1])
    assert _shas(tmp_path / "out") == _shas(reference[0])  # the same output for any --workers
    assert not (tmp_path / "out" / STATE).exists()
    ds = ShardDataset(tmp_path / "out")
    assert ds.vocab_size == 50257 and ds.eot_token == EOT
    assert ds.val.tokens == 700 and ds.train.tokens == len(_expected(docs)) - 700


def test_long_document_pieces_tokenize_exactly(tmp_path):
    # cuts of a long document (1 KB pieces of a 60 KB text file with odd whitespace)
    text = (SHAKES[:30000] + "  \n\n\t x\xa0y  z\r\n\r\nab'  s   don't  \u3000 q 12 345" * 200
            + SHAKES[-10000:])
    (tmp_path / "long.txt").write_text(text)
    prep.prepare([tmp_path / "long.txt"], tmp_path / "o", workers=2, shard_tokens=5000,
                 val_tokens=0, piece_chars=1000)
    np.testing.assert_array_equal(_stream(tmp_path / "o"), _expected([text]))


def test_char_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text('{"text": "dlrow"}\n{"text": "ab"}\n')
    m = prep.prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "o",
                     tokenizer="char", shard_tokens=8, val_tokens=4)
    chars = sorted(set("hello world\ndlrowab"))
    tok = m["tokenizer"]
    assert tok["chars"] == "".join(chars) and tok["eot_token"] == len(chars)
    assert tok["vocab_size"] == len(chars) + 1
    ids = lambda s: [chars.index(c) for c in s]  # noqa: E731
    e = len(chars)
    want = [e] + ids("hello world\n") + [e] + ids("dlrow") + [e] + ids("ab")
    assert _stream(tmp_path / "o").tolist() == want
    ds = ShardDataset(tmp_path / "o")
    assert ds.vocab_size == len(chars) + 1
    assert tokenizer_from_dict(ds.tokenizer).decode(want[1:13]) == "hello world\n"


@pytest.mark.slow
def test_kill_and_rerun_gives_identical_shards(corpus, reference, tmp_path):
    """SIGKILL right after the second shard is recorded, then run again: same bytes."""
    srcs, _ = corpus
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from jaxgpt.data import prepare as p\n"
        "p.CHUNK_CHARS = 1500\n"
        "def kill(entry):\n"
        "    if entry['index'] == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"p.prepare({srcs!r}, {str(out)!r}, workers=2, on_shard=kill, "
        f"shard_tokens=1000, val_tokens=700, piece_chars=700)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    state = json.loads((out / STATE).read_text())
    assert [s["file"] for s in state["shards"]] == ["val_000000.bin", "train_000001.bin"]
    assert not (out / MANIFEST).exists()
    kept = (out / "val_000000.bin").stat().st_mtime_ns
    m = prep.prepare(srcs, out, workers=3, **SMALL)  # another worker count, too
    assert _shas(out) == _shas(reference[0])
    assert (out / "val_000000.bin").stat().st_mtime_ns == kept  # kept, not rewritten
    assert m["documents"] == reference[1]["documents"]
    assert (out / MANIFEST).read_bytes() == (reference[0] / MANIFEST).read_bytes()


def test_interrupt_mid_document_then_resume(corpus, reference, tmp_path):
    """An exception after 4 shards (a document spans the boundary), and a shard written but not
    yet recorded when the run died: the rerun rewrites it and ends byte-identical."""
    srcs, _ = corpus
    out = tmp_path / "out"

    def boom(entry):
        if entry["index"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prep.prepare(srcs, out, workers=2, on_shard=boom, **SMALL)
    state = json.loads((out / STATE).read_text())
    assert len(state["shards"]) == 4 and state["shards"][-1]["end"][1] > 0  # mid-unit
    state["shards"].pop()  # as if killed between writing train_000003.bin and recording it
    (out / STATE).write_text(json.dumps(state))
    prep.prepare(srcs, out, workers=1, **SMALL)
    assert _shas(out) == _shas(reference[0])


def test_rerun_of_finished_preparation_is_a_noop(corpus, reference, tmp_path):
    srcs, _ = corpus
    out = tmp_path / "o"
    m1 = prep.prepare(srcs, out, **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prep.prepare(srcs, out, workers=2, **SMALL) == m1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# ----------------------------------------------------------------------------- llm.c format


def _hand_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_llmc_header_read_and_written(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, size=3000)
    _hand_shard(tmp_path / "fineweb_val_000000.bin", toks[:1000])
    _hand_shard(tmp_path / "fineweb_train_000001.bin", toks[1000:])
    assert read_header(tmp_path / "fineweb_train_000001.bin") == 2000
    np.testing.assert_array_equal(read_shard(tmp_path / "fineweb_val_000000.bin"), toks[:1000])
    # write_shard writes exactly llm.c's bytes
    write_shard(tmp_path / "mine.bin", toks[1000:])
    assert (tmp_path / "mine.bin").read_bytes() == \
        (tmp_path / "fineweb_train_000001.bin").read_bytes()
    (tmp_path / "mine.bin").unlink()
    ds = ShardDataset(tmp_path)  # a bare folder of llm.c shards: GPT-2, split from the names
    assert ds.tokenizer["name"] == "gpt2" and ds.vocab_size == 50257
    assert ds.val.tokens == 1000 and ds.train.tokens == 2000
    x, y = next(ds.val_batches(64, 4, n_tokens=1000))
    np.testing.assert_array_equal(x[1], toks[64:128])
    np.testing.assert_array_equal(y[1], toks[65:129])
    assert x.dtype == np.int32 and x.shape == (4, 64)
    ds2 = ShardDataset(str(tmp_path / "fineweb_train_*.bin"))  # a glob
    assert ds2.train.tokens == 2000 and not ds2.val.files


# ----------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Three train shards whose tokens are their global positions (every window is unique)."""
    d = tmp_path_factory.mktemp("shards")
    sizes, start = [1001, 2050, 777], 0
    write_shard(d / "x_val_000000.bin", np.arange(600) + 60000)
    for i, n in enumerate(sizes):
        write_shard(d / f"x_train_{i + 1:06d}.bin", np.arange(start, start + n))
        start += n
    return d, sizes


T, B = 16, 8


def _window_starts(sizes):
    out, start = [], 0
    for n in sizes:
        out += [start + i * T for i in range((n - 1) // T)]
        start += n
    return out


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_one_epoch_is_a_partition_of_the_windows(shard_dir, procs):
    d, sizes = shard_dir
    ds = ShardDataset(d)
    starts = _window_starts(sizes)
    W = ds.num_windows(T)
    assert W == len(starts) == 238  # 62 + 128 + 48; 238 is not a multiple of B
    for epoch in (0, 1):
        seen = []
        for step in range(epoch * W // B, (epoch + 1) * W // B + 2):
            xs, ys = [], []
            for p in range(procs):  # process p reads only its own rows of the global batch
                x, y = ds.batch(7, step, B, T, rows=slice(p * B // procs, (p + 1) * B // procs))
                assert x.shape == (B // procs, T) and x.dtype == np.int32
                xs.append(x)
                ys.append(y)
            x, y = np.concatenate(xs), np.concatenate(ys)
            np.testing.assert_array_equal(x, ShardDataset(d).batch(7, step, B, T)[0])
            np.testing.assert_array_equal(y, x + 1)  # y is x shifted by one token
            np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))  # contiguous windows
            pos = step * B + np.arange(B)
            seen += x[(pos >= epoch * W) & (pos < (epoch + 1) * W), 0].tolist()
        assert len(seen) == W and sorted(seen) == starts  # no window twice, none missed
    e0 = [ds.batch(7, s, B, T)[0][0, 0] for s in range(3)]
    e1 = [ds.batch(7, s, B, T)[0][0, 0] for s in range(W // B + 1, W // B + 4)]
    assert e0 != e1  # each epoch its own permutation
    assert ds.batch(8, 0, B, T)[0].tolist() != ds.batch(7, 0, B, T)[0].tolist()


def test_resume_with_another_process_count_sees_the_same_batches(shard_dir):
    d, _ = shard_dir
    one = ShardDataset(d)
    straight = [one.batch(3, s, B, T)[0] for s in range(40)]  # crosses into epoch 1
    first = [ShardDataset(d).batch(3, s, B, T)[0] for s in range(15)]
    resumed = ShardDataset(d)  # a fresh process, 2 processes' rows, from step 15
    rest = [np.concatenate([resumed.batch(3, s, B, T, rows=slice(0, 4))[0],
                            resumed.batch(3, s, B, T, rows=np.arange(4, 8))[0]])
            for s in range(15, 40)]
    for a, b in zip(straight, first + rest):
        np.testing.assert_array_equal(a, b)


def test_val_batches_are_a_fixed_prefix(shard_dir):
    d, _ = shard_dir
    ds = ShardDataset(d)
    assert ds.num_val_batches(T, 4, n_tokens=200) == 3  # 200 // 64
    assert ds.num_val_batches(T, 4) == 599 // T // 4  # capped by the shard
    batches = list(ds.val_batches(T, 4, n_tokens=200))
    flat = np.concatenate([x for x, _ in batches]).reshape(-1)
    np.testing.assert_array_equal(flat, np.arange(192) + 60000)
    halves = [np.concatenate([a[0], b[0]]) for a, b in zip(
        ds.val_batches(T, 4, 200, rows=slice(0, 2)), ds.val_batches(T, 4, 200, rows=slice(2, 4)))]
    for (x, _), h in zip(batches, halves):
        np.testing.assert_array_equal(x, h)


# ----------------------------------------------------------------------------- bad input


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_sources(tmp_path):
    with pytest.raises(ConfigError, match="source not found"):
        prep.prepare([tmp_path / "nope.txt"], tmp_path / "o")
    with pytest.raises(ConfigError, match="matches no files"):
        prep.prepare([str(tmp_path / "*.jsonl")], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_record_without_text_field_names_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKES[:20000])  # written into shards before the bad record
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(ConfigError) as e:
        prep.prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "o",
                     shard_tokens=1000, val_tokens=500)
    msg = _one_line(e)
    assert f"{tmp_path / 'b.jsonl'}:3" in msg and "'text'" in msg and "body" in msg
    assert not (tmp_path / "o").exists()  # the shards written before it are removed


def test_corrupt_parquet_gzip_and_zstd(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a" * 1000] * 50}), tmp_path / "good.parquet")
    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ConfigError, match="bad.parquet: corrupt or truncated"):
        prep.prepare([tmp_path / "bad.parquet"], tmp_path / "o")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nofield.parquet")
    with pytest.raises(ConfigError, match="no 'text' column"):
        prep.prepare([tmp_path / "nofield.parquet"], tmp_path / "o")
    gz = gzip.compress(SHAKES[:50000].encode())
    (tmp_path / "t.txt.gz").write_bytes(gz[:len(gz) // 2])
    with pytest.raises(ConfigError) as e:
        prep.prepare([tmp_path / "t.txt.gz"], tmp_path / "o", shard_tokens=1000, val_tokens=100)
    assert "t.txt.gz: corrupt or truncated gzip" in _one_line(e)
    (tmp_path / "r.jsonl.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(ConfigError, match="r.jsonl.gz: corrupt or truncated gzip"):
        prep.prepare([tmp_path / "r.jsonl.gz"], tmp_path / "o")
    (tmp_path / "z.txt.zst").write_bytes(b"not zstd either")
    with pytest.raises(ConfigError, match="z.txt.zst: corrupt or truncated zstd" if HAVE_ZSTD
                       else "z.txt.zst is zstd-compressed: pip install zstandard"):
        prep.prepare([tmp_path / "z.txt.zst"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_shards_are_named(tmp_path):
    good = tmp_path / "ok_train_000001.bin"
    _hand_shard(good, np.arange(100))
    for name, kw, what in [("m_train_000002.bin", {"magic": 1234}, "magic 1234"),
                           ("v_train_000002.bin", {"version": 2}, "version 2"),
                           ("c_train_000002.bin", {"count": 99}, "header says 99 tokens")]:
        d = tmp_path / name[:1]
        d.mkdir()
        _hand_shard(d / name, np.arange(100), **kw)
        with pytest.raises(ConfigError) as e:
            ShardDataset(d)
        msg = _one_line(e)
        assert str(d / name) in msg and what in msg
    d = tmp_path / "short"
    d.mkdir()
    (d / "s_val_000000.bin").write_bytes(good.read_bytes()[:-10])  # truncated
    with pytest.raises(ConfigError, match="s_val_000000.bin: header says 100 tokens"):
        ShardDataset(d)
    with pytest.raises(ConfigError, match="does not exist or matches no files"):
        ShardDataset(tmp_path / "none_*.bin")


def test_out_with_a_different_preparation_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(SHAKES[:5000])
    prep.prepare([tmp_path / "a.txt"], tmp_path / "o", shard_tokens=500, val_tokens=200)
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    for kw in [dict(shard_tokens=600, val_tokens=200), dict(tokenizer="char", shard_tokens=500,
                                                            val_tokens=200)]:
        with pytest.raises(ConfigError, match="already holds a different preparation"):
            prep.prepare([tmp_path / "a.txt"], tmp_path / "o", **kw)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    (tmp_path / "bins").mkdir()
    _hand_shard(tmp_path / "bins" / "fineweb_train_000001.bin", np.arange(10))
    with pytest.raises(ConfigError, match="not from this preparation"):
        prep.prepare([tmp_path / "a.txt"], tmp_path / "bins")


@pytest.mark.slow
def test_cli_hf_offline_and_missing_source_exit_2(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jaxgpt.prepare", "--out", str(tmp_path / "o"), "--no-progress"]
    r = subprocess.run(cmd + ["hf:nobody/no-such-dataset:default:train"], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "nobody/no-such-dataset" in lines[0]
    if importlib.util.find_spec("datasets") is not None:  # else: "needs the `datasets` package"
        assert lines[0].startswith("error: cannot open Hugging Face dataset")
    r = subprocess.run(cmd + [str(tmp_path / "missing.txt")], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: source not found: {tmp_path}/missing.txt"
    assert not (tmp_path / "o").exists()


def test_corpus_only_fits_validation_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="pass a smaller --val-tokens"):
        prep.prepare([tmp_path / "a.txt"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- pretraining on shards, end to end ----------------------------------------------------------
@pytest.mark.slow
def test_prepare_then_train_on_the_shards(tmp_path):
    """A multi-file jsonl corpus -> jaxgpt.prepare -> jaxgpt.train --data DIR (GPT-2 BPE from the
    manifest, windows without replacement, val on the val shard's prefix) -> it learns; a model
    with another tokenizer is refused on that data."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import default_data_path, run_cli

    text = Path(default_data_path()).read_text()[:300_000]
    src = tmp_path / "src"
    src.mkdir()
    paras = [p for p in text.split("\n\n") if p.strip()]
    for k in range(3):
        (src / f"part{k}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[k::3]))
    data = tmp_path / "shards"
    r = run_cli("jaxgpt.prepare", src / "*.jsonl", "--out", data, "--shard-tokens", "20000",
                "--val-tokens", "8000", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    ds = ShardDataset(data)
    assert len(ds.train.files) >= 3 and ds.val.tokens == 8000
    out = tmp_path / "run"
    tiny = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
            "--sample-tokens", "0", "--no-progress", "--lr", "3e-3", "--warmup-iters", "10"]
    r = run_cli("jaxgpt.train", "--data", data, "--out", out, *tiny, "--max-iters", "60",
                "--eval-interval", "30", "--ckpt-interval", "60", "--val-tokens", "4096")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vocab 50257" in r.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [x["val_loss"] for x in rows if "val_loss" in x]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals
    # a char-level model cannot continue on GPT-2 shards
    char_run = tmp_path / "char"
    assert run_cli("jaxgpt.train", "--out", char_run, *tiny, "--max-iters", "10", "--eval-interval", "10",
                   "--ckpt-interval", "10").returncode == 0
    r = run_cli("jaxgpt.train", "--data", data, "--out", tmp_path / "ft", *tiny, "--max-iters", "10",
                "--init-from", char_run)
    assert r.returncode == 2 and "was tokenized with the gpt2 tokenizer" in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "ft").exists()
