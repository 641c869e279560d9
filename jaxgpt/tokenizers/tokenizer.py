"""Tokenizers: character-level (vocabulary from the corpus), GPT-2's BPE (offline via tiktoken), and
Hugging Face byte-level BPE for other models, built from a GGUF file or a tokenizer.json folder
(including one `python -m jaxgpt.tokenizer train` wrote: jaxgpt/tokenizers/train.py; that CLI is
jaxgpt/cli/tokenizer.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from jaxgpt.config import ConfigError
from jaxgpt.tokenizers.bpe import BPETokenizer
from jaxgpt.tokenizers.bytelevel import EOT

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
