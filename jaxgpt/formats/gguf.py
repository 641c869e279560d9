"""Reading GGUF files (llama.cpp's model format): metadata, tensor table, dequantized tensors.

The format (little-endian, versions 2 and 3; spec: ggml/docs/gguf.md):

    magic b"GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       key: string | value_type u32 | value
    n_tensors x  name: string | n_dims u32 | ne: u64 x n_dims | ggml_type u32 | offset u64
    (string = u64 length + UTF-8 bytes; array = item_type u32 + u64 count + the items)
    padding to `general.alignment` (default 32), then the tensor data; each tensor's offset is
    relative to that start and a multiple of the alignment.

`ne[0]` is ggml's fastest-varying dimension, so the numpy shape is `ne` reversed (a weight
matrix is [out, in]). Quantized types store `ne[0]` in blocks of 32 values, each block a float16
scale `d` (and for the `_1` types a float16 minimum `m`) plus the packed integers `q`:
Q8_0 x = d * q (int8), Q4_0 x = d * (q - 8), Q4_1 x = d * q + m, Q5_0 x = d * (q - 16),
Q5_1 x = d * q + m, with q's low 4 bits packed two per byte (element j in byte j's low
nibble, element j + 16 in its high nibble) and Q5's fifth bits in a u32 `qh` (bit j for element j).

This module owns only the file: it maps it read-only, checks every length and offset against
the file's size (a bad file is a one-line ConfigError naming it) and dequantizes to float32
exactly as the `gguf` package's `gguf.quants.dequantize` does. What the tensors mean belongs
to whoever loads them.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from jaxgpt.config import ConfigError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: deeper than any real file, shallow enough for the stack

# ---------------------------------------------------------------------------------------------
# metadata value types: id -> struct / numpy format of a scalar (8 = string, 9 = array)

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ---------------------------------------------------------------------------------------------
# tensor types: ggml type id -> name, for every type ggml defines (named in errors)

GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# One block of each quantized type, as a packed numpy record (its itemsize is the block's bytes).
QK = 32                      # values per block of every quantized type here
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])


def _scale(blocks: np.ndarray, field: str) -> np.ndarray:
    """A block's float16 field as float32, shaped (n_blocks, 1) to broadcast over its values."""
    return blocks[field].astype(np.float32)[:, None]


def _nibbles(blocks: np.ndarray) -> np.ndarray:
    """(n_blocks,) -> (n_blocks, 32) uint8: the low 4 bits of each value, in value order."""
    qs = blocks["qs"]                                              # (n, 16)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)            # (n, 32)


def _five_bits(blocks: np.ndarray) -> np.ndarray:
    """(n_blocks,) -> (n_blocks, 32) uint8: Q5's 5-bit values, nibble | fifth bit << 4."""
    high = np.unpackbits(blocks["qh"], axis=1, bitorder="little")  # (n, 32): bit j of u32 qh
    return _nibbles(blocks) | (high << 4)


# Each decoder maps (n_blocks,) records to (n_blocks, 32) float32, in gguf.quants' arithmetic
# order (float32 products and sums of exactly representable integers, no fused multiply-add).
_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": lambda b: b["qs"].astype(np.float32) * _scale(b, "d"),
    "Q4_0": lambda b: _scale(b, "d") * (_nibbles(b).astype(np.float32) - 8),
    "Q4_1": lambda b: _scale(b, "d") * _nibbles(b).astype(np.float32) + _scale(b, "m"),
    "Q5_0": lambda b: _scale(b, "d") * (_five_bits(b).astype(np.float32) - 16),
    "Q5_1": lambda b: _scale(b, "d") * _five_bits(b).astype(np.float32) + _scale(b, "m"),
}
_BLOCK_DTYPES = {"Q8_0": _Q8_0, "Q4_0": _Q4_0, "Q4_1": _Q4_1, "Q5_0": _Q5_0, "Q5_1": _Q5_1}
_CHUNK_BLOCKS = 1 << 13      # blocks dequantized at once: 256K values, temporaries in cache

# Plain element types: stored dtype, cast to float32 (BF16 is the top half of a float32).
_ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8",
                   "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}

SUPPORTED_TYPES = tuple(_ELEMENT_DTYPES) + tuple(_BLOCK_DTYPES)


def _type_layout(type_name: str) -> tuple[int, np.dtype]:
    """(values per block, the stored record/element dtype) of a supported type."""
    if type_name in _BLOCK_DTYPES:
        return QK, _BLOCK_DTYPES[type_name]
    return 1, np.dtype(_ELEMENT_DTYPES[type_name])


