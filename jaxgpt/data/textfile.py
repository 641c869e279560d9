"""Training data: a text file tokenized once into cached `.bin` memmaps, and seeded random batches."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.files import atomic_write, sha256_file
from jaxgpt.tokenizers.tokenizer import get_tokenizer, tokenizer_from_dict

CHUNK_CHARS = 1 << 20  # tokenize in ~1 MB pieces so long corpora show progress


def read_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text, with user-facing errors for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file not found: {path}")
    raw = p.read_bytes()
    if not raw.strip():
        raise ConfigError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file is not UTF-8 text: {path} (byte {e.start})") from None








def _chunks(text: str):
    """Split text into ~CHUNK_CHARS pieces where every supported BPE split pattern (GPT-2's,
    Llama 3's) ends a token anyway (jaxgpt.corpus's cut rule), so the pieces' ids are the text's."""
    from jaxgpt.data.corpus import split_text

    yield from split_text(text, CHUNK_CHARS)


def tokenize(text: str, tok, progress: bool = False) -> np.ndarray:
    """Token ids of `text`, as uint16 when the vocabulary fits, else uint32."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    pieces = list(_chunks(text))
    if progress and len(pieces) > 4:
        from tqdm import tqdm
        pieces = tqdm(pieces, desc="tokenizing", unit="MB")
    return np.concatenate([np.asarray(tok.encode(p), dtype=dtype) for p in pieces])


@dataclass
class Dataset:
    """Train/val token streams (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: object


def prepare(data_path: str, tokenizer: str, cache_dir: str | os.PathLike, block_size: int = 1,
            val_frac: float = 0.1, progress: bool = False, tok=None) -> Dataset:
    """Tokenize `data_path` into `cache_dir/{train,val}.bin` (+ meta.json), or reuse them.

    The cache is reused when the source file's sha256 and the tokenizer are unchanged.
    `tok` (optional) is a ready tokenizer to use, e.g. the one of a model being fine-tuned.
    The first 90% of the tokens train, the last 10% validate (as nanoGPT's prepare.py).
    Both splits must hold more than one window of `block_size + 1` tokens; nothing is
    written when the corpus is too short.
    """
    src = Path(data_path)
    text = read_text(src)  # validates existence / emptiness / encoding
    if tok is None and tokenizer not in ("char", "gpt2"):  # a tokenizer folder
        tok = get_tokenizer(tokenizer)
    cache = Path(cache_dir)
    meta_path = cache / "meta.json"
    digest = sha256_file(src)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            same_tok = (meta.get("tokenizer") == tok.to_dict() if tok is not None
                        else meta.get("tokenizer", {}).get("type") == tokenizer)
            if meta.get("source_sha256") == digest and same_tok and meta.get("val_frac") == val_frac:
                tok = tokenizer_from_dict(meta["tokenizer"])
                dtype = np.dtype(meta["dtype"])
                train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
                val = np.memmap(cache / "val.bin", dtype=dtype, mode="r")
                if len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]:
                    _check_long_enough(len(train), len(val), block_size, data_path)
                    return Dataset(train, val, tok)
        except (OSError, ValueError, KeyError):
            pass  # stale or damaged cache: rebuild it below
    tok = tok if tok is not None else get_tokenizer(tokenizer, text=text)
    ids = tokenize(text, tok, progress=progress)
    n_train = int(len(ids) * (1 - val_frac))
    _check_long_enough(n_train, len(ids) - n_train, block_size, data_path)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(cache / "train.bin", ids[:n_train].tobytes())
    atomic_write(cache / "val.bin", ids[n_train:].tobytes())
    meta = {"source": str(src.resolve()), "source_sha256": digest, "tokenizer": tok.to_dict(),
            "dtype": ids.dtype.name, "vocab_size": tok.vocab_size, "val_frac": val_frac,
            "train_tokens": n_train, "val_tokens": len(ids) - n_train}
    atomic_write(meta_path, json.dumps(meta).encode())  # written last: marks the cache valid
    return Dataset(np.memmap(cache / "train.bin", dtype=ids.dtype, mode="r"),
                   np.memmap(cache / "val.bin", dtype=ids.dtype, mode="r"), tok)


def _check_long_enough(n_train: int, n_val: int, block_size: int, path) -> None:
    if min(n_train, n_val) <= block_size:
        raise ConfigError(
            f"corpus too short: {path} gives {n_train} train / {n_val} val tokens, but each split "
            f"needs more than one block of {block_size} tokens (use a larger file or --block-size)")


def batch_indices(n_tokens: int, block_size: int, batch_size: int, rng: np.random.Generator):
    """Start offsets of `batch_size` random windows of block_size + 1 tokens."""
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(ids: np.ndarray, block_size: int, batch_size: int, rng: np.random.Generator,
              rows: slice = slice(None)):
    """Random contiguous windows: x [B, T] and y = x shifted by one, both int32.

    All B offsets are drawn (so every process agrees on the global batch), but only the
    windows in `rows` are read: a process of a multi-process run loads just its own rows.
    """
    ix = batch_indices(len(ids), block_size, batch_size, rng)[rows]
    window = np.stack([np.asarray(ids[i:i + block_size + 1]) for i in ix]).astype(np.int32)
    return window[:, :-1], window[:, 1:]


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The data-loader RNG of one optimizer step: a pure function of (seed, step), so a resumed
    run draws exactly the batches the uninterrupted run would have."""
    return np.random.default_rng([seed, step])
