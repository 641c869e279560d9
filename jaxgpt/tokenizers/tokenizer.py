"""Tokenizers: character-level (vocabulary from the corpus), GPT-2's BPE (offline via tiktoken), and
Hugging Face byte-level BPE for other models, built from a GGUF file or a tokenizer.json folder
(including one `python -m jaxgpt.tokenizer train` wrote: jaxgpt/tokenizers/train.py; that CLI is
jaxgpt/cli/tokenizer.py)."""

from __future__ import annotations

import bisect
import json
import unicodedata
from functools import lru_cache
from importlib import resources

from jaxgpt.config import ConfigError

EOT = "<|endoftext|>"
# tiktoken's `gpt2` split pattern (tiktoken_ext/openai_public.py); the ranks come from the
# vocab.bpe/encoder.json shipped in jaxgpt/assets/gpt2, so nothing is downloaded.
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class CharTokenizer:
    """One token per distinct character of the training corpus (nanoGPT's shakespeare_char)."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = None  # a char vocabulary has no end-of-text token

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this model's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    def vocab_bytes(self) -> list[bytes]:
        """Each id's text as UTF-8 bytes (what a grammar matches tokens by: jaxgpt.grammar)."""
        return [c.encode("utf-8") for c in self.chars]

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 tokens, `<|endoftext|>` = 50256), built from shipped files."""

    name = "gpt2"

    def __init__(self):
        self.enc = _gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # By default `<|endoftext|>` in the text becomes token 50256, as in GPT-2's training data.
        return self.enc.encode(text, allowed_special="all" if allow_special else set(),
                               disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])

    def vocab_bytes(self) -> list[bytes]:
        """Each id's bytes (jaxgpt.grammar matches tokens by them); <|endoftext|> is b"": a
        special token spells no text."""
        return [b"" if i == self.eot_token else self.enc.decode_single_token_bytes(i)
                for i in range(self.vocab_size)]

    def to_dict(self) -> dict:
        return {"type": "gpt2"}


@lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    assets = resources.files("jaxgpt") / "assets" / "gpt2"
    ranks = data_gym_to_mergeable_bpe_ranks(str(assets / "vocab.bpe"), str(assets / "encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


def get_tokenizer(name: str, text: str | None = None):
    """`get_tokenizer("gpt2")`, `get_tokenizer("char", text=corpus)`, or
    `get_tokenizer("path/to/folder")` (a Hugging Face tokenizer.json folder)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if text is None:
            raise ConfigError("the char tokenizer needs the corpus text to build its vocabulary")
        return CharTokenizer.from_text(text)
    if is_tokenizer_dir(name):
        return load_tokenizer_dir(name)
    raise ConfigError(f"unknown tokenizer {name!r}; choose char, gpt2 or a tokenizer folder "
                      "(tokenizer.json)")


def is_tokenizer_dir(name) -> bool:
    """Whether `name` names a folder (one that should hold a tokenizer.json), not char / gpt2."""
    import os

    return str(name) not in ("char", "gpt2") and os.path.isdir(str(name))


