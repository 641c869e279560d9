"""Token shards in llm.c's format, a prepared folder's manifest, and a window loader over them.

A shard is a 1024-byte header of 256 little-endian int32s (`[0]` = 20240520, the magic; `[1]` =
1, the version; `[2]` = the token count; the rest zero) followed by the tokens as uint16, the
files llm.c's `dev/data/*.py` and modded-nanogpt's `fineweb.py` write and publish. A vocabulary
over 65,536 tokens uses llm.c's Llama 3 variant: magic 20240801, version 7, uint32 tokens
(`shard_format(vocab_size)` picks; readers accept both). A folder that
`python -m jaxgpt.prepare` wrote also holds `manifest.json` (sources, tokenizer, document count
and the shards in stream order with their split, token count and sha256).

`ShardDataset` trains on either kind of folder (or a glob of `.bin` files)::

    from jaxgpt.data.shards import ShardDataset
    from jaxgpt.tokenizers.tokenizer import tokenizer_from_dict

    ds = ShardDataset("data/fineweb10B")            # a prepared folder, or a glob of llm.c shards
    ds.vocab_size, ds.tokenizer["name"]              # 50257, "gpt2" (a bare llm.c folder is GPT-2)
    tok = tokenizer_from_dict(ds.tokenizer)          # gpt2, or char (its EOT is the last id)
    B, T = 16, 1024
    for step in range(start_step, max_steps):
        # the global batch of `step` is a pure function of (seed, step); this process reads only
        # its own rows of it (here: process p of P takes a contiguous slice of the B rows)
        x, y = ds.batch(seed, step, B, T, rows=slice(p * B // P, (p + 1) * B // P))
        ...
    for x, y in ds.val_batches(T, B, n_tokens=10_485_760, rows=slice(p * B // P, (p + 1) * B // P)):
        ...

Windows are the non-overlapping `T + 1`-token windows of each train shard (x = tokens[iT : iT+T],
y = tokens[iT+1 : iT+T+1]; a window never crosses a shard). Row `j` of the batch of step `s` is
position `p = s * B + j` of an endless sequence of epochs: epoch `p // W` (W = number of windows)
is a permutation of all W windows drawn by a numpy Generator seeded with (seed, epoch), and the row
reads window `perm[p % W]`. So every epoch visits each window exactly once, any process count
sees the same global batches, and a resumed run (any process count) gets exactly the batches
of the uninterrupted one. Shards are memory-mapped: a batch reads only its own rows' tokens.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.files import atomic_write_bytes

MAGIC = 20240520  # llm.c's GPT-2 token shards
VERSION = 1  # version 1 = uint16 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAGIC32, VERSION32 = 20240801, 7  # llm.c's Llama 3 shards (dev/data/data_common.py): uint32 tokens
TOKEN_DTYPE32 = np.dtype("<u4")
# (magic, version) -> token dtype
FORMATS = {(MAGIC, VERSION): TOKEN_DTYPE, (MAGIC32, VERSION32): TOKEN_DTYPE32}
MAX_SHARD_TOKENS = 2**31 - 1  # the header's count is an int32
MANIFEST = "manifest.json"
STATE = ".prepare-state.json"  # an unfinished preparation (jaxgpt.prepare resumes it)
DEFAULT_VAL_TOKENS = 10_485_760  # llm.c's val_max_steps * B * T default
GPT2_INFO = {"type": "gpt2", "name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
_VAL_NAME = re.compile(r"(?:^|[_\-.])val(?:idation)?(?:[_\-.]|$)")


# ----------------------------------------------------------------------------- files











def shard_format(vocab_size: int) -> tuple[int, int, np.dtype]:
    """(magic, version, token dtype) of shards for a vocabulary: uint16 while it fits, else uint32."""
    if int(vocab_size) <= 65536:
        return MAGIC, VERSION, TOKEN_DTYPE
    return MAGIC32, VERSION32, TOKEN_DTYPE32


def make_header(n_tokens: int, dtype=TOKEN_DTYPE) -> np.ndarray:
    if not 0 <= n_tokens <= MAX_SHARD_TOKENS:
        raise ConfigError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens, got {n_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    magic, version = next(k for k, v in FORMATS.items() if v == np.dtype(dtype))
    header[0], header[1], header[2] = magic, version, n_tokens
    return header


def write_shard(path, tokens, dtype=TOKEN_DTYPE) -> str:
    """Write `tokens` as an llm.c shard of `dtype` (uint16, or uint32: the Llama 3 format),
    atomically; returns the file's sha256."""
    tokens, dtype = np.asarray(tokens), np.dtype(dtype)
    if tokens.dtype != dtype:
        top = np.iinfo(dtype).max
        if tokens.size and (tokens.min() < 0 or tokens.max() > top):
            raise ConfigError(f"these llm.c shards hold {dtype.name} tokens; a token id is outside "
                              f"0..{top}")
        tokens = tokens.astype(dtype)
    tokens = np.ascontiguousarray(tokens)
    header = make_header(int(tokens.size), dtype).tobytes()
    body = memoryview(tokens).cast("B")
    h = hashlib.sha256(header)
    h.update(body)
    atomic_write_bytes(path, [header, body])
    return h.hexdigest()


