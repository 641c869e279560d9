"""The byte-level alphabet and pre-tokenization of Hugging Face byte-level BPE: GPT-2's
bytes_to_unicode table, the split regexes of the model families (the GGUF `tokenizer.ggml.pre`
names), compiled to behave as `tokenizers`' Oniguruma does (_compile_split), the Split
behaviours (_split_step) and the normalizers. jaxgpt/tokenizers/bpe.py builds on them."""

from __future__ import annotations

import bisect
from functools import lru_cache

EOT = "<|endoftext|>"  # GPT-2's end of text, special wherever a vocabulary has it


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