def load_tokenizer_dir(folder) -> "BPETokenizer":
    """The byte-level BPE of a Hugging Face tokenizer folder (tokenizer.json +
    tokenizer_config.json), e.g. one `python -m jaxgpt.tokenizer train` wrote."""
    return BPETokenizer.from_hf_folder(folder)


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer saved with a checkpoint (`tok.to_dict()`)."""
    if d.get("type") == "bpe":
        return BPETokenizer.from_dict(d)
    if d.get("type") == "gpt2":
        return GPT2Tokenizer()
    if d.get("type") == "char":
        return CharTokenizer(d["chars"])
    raise ConfigError(f"unknown saved tokenizer {json.dumps(d)[:80]}")


# ---------------------------------------------------------------------------------------------
# Byte-level BPE for models that are not GPT-2 (SmolLM2, Llama 3, Qwen2, ...): the vocabulary,
# merges and special tokens come from a GGUF file's metadata or a Hugging Face tokenizer.json.
#
# The algorithm is Hugging Face `tokenizers`' exactly: added (special) tokens are cut out of the
# text first; each remaining segment is pre-tokenized by the model's split regex; each piece is
# mapped byte by byte through GPT-2's bytes_to_unicode alphabet and merged by BPE: the adjacent
# pair with the lowest merge rank first (leftmost on ties), one merge at a time, until no pair
# has a rank. (tiktoken instead ranks a concatenation by its token id, which can differ.)

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}

# The split regexes. _HF_GPT2_SPLIT is what `tokenizers`' ByteLevel(use_regex=True) applies; the
# others are the Split patterns transformers gives GGUF files (integrations/gguf), which are
# llama.cpp's (llama-vocab.cpp) for the same `tokenizer.ggml.pre` names.
_HF_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# GGUF `tokenizer.ggml.pre` -> split regex. The first group gets ByteLevel's own GPT-2 regex, as
# transformers gives every name it has no Split for. (llama.cpp isolates each digit first for
# smollm/starcoder/refact/command-r/codeshell/exaone, so `"  1"` is [ĠĠ, 1] there but [Ġ, Ġ, 1]
# in transformers; the original SmolLM2 tokenizer.json (Digits + ByteLevel) agrees with llama.cpp,
# and from_hf_folder reads that exactly. We follow transformers for GGUF files.)
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(["default", "gpt2", "smollm", "starcoder", "refact", "command-r", "codeshell",
                     "exaone", "mpt", "olmo", "jais", "trillion", "minerva-7b"], _HF_GPT2_SPLIT),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

# Code points the `regex` module's Unicode tables assign but the Oniguruma inside `tokenizers`
# does not (it is on an older Unicode): there they are unassigned, so in no \p{L}/\p{N}/\p{M}.
# _compile_split(exact=True) takes them out of every \p{..}, so the splits agree on all of
# Unicode (tests/test_tokenizer.py checks code points against `tokenizers`); the faster plain
# compile is used on the (almost all) text without them.
_ONIG_UNASSIGNED = (
    "558 58B-58C 5C8-5C9 88F B53-B54 C5C CDC 1ACF-1AF0 208F 209D-209F 20C1-20C4 2B96 2E60-2E63 "
    "A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D FBC3-FBD2 FD90-FD91 FDC8-FDCE 107BB-107BF "
    "10940-10959 10EC5-10EC7 10EC9-10EEE 10EF0-10EFB 11B0A 11B60-11B67 11DB0-11DDB 11DE0-11DE9 "
    "11DF0-11DF1 1246F 12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF "
    "18CD6-18CDA 18D09-18D20 18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1CCFA-1CCFC "
    "1CEBA-1CED0 1CED2-1CED4 1CEDD-1CEFD 1D127-1D128 1D1EB-1D1FF 1D250-1D281 1D6A6 1DB00-1DB1C "
    "1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF 1E6C0-1E6DE 1E6E0-1E6F5 1E6FE-1E6FF 1F1AE "
    "1F6D8-1F6D9 1F777-1F77A 1F7DA-1F7DB 1F7F1-1F7FF 1F8D0-1F8D8 1FA54-1FA57 1FA8A-1FA8E 1FAC8 "
    "1FACC-1FACD 1FADD 1FAEA-1FAEB 1FAEF 1FAF9-1FAFA 1FBFA 2B73A-2B73F 2B81E 2CEA2-2CEAD "
    "323B0-33479 3D000-3FC3F")


def _unassigned_ranges() -> list[tuple[int, int]]:
    return [(int(r.partition("-")[0], 16), int(r.partition("-")[2] or r.partition("-")[0], 16))
            for r in _ONIG_UNASSIGNED.split()]


def _unassigned_class() -> str:
    return "[" + "".join(f"\\U{lo:08X}" + (f"-\\U{hi:08X}" if hi != lo else "")
                         for lo, hi in _unassigned_ranges()) + "]"


_UNASSIGNED_STARTS, _UNASSIGNED_ENDS = map(list, zip(*_unassigned_ranges()))


def _has_unassigned(s: str) -> bool:
    """Whether `s` holds a code point of _ONIG_UNASSIGNED (cheap: almost no text does)."""
    if s.isascii() or max(s) < "\u0558":
        return False
    for c in set(s):
        k = bisect.bisect_right(_UNASSIGNED_STARTS, ord(c)) - 1
        if k >= 0 and ord(c) <= _UNASSIGNED_ENDS[k]:
            return True
    return False


@lru_cache(maxsize=64)
def _compile_split(pattern: str, exact: bool = False):
    """`pattern` (Oniguruma syntax, as in a tokenizer.json) compiled with the `regex` module.

    The plain compile agrees with `tokenizers` on text without _ONIG_UNASSIGNED code points;
    `exact=True` compiles the slower form that agrees on all text: every \\p{X} becomes
    [\\p{X}--U] (\\P{X}: [\\P{X}||U]), U = _ONIG_UNASSIGNED. Set operations need regex's VERSION1
    syntax, so a '[' inside a class is escaped (literal in Oniguruma, a nested set in VERSION1)
    and full case folding is turned off (Oniguruma folds simply)."""
    import regex

    if not exact or ("\\p" not in pattern and "\\P" not in pattern):
        return regex.compile(pattern)
    unassigned = _unassigned_class()
    out, i, depth, n = [], 0, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt in "pP":
                if i + 2 < n and pattern[i + 2] == "{":
                    end = pattern.index("}", i + 2) + 1
                else:
                    end = i + 3
                prop = pattern[i:end]
                out.append(f"[{prop}--{unassigned}]" if nxt == "p" else f"[{prop}||{unassigned}]")
                i = end
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if depth:
            if c == "]":
                depth = 0
                out.append(c)
            elif c == "[" or (c in "&|~" and i + 1 < n and pattern[i + 1] == c):
                out.append("\\" + c)
            else:
                out.append(c)
            i += 1
            continue
        if c == "[":
            depth = 1
            if i + 1 < n and pattern[i + 1] == "^":
                out.append("[^")
                i += 2
            else:
                out.append("[")
                i += 1
            if i < n and pattern[i] == "]":      # a leading ']' is literal
                out.append("\\]")
                i += 1
            continue
        out.append(c)
        i += 1
    return regex.compile("(?-f)" + "".join(out), flags=regex.VERSION1)


def _is_ws(c: str) -> bool:
    """Rust's char::is_whitespace (Unicode White_Space), which `tokenizers` uses to strip."""
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def _is_word_char(c: str) -> bool:
    """Perl's Unicode \\w (regex_syntax::is_word_character): single_word's boundary test."""
    return _compile_split(r"\w").match(c) is not None