def _dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """A tensor's stored records (n_blocks,) or elements (n,) -> float32 values, flat (n,)."""
    if type_name == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if type_name in _ELEMENT_DTYPES:
        return raw.astype(np.float32)
    decode = _DECODERS[type_name]
    out = np.empty((len(raw), QK), np.float32)                     # (n_blocks, 32)
    for start in range(0, len(raw), _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = decode(raw[start:start + _CHUNK_BLOCKS])
    return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# the file


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: `shape` in numpy order (ggml's ne reversed), `offset` the
    absolute byte offset of its data in the file, `n_bytes` its stored size."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    n_bytes: int
    offset: int


class GGUFFile:
    """A GGUF file mapped read-only: `version`, `metadata` (key -> Python value), `tensors`
    (name -> TensorInfo, in file order) and `tensor(name)`, dequantized on demand."""

    def __init__(self, path: str, version: int, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], buf: mmap.mmap):
        self.path, self.version, self.metadata, self.tensors = path, version, metadata, tensors
        self._buf = buf

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` as a new float32 array of shape `tensors[name].shape`."""
        info = self.tensors.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: no tensor named {name!r}")
        if info.n_bytes == 0:
            return np.zeros(info.shape, np.float32)
        _, dtype = _type_layout(info.type_name)
        raw = np.frombuffer(self._buf, dtype, info.n_bytes // dtype.itemsize, info.offset)
        return _dequantize(raw, info.type_name).reshape(info.shape)


class _Cursor:
    """Reads the header front to back; every read is checked against the file's size."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise ConfigError(f"{self.path}: truncated GGUF file: {what} at byte {self.pos} needs "
                              f"{n} bytes, the file has {len(self.buf)}")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value of type id `vtype`: a scalar, a str, or a (nested) list."""
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise ConfigError(f"{self.path}: metadata {what!r} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            raise ConfigError(f"{self.path}: metadata {what!r} nests arrays deeper than {MAX_NESTING}")
        item_type, count = self.scalar("<I", what), self.scalar("<Q", what)
        # every item takes at least a few bytes: an absurd count is a truncated file, said at once
        self.need(count * {_STRING: 8, _ARRAY: 12}.get(item_type, 1), what)
        if item_type in _SCALAR_FORMATS:                           # numbers: one numpy read
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            self.need(count * dtype.itemsize, what)
            items = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return items
        if item_type == _STRING:
            return [self.string(what) for _ in range(count)]
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def _check_version(version: int, path: str) -> None:
    if version in VERSIONS:
        return
    if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
        raise ConfigError(f"{path}: big-endian GGUF files are not supported")
    raise ConfigError(f"{path}: unsupported GGUF version {version} "
                      f"(supported: {', '.join(map(str, VERSIONS))})")


def _alignment(metadata: dict[str, Any], path: str) -> int:
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise ConfigError(f"{path}: general.alignment must be a power of two, got {align!r}")
    return align


def _tensor_info(name: str, ne: list[int], type_id: int, rel_offset: int, data_start: int,
                 align: int, file_size: int, path: str) -> TensorInfo:
    """Checks one tensor-table entry against the supported types and the file's size."""
    type_name = GGML_TYPE_NAMES.get(type_id, f"unknown type id {type_id}")
    if type_name not in SUPPORTED_TYPES:
        raise ConfigError(f"{path}: tensor {name!r} has unsupported type {type_name!r} "
                          f"(supported: {', '.join(SUPPORTED_TYPES)})")
    block, dtype = _type_layout(type_name)
    if ne and ne[0] % block:
        raise ConfigError(f"{path}: tensor {name!r} has {ne[0]} values per row, not a multiple "
                          f"of the {type_name} block size {block}")
    n_values = int(np.prod(ne, dtype=object)) if ne else 1
    n_bytes = n_values // block * dtype.itemsize
    offset = data_start + rel_offset
    if rel_offset % align:
        raise ConfigError(f"{path}: tensor {name!r} data offset {rel_offset} is not a multiple of "
                          f"the alignment {align}")
    if offset + n_bytes > file_size:
        raise ConfigError(f"{path}: truncated GGUF file: tensor {name!r} needs bytes "
                          f"{offset}..{offset + n_bytes}, the file has {file_size}")
    return TensorInfo(name, tuple(reversed(ne)), type_name, n_bytes, offset)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Maps the GGUF file at `path` and reads its header; tensors are read by `.tensor(name)`.
    A file that is not GGUF, truncated, or has an unsupported version or tensor type raises
    ConfigError (one line, naming the file)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ConfigError(f"{path}: not a GGUF file (bad magic)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, path)
    cur.pos = len(MAGIC)
    version = cur.scalar("<I", "version")
    _check_version(version, path)
    n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
    cur.need(n_kv * 13 + n_tensors * 24, "the metadata and tensor table")  # their smallest sizes

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.scalar("<I", f"metadata {key!r}")
        if key in metadata:
            raise ConfigError(f"{path}: duplicate metadata key {key!r}")
        metadata[key] = cur.value(vtype, key)
    align = _alignment(metadata, path)

    entries = []                                                   # (name, ne, type id, offset)
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.scalar("<I", f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise ConfigError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGUF allows {MAX_DIMS})")
        ne = [cur.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims)]
        entries.append((name, ne, cur.scalar("<I", f"tensor {name!r}"),
                        cur.scalar("<Q", f"tensor {name!r}")))
    data_start = -(-cur.pos // align) * align                      # pad to the alignment

    tensors: dict[str, TensorInfo] = {}
    for name, ne, type_id, rel_offset in entries:
        if name in tensors:
            raise ConfigError(f"{path}: duplicate tensor name {name!r}")
        tensors[name] = _tensor_info(name, ne, type_id, rel_offset, data_start, align, len(buf),
                                     path)
    return GGUFFile(path, version, metadata, tensors, buf)
