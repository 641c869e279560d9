"""Training a tokenizer (jaxgpt.tokenizer_train, python -m jaxgpt.tokenizer) and using the folder
everywhere: ids against transformers.AutoTokenizer, prepare's shards (uint16 and uint32, parallel,
resumable), train --tokenizer DIR, convert --to-hf."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data import prepare as prep
from jaxgpt.cli.tokenizer import main as cli_main
from jaxgpt.config import ConfigError
from jaxgpt.data.shards import MANIFEST, ShardDataset, read_shard
from jaxgpt.tokenizers.templates import render_chatml
from jaxgpt.tokenizers.bpe import BPETokenizer
from jaxgpt.tokenizers.tokenizer import get_tokenizer, load_tokenizer_dir, tokenizer_from_dict
from jaxgpt.tokenizers.train import hf_tokenizer_files, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHAKES = (REPO / "jaxgpt" / "assets" / "tinyshakespeare.txt").read_text()
INSTR = json.loads((REPO.parent.parent / "shared" / "data" / "instruction-data.json").read_text()
                   ) if (REPO.parent.parent / "shared" / "data").is_dir() else None
ODD = "  \n\n\t x\xa0y  z\r\n\r\nab'  s   DON'T  \u3000 q 12 345 1234567 héllo 你好 🙂.\n\n"


def _docs() -> list[str]:
    """Documents with odd whitespace, digits, Unicode and special-token text."""
    docs = [SHAKES[i * 3000:(i + 1) * 3000] for i in range(8)]
    docs += [ODD * 3, "<|endoftext|> in text", "x", ""]
    return docs


def _hf(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcorpus")
    (root / "a.txt").write_text(SHAKES[:60_000] + ODD)
    (root / "r.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs()))
    return [str(root / "a.txt"), str(root / "r.jsonl")]


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def trained(corpus, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("tok") / request.param
    tok = train_tokenizer(corpus, out, 600, split=request.param, special_tokens=["<|pad|>"],
                          chat_template="chatml")
    return out, tok


def test_folder_loads_in_transformers_with_the_same_ids(trained):
    out, tok = trained
    hf = _hf(out)
    assert tok.vocab_size == 600 == len(hf)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eot_token == 0
    assert hf.convert_tokens_to_ids(["<|pad|>", "<|im_start|>", "<|im_end|>"]) == [1, 2, 3]
    for d in _docs() + [SHAKES[-20000:]]:
        ids = hf.encode(d, add_special_tokens=False)
        assert tok.encode(d) == ids
        assert tok.decode(ids) == hf.decode(ids) == d
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chatml(msgs)
    assert tok.chat_template == hf.chat_template


def test_same_input_same_files(corpus, trained, tmp_path):
    out, tok = trained
    split = "llama3" if out.name == "llama3" else "gpt2"
    again = train_tokenizer(corpus, tmp_path / "again", 600, split=split,
                            special_tokens=["<|pad|>"], chat_template="chatml")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert again.to_dict() == tok.to_dict()
    other = train_tokenizer(corpus, tmp_path / "other", 700, split=split)
    assert other.tokens[:600] != tok.tokens  # a real change of input changes the file


def test_split_patterns_differ_as_documented(trained):
    out, tok = trained
    ids = tok.encode(" 1234567")
    pieces = [tok.decode([i]) for i in ids]
    if out.name == "llama3":  # digits in groups of at most 3, the space on its own
        assert "".join(pieces) == " 1234567" and all(len(p.strip()) <= 3 for p in pieces)
        assert pieces[0] == " "
    else:
        assert "".join(pieces) == " 1234567"


def test_prepare_with_folder_equals_autotokenizer_parallel_and_resumable(trained, corpus,
                                                                         tmp_path, monkeypatch):
    out, tok = trained
    monkeypatch.setattr(prep, "CHUNK_CHARS", 3000)
    hf = _hf(out)
    docs = [SHAKES[:60_000] + ODD] + _docs()
    # prepare reads special-token text in a document as plain text (as GPT-2's data): HF's
    # split_special_tokens=True
    want = np.concatenate([[0] + hf(d, add_special_tokens=False, split_special_tokens=True)
                           ["input_ids"] for d in docs])
    small = dict(shard_tokens=6000, val_tokens=2000, piece_chars=2000)
    ref = prep.prepare(corpus, tmp_path / "one", tokenizer=str(out), workers=1, **small)
    got = np.concatenate([read_shard(tmp_path / "one" / s["file"]) for s in ref["shards"]])
    assert got.dtype == np.uint16 and ref["magic"] == 20240520
    np.testing.assert_array_equal(got, want)
    assert ref["documents"] == len(docs) and ref["tokenizer"]["name"] == out.name
    # two processes: byte-identical shards
    par = prep.prepare(corpus, tmp_path / "two", tokenizer=str(out), workers=2,
                       backend="processes", **small)
    assert [s["sha256"] for s in par["shards"]] == [s["sha256"] for s in ref["shards"]]

    def boom(entry):
        if entry["index"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prep.prepare(corpus, tmp_path / "res", tokenizer=str(out), on_shard=boom, **small)
    done = prep.prepare(corpus, tmp_path / "res", tokenizer=str(out), workers=2, **small)
    assert (tmp_path / "res" / MANIFEST).read_bytes() == (tmp_path / "one" / MANIFEST).read_bytes()
    assert done["shards"] == ref["shards"]
    ds = ShardDataset(tmp_path / "one")
    assert ds.vocab_size == 600 and ds.eot_token == 0
    assert tokenizer_from_dict(ds.tokenizer).to_dict() == {**tok.to_dict()}


def _wide(tmp_path) -> Path:
    """A byte-level BPE whose eos id is 70,000 (uint32 shards), written as an HF folder."""
    from jaxgpt.tokenizers.bytelevel import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + ["Ġt", "he"] + [None] * (70_000 - 258)
    tok = BPETokenizer(tokens, ["Ġ t", "h e"],
                       added=[{"id": 70_000, "content": "<|endoftext|>", "special": True}],
                       eos_token=70_000)
    folder = tmp_path / "wide"
    folder.mkdir()
    for name, data in hf_tokenizer_files(tok).items():
        (folder / name).write_bytes(data)
    return folder


def test_vocabulary_over_65536_gets_uint32_shards(tmp_path):
    folder = _wide(tmp_path)
    hf = _hf(folder)
    docs = ["the theme", "he then"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = prep.prepare([tmp_path / "d.jsonl"], tmp_path / "o", tokenizer=str(folder),
                     shard_tokens=6, val_tokens=4)
    assert (m["magic"], m["version"]) == (20240801, 7) and "uint32" in m["format"]
    got = np.concatenate([read_shard(tmp_path / "o" / s["file"]) for s in m["shards"]])
    want = [t for d in docs for t in [70_000] + hf.encode(d, add_special_tokens=False)]
    assert got.dtype == np.uint32 and got.tolist() == want
    ds = ShardDataset(tmp_path / "o")
    x, y = ds.batch(0, 0, 1, 3)
    assert ds.vocab_size == 70_001 and set(x.ravel()) | set(y.ravel()) <= set(want)


def test_hf_files_of_a_model_tokenizer_round_trip(trained, tmp_path):
    out, tok = trained
    back = BPETokenizer.from_dict(tok.to_dict())   # as a checkpoint carries it
    (tmp_path / "rt").mkdir()
    for name, data in hf_tokenizer_files(back).items():
        (tmp_path / "rt" / name).write_bytes(data)
    hf = _hf(tmp_path / "rt")
    for d in _docs():
        assert hf.encode(d, add_special_tokens=False) == tok.encode(d)
    assert load_tokenizer_dir(tmp_path / "rt").to_dict() == tok.to_dict()


def test_get_tokenizer_and_bad_input(trained, tmp_path, capsys):
    out, tok = trained
    assert get_tokenizer(str(out)).to_dict() == tok.to_dict()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="vocab-size"):
        train_tokenizer([str(out / "tokenizer.json")], tmp_path / "x", 100)
    with pytest.raises(ConfigError, match="already holds"):
        train_tokenizer([str(out / "tokenizer.json")], out, 600)
    assert cli_main(["train", str(tmp_path / "missing.txt"), "--vocab-size", "500",
                     "--out", str(tmp_path / "y")]) == 2
    assert cli_main(["train", str(out / "tokenizer.json"), "--vocab-size", "500", "--out",
                     str(tmp_path / "y"), "--chat-template", "nope"]) == 2
    assert cli_main(["decode", str(out), "99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert not (tmp_path / "y").exists()
    assert cli_main(["encode", str(out), "To be, or not"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("To be, or not")
    assert cli_main(["decode", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "To be, or not\n"


@pytest.mark.slow
def test_cli_train_then_train_sample_and_convert(tmp_path):
    """python -m jaxgpt.tokenizer train; train --tokenizer DIR (vocab from it); jaxgpt.load and
    generate; convert --to-hf: the HF folder's AutoTokenizer gives the same ids."""
    import jaxgpt
    from jaxgpt.config import TrainConfig
    from jaxgpt.training.pretrain import train

    text = tmp_path / "s.txt"
    text.write_text(SHAKES[:100_000])
    r = subprocess.run([sys.executable, "-m", "jaxgpt.tokenizer", "train", str(text),
                        "--vocab-size", "400", "--out", str(tmp_path / "tok"), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "trained 400 tokens" in r.stderr
    cfg = TrainConfig(data=str(text), tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "run"),
                      preset="baby", n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4,
                      max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=0, progress=False,
                      steps_per_call=1, warmup_iters=1)
    s = train(cfg)
    assert s["model"].config.vocab_size == 400
    lm = jaxgpt.load(str(tmp_path / "run"))
    assert lm.tokenizer.to_dict() == load_tokenizer_dir(tmp_path / "tok").to_dict()
    assert lm.generate("ROMEO:", max_new_tokens=5, temperature=0.0).startswith("ROMEO:")
    r = subprocess.run([sys.executable, "-m", "jaxgpt.convert", str(tmp_path / "run"),
                        "--to-hf", str(tmp_path / "hf")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    hf = _hf(tmp_path / "hf")
    assert hf.encode(SHAKES[:5000], add_special_tokens=False) == lm.tokenizer.encode(SHAKES[:5000])
    cfgj = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfgj["vocab_size"] == 400 and cfgj["eos_token_id"] == 0