_BEHAVIORS = ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")


def _split_step(pattern: str, behavior: str, invert: bool):
    """One `tokenizers` Split pre-tokenizer as a function (piece, exact) -> list of pieces;
    `exact`: the piece holds _ONIG_UNASSIGNED code points (use the slower exact regex)."""
    fast, slow = _compile_split(pattern), None

    def compiled(exact):
        nonlocal slow
        if not exact:
            return fast
        if slow is None:
            slow = _compile_split(pattern, exact=True)
        return slow

    def spans(s, exact):
        # tokenizers' Pattern::find_matches: the matches and the gaps between them, in order
        out, prev = [], 0
        for m in compiled(exact).finditer(s):
            a, b = m.span()
            if prev != a:
                out.append((s[prev:a], invert))
            out.append((s[a:b], not invert))
            prev = b
        if prev != len(s):
            out.append((s[prev:], invert))
        return out

    if behavior == "isolated":
        findall = fast.findall

        def split(s, exact=False):
            if not exact:
                parts = findall(s)
                if sum(map(len, parts)) == len(s):   # the usual case: the pattern covers s
                    return parts
            return [p for p, _ in spans(s, exact)]
        return split
    if behavior == "removed":
        return lambda s, exact=False: [p for p, is_match in spans(s, exact) if not is_match]

    def merged(s, exact=False):
        acc, prev_match = [], False
        seq = spans(s, exact)
        if behavior == "merged_with_next":
            seq = seq[::-1]
        for p, is_match in seq:
            if behavior == "contiguous":
                if is_match == prev_match and acc:
                    acc[-1] += p
                else:
                    acc.append(p)
            elif is_match and not prev_match and acc:
                acc[-1] = acc[-1] + p if behavior == "merged_with_previous" else p + acc[-1]
            else:
                acc.append(p)
            prev_match = is_match
        return acc[::-1] if behavior == "merged_with_next" else acc
    return merged


_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
_INF = 1 << 62