def read_header(path) -> int:
    """The token count of shard `path`, after checking its magic, version and size."""
    return _read_header(path)[0]


def _read_header(path) -> tuple[int, np.dtype]:
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read shard {path}: {e.strerror or e}") from None
    if len(raw) < HEADER_BYTES:
        raise ConfigError(f"shard {path} is {size} bytes, shorter than llm.c's 1024-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version = int(header[0]), int(header[1])
    if magic not in (MAGIC, MAGIC32):
        raise ConfigError(f"shard {path} has magic {magic}, not llm.c's {MAGIC} (uint16) or "
                          f"{MAGIC32} (uint32)")
    dtype = FORMATS.get((magic, version))
    if dtype is None:
        raise ConfigError(f"shard {path} has version {version}; with magic {magic} only version "
                          f"{VERSION if magic == MAGIC else VERSION32} "
                          f"({'uint16' if magic == MAGIC else 'uint32'} tokens) is supported")
    n = int(header[2])
    expect = HEADER_BYTES + dtype.itemsize * n
    if n < 0 or size != expect:
        raise ConfigError(f"shard {path}: header says {n} tokens ({expect} bytes) but the file is "
                          f"{size} bytes (truncated or corrupt)")
    return n, dtype


def read_shard(path) -> np.ndarray:
    """All tokens of shard `path` as a read-only uint16 (or uint32) memmap (header validated)."""
    n, dtype = _read_header(path)
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def split_of(filename: str) -> str:
    """"val" for llm.c-style names with a val component (fineweb_val_000000.bin), else "train"."""
    return "val" if _VAL_NAME.search(Path(filename).stem.lower()) else "train"


def load_manifest(folder) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
        if not isinstance(m.get("shards"), list):
            raise ValueError("no shards list")
        return m
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p} is not a valid jaxgpt.prepare manifest ({e})") from None


# ----------------------------------------------------------------------------- loader


class _Split:
    """The shards of one split, in stream order, memory-mapped on first use."""

    def __init__(self, files: list[str], counts: list[int]):
        self.files = files
        self.counts = np.asarray(counts, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def shard(self, k: int) -> np.ndarray:
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = read_shard(self.files[k])
        return m

    def window_starts(self, block_size: int) -> np.ndarray:
        """Cumulative window counts: shard k holds windows [c[k], c[k+1])."""
        per = np.maximum(self.counts - 1, 0) // block_size
        return np.concatenate([[0], np.cumsum(per)]).astype(np.int64)

    def read(self, windows: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        cum = self.window_starts(block_size)
        shard_ix = np.searchsorted(cum, windows, side="right") - 1
        out = np.empty((len(windows), block_size + 1), dtype=np.int32)
        for i, (g, k) in enumerate(zip(windows.tolist(), shard_ix.tolist())):
            start = (g - int(cum[k])) * block_size
            out[i] = self.shard(k)[start:start + block_size + 1]
        return np.ascontiguousarray(out[:, :-1]), np.ascontiguousarray(out[:, 1:])


class ShardDataset:
    """Train/val token shards (llm.c format) with seeded, without-replacement batches.

    `path`: a folder written by `python -m jaxgpt.prepare` (its manifest.json lists the shards),
    a folder of llm.c `.bin` shards, one `.bin` file, or a glob of them. Files whose name has a
    `val` part (`fineweb_val_000000.bin`) are validation, the others train, in sorted order.
    Every shard's header is checked here (magic, version, size); a bad one is a ConfigError
    naming the file. See the module docstring for the batch order and an example.
    """

    def __init__(self, path):
        self.path = str(path)
        self.manifest = None
        files = self._find(self.path)
        train, val = ([], []), ([], [])
        listed = {}
        if self.manifest is not None:
            listed = {s["file"]: s for s in self.manifest["shards"]}
        for f, split in files:
            n = read_header(f)
            entry = listed.get(os.path.basename(f))
            if entry is not None and int(entry.get("tokens", n)) != n:
                raise ConfigError(f"shard {f} holds {n} tokens but {MANIFEST} says "
                                  f"{entry['tokens']}")
            group = val if split == "val" else train
            group[0].append(f)
            group[1].append(n)
        self.train = _Split(*train)
        self.val = _Split(*val)
        self._perms: OrderedDict = OrderedDict()
        tok = (self.manifest or {}).get("tokenizer") or GPT2_INFO
        self.tokenizer: dict = dict(tok)
        self.vocab_size: int = int(self.tokenizer.get("vocab_size", GPT2_INFO["vocab_size"]))
        self.eot_token = self.tokenizer.get("eot_token")

    def _find(self, path: str) -> list[tuple[str, str]]:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, MANIFEST)):
                self.manifest = load_manifest(path)
                out = []
                for s in self.manifest["shards"]:
                    f = os.path.join(path, s["file"])
                    if not os.path.isfile(f):
                        raise ConfigError(f"shard {f} listed in {MANIFEST} is missing")
                    out.append((f, s.get("split", split_of(s["file"]))))
                return out
            if os.path.exists(os.path.join(path, STATE)):
                raise ConfigError(f"{path} is an unfinished preparation; run python -m "
                                  "jaxgpt.prepare again with the same arguments to finish it")
            files = sorted(glob.glob(os.path.join(glob.escape(path), "*.bin")))
            if not files:
                raise ConfigError(f"data folder {path} holds no manifest.json and no .bin shards")
        elif os.path.isfile(path):
            files = [path]
        else:
            files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
            if not files:
                raise ConfigError(f"data path {path} does not exist or matches no files")
        return [(f, split_of(f)) for f in files]

    # -- train batches

    def num_windows(self, block_size: int) -> int:
        """Windows of block_size + 1 tokens in one epoch over the train shards."""
        return int(self.train.window_starts(block_size)[-1])

    def steps_per_epoch(self, batch_size: int, block_size: int) -> float:
        return self.num_windows(block_size) / batch_size

    def _perm(self, seed: int, epoch: int, block_size: int) -> np.ndarray:
        key = (int(seed), int(epoch), int(block_size))
        p = self._perms.get(key)
        if p is None:
            n = self.num_windows(block_size)
            ss = np.random.SeedSequence([int(seed), int(epoch)])
            rng = np.random.Generator(np.random.PCG64(ss))
            p = rng.permutation(n)
            self._perms[key] = p
            while len(self._perms) > 2:  # a batch spans at most two epochs
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return p

    @staticmethod
    def _rows(rows, batch_size: int) -> np.ndarray:
        if rows is None:
            return np.arange(batch_size, dtype=np.int64)
        if isinstance(rows, slice):
            return np.arange(batch_size, dtype=np.int64)[rows]
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= batch_size):
            raise ConfigError(f"rows must lie in [0, {batch_size}), got {r.min()}..{r.max()}")
        return r

    def batch_windows(self, seed: int, step: int, batch_size: int, block_size: int,
                      rows=None) -> np.ndarray:
        """Global window ids of `rows` of the batch of `step` (what `batch` reads)."""
        if batch_size < 1 or block_size < 1 or step < 0:
            raise ConfigError(f"need batch_size >= 1, block_size >= 1 and step >= 0, got "
                              f"{batch_size}, {block_size}, {step}")
        n = self.num_windows(block_size)
        if n == 0:
            raise ConfigError(f"the train shards of {self.path} ({self.train.tokens} tokens in "
                              f"{len(self.train.files)} files) hold no window of "
                              f"{block_size + 1} tokens")
        pos = int(step) * batch_size + self._rows(rows, batch_size)
        epoch, idx = np.divmod(pos, n)
        out = np.empty_like(pos)
        for e in np.unique(epoch).tolist():
            m = epoch == e
            out[m] = self._perm(seed, e, block_size)[idx[m]]
        return out

    def batch(self, seed: int, step: int, batch_size: int, block_size: int, rows=None):
        """(x, y) int32 [len(rows), block_size]: rows of the global batch of `step`.

        A pure function of (seed, step, batch_size, block_size): `rows` (a slice or an array of
        row indices in [0, batch_size), default all) picks this process's rows, and only their
        tokens are read.
        """
        return self.train.read(self.batch_windows(seed, step, batch_size, block_size, rows),
                               block_size)

    # -- validation

    def num_val_batches(self, block_size: int, batch_size: int,
                        n_tokens: int = DEFAULT_VAL_TOKENS) -> int:
        """Batches of the fixed val prefix: n_tokens // (B*T), capped by the val shards' size."""
        if not self.val.files:
            raise ConfigError(f"{self.path} has no validation shard")
        avail = int(self.val.window_starts(block_size)[-1]) // batch_size
        n = min(int(n_tokens) // (batch_size * block_size), avail)
        if n < 1:
            raise ConfigError(f"the validation shards of {self.path} ({self.val.tokens} tokens) "
                              f"give no batch of {batch_size} x {block_size + 1} tokens with "
                              f"--val-tokens {n_tokens}")
        return n

    def val_batches(self, block_size: int, batch_size: int, n_tokens: int = DEFAULT_VAL_TOKENS,
                    rows=None):
        """Yield (x, y) int32 batches over the first tokens of the val shard(s), in order.

        Batch b, row r is window b * B + r: consecutive T-token windows from the start of the val
        stream, exactly llm.c's val loader (B*T + 1 tokens per batch, advancing B*T). `rows` as
        in `batch`, so processes can split each val batch.
        """
        nb = self.num_val_batches(block_size, batch_size, n_tokens)
        r = self._rows(rows, batch_size)
        for b in range(nb):
            yield self.val.read(b * batch_size + r, block_size)

    def __repr__(self) -> str:
        return (f"ShardDataset({self.path!r}: {len(self.train.files)} train shards "
                f"{self.train.tokens:,} tokens, {len(self.val.files)} val shards "
                f"{self.val.tokens:,} tokens, tokenizer {self.tokenizer.get('name')})")