class BPETokenizer:
    """Hugging Face byte-level BPE from plain data: `tokens` (the vocabulary by id, spelled in the
    bytes_to_unicode alphabet; None for an unused id), `merges` ("a b" strings or (a, b) pairs,
    best first), `added` (added tokens: dicts with id, content, special and optionally lstrip,
    rstrip, single_word, normalized), `pre` (the pre-tokenizer as steps: {"split": PATTERN,
    "behavior": ..., "invert": ...} or {"prefix_space": True}; default ByteLevel's GPT-2 split),
    `normalizer` (None or a list of NFC/NFD/NFKC/NFKD). Build one with from_gguf_metadata or
    from_hf_folder; to_dict / tokenizer_from_dict save and rebuild it."""

    name = "bpe"

    def __init__(self, tokens, merges, *, added=(), pre=None, normalizer=None, bos_token=None,
                 eos_token=None, add_bos=False, ignore_merges=False, unk_token=None,
                 fuse_unk=False, chat_template=None):
        self.tokens = [None if t is None else str(t) for t in tokens]
        self.merges = [m if isinstance(m, str) else (str(m[0]), str(m[1])) for m in merges]
        self.added = [self._added_entry(a) for a in added]
        self.pre = [dict(s) for s in (pre if pre is not None else [{"split": _HF_GPT2_SPLIT}])]
        self.normalizer = list(normalizer or [])
        self.ignore_merges, self.fuse_unk = bool(ignore_merges), bool(fuse_unk)
        self.unk_token = None if unk_token is None else int(unk_token)
        self.bos_token = None if bos_token is None else int(bos_token)
        self.eot_token = None if eos_token is None else int(eos_token)
        self.add_bos = bool(add_bos)
        # the model's Jinja chat template (GGUF tokenizer.chat_template, tokenizer_config.json),
        # as transformers keeps it with the tokenizer; jaxgpt.templates renders it ("model")
        self.chat_template = chat_template if isinstance(chat_template, str) else None

        vocab = {}
        for i, t in enumerate(self.tokens):
            if t is not None:
                vocab[t] = i                       # a repeated spelling: the later id, as HF
        self._vocab = vocab
        ids = [a["id"] for a in self.added]
        self.vocab_size = max([len(self.tokens), *(i + 1 for i in ids)])
        self.special_tokens = {a["content"]: a["id"] for a in self.added if a["special"]}
        self.added_tokens = {a["content"]: a["id"] for a in self.added}

        # merges: (left id * stride + right id) -> rank << 32 | merged id
        stride = self._stride = max(len(self.tokens), 1)
        pairs = {}
        for rank, m in enumerate(self.merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            ia, ib, iab = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if ia is None or ib is None or iab is None:
                missing = a if ia is None else b if ib is None else a + b
                raise ConfigError(f"BPE merge {rank} ({a!r} {b!r}) uses {missing!r}, which is not "
                                  "in the vocabulary")
            pairs[ia * stride + ib] = rank << 32 | iab
        self._pairs = pairs

        # decoding: id -> bytes (tokenizers' ByteLevel decoder: a token all in the byte
        # alphabet is those bytes; any other token is its own UTF-8)
        table = [b""] * self.vocab_size
        for i, t in enumerate(self.tokens):
            if t is not None:
                table[i] = self._token_bytes(t)
        for a in self.added:
            table[a["id"]] = self._token_bytes(a["content"])
        self._id_bytes = table

        for n in self.normalizer:
            if n not in _NORMALIZERS:
                raise ConfigError(f"normalizer {n!r} is not supported (supported: "
                                  f"{', '.join(_NORMALIZERS)})")
        self._steps = [self._make_step(s) for s in self.pre]
        self._fast_split = (self._steps[0] if len(self._steps) == 1 and "split" in self.pre[0]
                            and self.pre[0].get("behavior", "isolated") == "isolated" else None)
        raw = [a for a in self.added if not (a["normalized"] and self.normalizer)]
        norm = [a for a in self.added if a["normalized"] and self.normalizer]
        self._raw_matcher, self._norm_matcher = self._matcher(raw), self._matcher(norm)
        self._cache: dict[str, tuple] = {}

    # ---- construction helpers ----

    @staticmethod
    def _added_entry(a) -> dict:
        if not isinstance(a, dict):                       # compact form: [id, content, special]
            a = {"id": a[0], "content": a[1], "special": a[2]}
        return {"id": int(a["id"]), "content": str(a["content"]),
                "special": bool(a.get("special", True)), "lstrip": bool(a.get("lstrip", False)),
                "rstrip": bool(a.get("rstrip", False)),
                "single_word": bool(a.get("single_word", False)),
                "normalized": bool(a.get("normalized", False))}

    @staticmethod
    def _token_bytes(t: str) -> bytes:
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in t)
        except KeyError:
            return t.encode("utf-8")

    @staticmethod
    def _make_step(step: dict):
        if step.get("prefix_space"):
            return lambda s, exact=False: [s if s.startswith(" ") else " " + s]
        if "split" in step:
            behavior = step.get("behavior", "isolated")
            if behavior not in _BEHAVIORS:
                raise ConfigError(f"split behavior {behavior!r} is not supported")
            return _split_step(step["split"], behavior, bool(step.get("invert", False)))
        raise ConfigError(f"unknown pre-tokenizer step {json.dumps(step)[:80]}")

    @staticmethod
    def _matcher(added):
        """A regex finding the added tokens, leftmost-longest (as tokenizers' Aho-Corasick)."""
        if not added:
            return None
        import regex
        by_content = {a["content"]: a for a in added if a["content"]}
        alts = sorted(by_content, key=len, reverse=True)
        return regex.compile("|".join(map(regex.escape, alts))), by_content

    # ---- encoding ----

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; the special-token strings in it become their ids unless
        `allow_special=False` (then they are plain text). Never adds a bos (see `add_bos`)."""
        out: list[int] = []
        for seg, tid in self._cut(text, self._raw_matcher, allow_special):
            if tid is not None:
                out.append(tid)
                continue
            for n in self.normalizer:
                seg = unicodedata.normalize(n, seg)
            for seg2, tid2 in self._cut(seg, self._norm_matcher, allow_special):
                if tid2 is not None:
                    out.append(tid2)
                else:
                    self._encode_segment(seg2, out)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text, allow_special=False)

    def _cut(self, text, matcher, allow_special):
        """(text, None) and (None, id) pieces: `text` cut at the added tokens it contains."""
        if matcher is None or not text:
            return [(text, None)] if text else []
        rx, by_content = matcher
        out, start = [], 0
        for m in rx.finditer(text):
            a, b = m.span()
            tok = by_content[m.group()]
            if tok["special"] and not allow_special:
                continue
            if tok["single_word"] and ((a > 0 and _is_word_char(text[a - 1]))
                                       or (b < len(text) and _is_word_char(text[b]))):
                continue
            if tok["lstrip"]:
                while a > start and _is_ws(text[a - 1]):
                    a -= 1
            if tok["rstrip"]:
                while b < len(text) and _is_ws(text[b]):
                    b += 1
            if start < a:
                out.append((text[start:a], None))
            out.append((None, tok["id"]))
            start = b
        if start < len(text):
            out.append((text[start:], None))
        return out

    def _encode_segment(self, seg: str, out: list) -> None:
        exact = _has_unassigned(seg)
        if self._fast_split is not None:
            pieces = self._fast_split(seg, exact)
        else:
            pieces = [seg]
            for step in self._steps:
                pieces = [q for p in pieces for q in step(p, exact) if q]
        cache = self._cache
        for p in pieces:
            ids = cache.get(p)
            if ids is None:
                ids = self._bpe(p.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR))
                if len(cache) >= 100_000:
                    cache.clear()
                cache[p] = ids
            out += ids

    def _bpe(self, word: str) -> tuple:
        """HF's BPE on one pre-token (in the byte alphabet): merge the lowest-rank adjacent pair,
        the leftmost of equals, until no pair has a rank."""
        vocab = self._vocab
        if self.ignore_merges and word in vocab:
            return (vocab[word],)
        ids = []
        unk = self.unk_token
        for c in word:
            i = vocab.get(c)
            if i is None:
                if unk is None:
                    continue                        # HF drops a character it has no token for
                if self.fuse_unk and ids and ids[-1] == unk:
                    continue
                i = unk
            ids.append(i)
        n = len(ids)
        if n < 2:
            return tuple(ids)
        if n > 256:
            return self._bpe_heap(ids)
        get, stride = self._pairs.get, self._stride
        pv = [get(ids[i] * stride + ids[i + 1], _INF) for i in range(n - 1)]
        while pv:
            best = min(pv)
            if best == _INF:
                break
            i = pv.index(best)
            new = best & 0xFFFFFFFF
            ids[i] = new
            del ids[i + 1], pv[i]
            if i:
                pv[i - 1] = get(ids[i - 1] * stride + new, _INF)
            if i < len(pv):
                pv[i] = get(new * stride + ids[i + 1], _INF)
        return tuple(ids)

    def _bpe_heap(self, ids: list) -> tuple:
        """The same merges for a long piece, in O(n log n): tokenizers' heap of (rank, position)."""
        import heapq

        get, stride = self._pairs.get, self._stride
        n = len(ids)
        sym = list(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(v, i) for i in range(n - 1)
                if (v := get(sym[i] * stride + sym[i + 1])) is not None]
        heapq.heapify(heap)
        while heap:
            v, i = heapq.heappop(heap)
            if sym[i] is None or (j := nxt[i]) == -1 or get(sym[i] * stride + sym[j]) != v:
                continue                                  # an expired entry
            new = v & 0xFFFFFFFF
            sym[i], sym[j] = new, None
            k = nxt[i] = nxt[j]
            if k != -1:
                prv[k] = i
                if (w := get(new * stride + sym[k])) is not None:
                    heapq.heappush(heap, (w, i))
            if (p := prv[i]) != -1 and (w := get(sym[p] * stride + new)) is not None:
                heapq.heappush(heap, (w, p))
        return tuple(s for s in sym if s is not None)

    # ---- decoding ----

    def decode_bytes(self, ids) -> bytes:
        table, n = self._id_bytes, self.vocab_size
        return b"".join([table[i] for i in map(int, ids) if 0 <= i < n])

    def vocab_bytes(self) -> list[bytes]:
        """Each id's bytes (jaxgpt.grammar matches tokens by them); special tokens (and ids
        without a token) are b"": they spell no text."""
        special = set(self.special_tokens.values())
        return [b"" if i in special else b for i, b in enumerate(self._id_bytes)]

    def decode(self, ids) -> str:
        """The text of `ids` (special tokens as their text), invalid UTF-8 replaced by U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- saving ----

    def to_dict(self) -> dict:
        d = {"type": "bpe", "tokens": self.tokens,
             "merges": [m if isinstance(m, str) else (" ".join(m) if " " not in m[0] + m[1]
                                                     else list(m)) for m in self.merges],
             "added": [[a["id"], a["content"], a["special"]]
                       if not (a["lstrip"] or a["rstrip"] or a["single_word"] or a["normalized"])
                       else a for a in self.added],
             "bos": self.bos_token, "eos": self.eot_token, "add_bos": self.add_bos}
        if self.pre != [{"split": _HF_GPT2_SPLIT}]:
            d["pre"] = self.pre
        for key, value in (("normalizer", self.normalizer), ("ignore_merges", self.ignore_merges),
                           ("unk", self.unk_token), ("fuse_unk", self.fuse_unk),
                           ("chat_template", self.chat_template)):
            if value:
                d[key] = value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        return cls(d["tokens"], d["merges"], added=d.get("added", ()), pre=d.get("pre"),
                   normalizer=d.get("normalizer"), bos_token=d.get("bos"),
                   eos_token=d.get("eos"), add_bos=d.get("add_bos", False),
                   ignore_merges=d.get("ignore_merges", False), unk_token=d.get("unk"),
                   fuse_unk=d.get("fuse_unk", False), chat_template=d.get("chat_template"))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, {len(self.merges)} merges, "
                f"{len(self.special_tokens)} special, eot={self.eot_token})")

    # ---- sources ----

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "BPETokenizer":
        """From a GGUF file's metadata (key -> value), as transformers' GGUF loader builds it:
        `tokenizer.ggml.model` must be 'gpt2' (byte-level BPE); a token the file spells outside
        the byte alphabet is respelled as its UTF-8 bytes; CONTROL tokens (type 3) spelled in the
        alphabet become special, USER_DEFINED ones (type 4) plain added tokens, and so do the bos,
        eos, unk and pad tokens (special), and <|endoftext|> if the vocabulary has it. (A
        GGUFFile from jaxgpt.formats.gguf.read_gguf is taken too: its `.metadata`.)"""
        meta = getattr(meta, "metadata", meta)
        model = _meta_str(meta.get("tokenizer.ggml.model"))
        if model != "gpt2":
            kind = {"llama": "SentencePiece", "t5": "Unigram", "bert": "WordPiece",
                    "rwkv": "RWKV"}.get(model or "", "")
            raise ConfigError(f"GGUF tokenizer model {model!r}{f' ({kind})' if kind else ''} is not "
                              "supported; jaxgpt reads byte-level BPE ('gpt2') tokenizers only")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ConfigError("GGUF metadata has no tokenizer.ggml."
                              f"{'tokens' if tokens is None else 'merges'}; cannot build its BPE")
        tokens = [_meta_str(t) for t in tokens]
        merges = [_meta_str(m) for m in merges]
        types = meta.get("tokenizer.ggml.token_type")
        types = [] if types is None else [int(t) for t in types]
        pre_name = _meta_str(meta.get("tokenizer.ggml.pre")) or "default"
        if pre_name not in _GGUF_PRE_SPLITS:
            raise ConfigError(f"GGUF pre-tokenizer {pre_name!r} is not supported (supported: "
                              f"{', '.join(sorted(_GGUF_PRE_SPLITS))})")
        alphabet = set(_CHAR_TO_BYTE)
        spelled = [t if set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode())
                   for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        added: dict[str, dict] = {}
        for t, ty in zip(tokens, types):
            if ty == 3 and set(t) <= alphabet:
                added[t] = {"id": vocab[t], "content": t, "special": True}
        for t, ty in zip(tokens, types):
            if ty == 4 and t in vocab and t not in added:
                added[t] = {"id": vocab[t], "content": t, "special": False}
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id")
               for k in ("bos", "eos", "unknown", "padding")}
        named = [tokens[int(i)] for i in ids.values() if i is not None and 0 <= int(i) < len(tokens)]
        for t in named + [EOT]:
            if t in vocab:
                added[t] = {"id": vocab[t], "content": t, "special": True}
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        return cls(spelled, merges, added=sorted(added.values(), key=lambda a: a["id"]),
                   pre=None if _GGUF_PRE_SPLITS[pre_name] == _HF_GPT2_SPLIT
                   else [{"split": _GGUF_PRE_SPLITS[pre_name]}],
                   bos_token=ids["bos"], eos_token=ids["eos"], add_bos=bool(add_bos),
                   chat_template=_meta_str(meta.get("tokenizer.chat_template")))

    @classmethod
    def from_hf_folder(cls, path) -> "BPETokenizer":
        """From a Hugging Face folder's tokenizer.json (+ tokenizer_config.json,
        special_tokens_map.json): a BPE model with a byte-level pre-tokenizer."""
        from pathlib import Path

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ConfigError(f"{folder}: no tokenizer.json")
        try:
            spec = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{tj}: cannot read it ({e})") from None
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins
            p = folder / name
            if p.is_file():
                try:
                    cfg.update(json.loads(p.read_text(encoding="utf-8")))
                except ValueError as e:
                    raise ConfigError(f"{p}: not JSON ({e})") from None
        return cls._from_hf_spec(spec, cfg, str(tj))

    @classmethod
    def _from_hf_spec(cls, spec: dict, cfg: dict, where: str) -> "BPETokenizer":
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ConfigError(f"{where}: the tokenizer model is {model.get('type')!r}; jaxgpt "
                              "reads byte-level BPE tokenizers only")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ConfigError(f"{where}: BPE {key} {model[key]!r} is not supported")
        if model.get("byte_fallback"):
            raise ConfigError(f"{where}: a BPE with byte_fallback (SentencePiece-style) is not "
                              "byte-level; not supported")
        if model.get("dropout"):
            raise ConfigError(f"{where}: BPE dropout {model['dropout']} is not supported")
        pre = _hf_pre_steps(spec.get("pre_tokenizer"), where)
        normalizer = _hf_normalizers(spec.get("normalizer"), where)
        dec = spec.get("decoder")
        decs = dec.get("decoders", []) if dec and dec.get("type") == "Sequence" else [dec]
        if not decs or any(not d or d.get("type") != "ByteLevel" for d in decs):
            raise ConfigError(f"{where}: decoder {json.dumps(dec)[:60]} is not byte-level; "
                              "not supported")

        vocab = model.get("vocab") or {}
        size = max(vocab.values(), default=-1) + 1
        tokens = [None] * size
        for t, i in vocab.items():
            tokens[int(i)] = t
        added = [{k: a[k] for k in ("id", "content", "special", "lstrip", "rstrip",
                                    "single_word", "normalized") if k in a}
                 for a in spec.get("added_tokens") or ()]
        by_content = {a["content"]: int(a["id"]) for a in added}

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            if not isinstance(value, str):
                return None
            if value in by_content:
                return by_content[value]
            return vocab.get(value, vocab.get("".join(_BYTE_TO_CHAR[b] for b in value.encode())))

        bos, eos = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and _hf_post_adds(spec.get("post_processor"), bos)
        unk = model.get("unk_token")
        return cls(tokens, model.get("merges") or [], added=added, pre=pre, normalizer=normalizer,
                   bos_token=bos, eos_token=eos, add_bos=bool(add_bos),
                   ignore_merges=bool(model.get("ignore_merges")),
                   unk_token=None if unk is None else vocab.get(unk),
                   fuse_unk=bool(model.get("fuse_unk")), chat_template=_hf_chat_template(cfg))


def _hf_chat_template(cfg: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones ("default" wins)."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default", next(iter(named.values()), None))
    return t if isinstance(t, str) else None


def _meta_str(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8")
    return None if v is None else str(v)


def _hf_pre_steps(pt, where: str) -> list[dict]:
    """A tokenizer.json pre_tokenizer as BPETokenizer steps; it must contain a ByteLevel."""
    if pt is None:
        raise ConfigError(f"{where}: no pre_tokenizer, so not byte-level; not supported")
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    steps, byte_level = [], False
    for p in items:
        kind = p.get("type")
        if kind == "ByteLevel":
            byte_level = True
            if p.get("add_prefix_space"):
                steps.append({"prefix_space": True})
            if p.get("use_regex", True):
                steps.append({"split": _HF_GPT2_SPLIT})
        elif kind == "Split":
            pat = p.get("pattern") or {}
            if "Regex" in pat:
                rx = pat["Regex"]
            elif "String" in pat:
                import regex
                rx = regex.escape(pat["String"])
            else:
                raise ConfigError(f"{where}: Split pattern {json.dumps(pat)[:60]} is not supported")
            behavior = {"Isolated": "isolated", "Removed": "removed",
                        "MergedWithPrevious": "merged_with_previous",
                        "MergedWithNext": "merged_with_next",
                        "Contiguous": "contiguous"}.get(p.get("behavior"))
            if behavior is None:
                raise ConfigError(f"{where}: Split behavior {p.get('behavior')!r} is not supported")
            step = {"split": rx}
            if behavior != "isolated":
                step["behavior"] = behavior
            if p.get("invert"):
                step["invert"] = True
            steps.append(step)
        elif kind == "Digits":
            steps.append({"split": r"\p{N}" if p.get("individual_digits") else r"\p{N}+"})
        else:
            raise ConfigError(f"{where}: pre-tokenizer {kind!r} is not supported (byte-level "
                              "BPE: Sequence of Split / Digits / ByteLevel)")
    if not byte_level:
        raise ConfigError(f"{where}: the pre-tokenizer has no ByteLevel step, so it is not "
                          "byte-level BPE; not supported")
    return steps


def _hf_normalizers(n, where: str) -> list[str]:
    if n is None:
        return []
    items = n.get("normalizers", []) if n.get("type") == "Sequence" else [n]
    out = []
    for x in items:
        if x.get("type") not in _NORMALIZERS:
            raise ConfigError(f"{where}: normalizer {x.get('type')!r} is not supported "
                              f"(supported: {', '.join(_NORMALIZERS)})")
        out.append(x["type"])
    return out


def _hf_post_adds(pp, bos: int) -> bool:
    """Whether a tokenizer.json post_processor puts the bos token first in a single sequence."""
    if not pp:
        return False
    if pp.get("type") == "Sequence":
        return any(_hf_post_adds(p, bos) for p in pp.get("processors", []))
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"].get("id")
            ids = (pp.get("special_tokens", {}).get(name) or {}).get("ids") or []
            return bos in ids
    return False
