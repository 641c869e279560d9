"""Hostile model files: every malformed GGUF, Hugging Face folder, LoRA adapter, jaxgpt checkpoint
and nanoGPT ckpt.pt that `jaxgpt.load` can meet is one ConfigError line naming the file, raised
within 5 s and without a large allocation (issue 26, point 4); through each CLI that takes a
model it is `error: ...` and exit status 2 (slow tier).

The files are written by the formats' own writers (the `gguf` package's GGUFWriter, safetensors,
torch.save, orbax through jaxgpt's checkpoint writer) from a valid tiny model, then broken one way
each; the valid file of each format loads (the positive control), so each failure is the
breakage's. A few header-level breakages (absurd lengths and counts) are written byte by byte.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import jaxgpt  # noqa: E402
from jaxgpt.formats import checkpoint  # noqa: E402
from jaxgpt.formats import hf as hf_format, llama as llama_format
from jaxgpt.config import ConfigError, GPTConfig  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Time is counted as this process's CPU seconds (all threads): the test machines run many jobs on
# few cores, where wall time measures the neighbours; a hang still shows, as a wall-clock bound.
TIME_LIMIT_S = 5.0
HANG_LIMIT_S = 60.0
RSS_GROWTH_LIMIT_MB = 256  # a 10**9-layer table or model would take gigabytes

GPT2 = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA = GPTConfig.llama(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                        n_inner=48)
V = gguf.GGUFValueType


# ---- valid files ----------------------------------------------------------------------------------
GGUF_OF_HF = {v: k for k, v in llama_format.GGUF_NAMES.items()}


def gguf_meta(cfg: GPTConfig) -> dict:
    """llama.* metadata as (value, type) pairs, the keys llama.cpp's converter writes."""
    return {"general.architecture": ("llama", V.STRING),
            "llama.block_count": (cfg.n_layer, V.UINT32),
            "llama.context_length": (cfg.block_size, V.UINT32),
            "llama.embedding_length": (cfg.n_embd, V.UINT32),
            "llama.feed_forward_length": (cfg.mlp_dim, V.UINT32),
            "llama.attention.head_count": (cfg.n_head, V.UINT32),
            "llama.attention.head_count_kv": (cfg.kv_heads, V.UINT32),
            "llama.rope.freq_base": (cfg.rope_theta, V.FLOAT32),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
            "llama.vocab_size": (cfg.vocab_size, V.UINT32)}


def gguf_tensors(cfg: GPTConfig) -> dict[str, np.ndarray]:
    """A random Llama model's weights under GGUF names ([out, in], as llama.cpp stores them)."""
    hf = llama_format.llama_tensors_from_model(GPT(cfg, seed=1))
    out = {}
    for name, x in hf.items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            sub = ".".join(parts[3:-1])
            out[f"blk.{parts[2]}.{GGUF_OF_HF[sub]}.weight"] = x
        else:
            out[GGUF_OF_HF[".".join(parts[:-1])] + ".weight"] = x
    return out


def write_gguf(path: Path, meta: dict | None = None, tensors: dict | None = None, **changes) -> Path:
    """A GGUF file by the gguf package: LLAMA's metadata with `changes` (key -> (value, type),
    or None to drop it; '__' stands for '.') and `tensors` (default: LLAMA's)."""
    meta = dict(meta or gguf_meta(LLAMA))
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    w = gguf.GGUFWriter(str(path), None)
    for key, (value, vtype) in meta.items():
        sub = V.UINT32 if vtype == V.ARRAY and value and isinstance(value[0], int) else None
        w.add_key_value(key, value, vtype, sub)
    for name, x in (gguf_tensors(LLAMA) if tensors is None else tensors).items():
        w.add_tensor(name, np.asarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_gguf(path: Path, n_tensors: int, kvs: bytes = b"", tensor_table: bytes = b"",
             n_kv: int | None = None, version: int = 3, magic: bytes = b"GGUF") -> Path:
    """A GGUF header written byte by byte (for lengths and counts no writer would produce)."""
    n_kv = (1 if kvs else 0) if n_kv is None else n_kv
    path.write_bytes(magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensor_table
                     + b"\0" * 64)
    return path


def gstr(s: str | bytes, n: int | None = None) -> bytes:
    """A GGUF string: u64 length (or the given, lying one) + the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if n is None else n) + b


def hf_folder(path: Path, cfg: GPTConfig, config: dict | None = None, drop=(), tensors=None) -> Path:
    """A Hugging Face folder by jaxgpt's writer, then config.json keys changed (None: removed)
    and tensors dropped or replaced in model.safetensors."""
    from safetensors.numpy import load_file, save_file

    hf_format.save_hf(GPT(cfg, seed=1), path)
    if config:
        d = json.loads((path / "config.json").read_text())
        d.update(config)
        d = {k: v for k, v in d.items() if v is not None}
        (path / "config.json").write_text(json.dumps(d))
    if drop or tensors:
        st = load_file(str(path / "model.safetensors"))
        st = {**{k: v for k, v in st.items() if k not in drop}, **(tensors or {})}
        save_file(st, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def jaxgpt_run(path: Path, cfg: GPTConfig = GPT2, meta_changes: dict | None = None) -> Path:
    """A jaxgpt checkpoint folder (save_model), then its saved model_config changed by hand."""
    checkpoint.save_model(path, GPT(cfg, seed=1), None)
    if meta_changes is not None:
        f = path / "checkpoints" / "0" / "meta" / "metadata"
        meta = json.loads(f.read_text())
        if callable(meta_changes):
            meta = meta_changes(meta)
        else:
            meta["model_config"].update(meta_changes)
        f.write_text(json.dumps(meta))
    return path


def nanogpt_ckpt(path: Path, args_changes: dict | None = None, obj=None, model_changes=None) -> Path:
    """A nanoGPT ckpt.pt (torch.save of {'model', 'model_args'}), GPT2's weights transposed into
    nn.Linear layout, with `args_changes` to model_args; or `obj` saved as it is."""
    import torch

    if obj is None:
        hf = hf_format.tensors_from_model(GPT(GPT2, seed=1))
        tensors = {}
        for e in hf_format.rename_table(GPT2):  # nn.Linear layout: the four matrices transposed
            x = hf["transformer." + e.hf]
            tensors["transformer." + e.hf] = torch.from_numpy(np.array(x.T if e.matrix else x))
        tensors.update(model_changes or {})
        args = {"vocab_size": GPT2.vocab_size, "block_size": GPT2.block_size, "n_layer": GPT2.n_layer,
                "n_head": GPT2.n_head, "n_embd": GPT2.n_embd, "bias": True, **(args_changes or {})}
        obj = {"model": tensors, "model_args": args}
    torch.save(obj, str(path))
    return path


_ADAPTERS: dict[tuple, Path] = {}  # (base, rank) -> the adapter written once; each case is a copy


def adapter(root: Path, base: Path, name: str, changes: dict | None = None, rank: int = 2) -> Path:
    """A LoRA adapter on the jaxgpt run `base` (conftest.random_adapter, written once per base and
    rank; later ones are copies of that folder), then adapter.json keys changed (None: removed)."""
    from conftest import random_adapter

    if (base, rank) not in _ADAPTERS:
        _ADAPTERS[base, rank] = random_adapter(base, root / f"template-r{rank}", rank, ["c_attn", "c_fc"], seed=3)
    out = Path(shutil.copytree(_ADAPTERS[base, rank], root / name))
    if changes:
        meta = json.loads((out / "adapter.json").read_text())
        meta.update(changes)
        meta = {k: v for k, v in meta.items() if v is not None}
        (out / "adapter.json").write_text(json.dumps(meta))
    return out


# ---- the cases ------------------------------------------------------------------------------------
def gguf_cases(d: Path) -> dict:
    """name -> (path, words the error line must hold)."""
    t = gguf_tensors(LLAMA)
    c = {}
    c["gguf_block_count_1e9"] = (write_gguf(d / "a.gguf", llama__block_count=(10**9, V.UINT32)), ["n_layer"])
    c["gguf_block_count_3"] = (write_gguf(d / "b.gguf", llama__block_count=(3, V.UINT32)), ["3 layers", "2"])
    c["gguf_head_count_0"] = (write_gguf(d / "c.gguf", llama__attention__head_count=(0, V.UINT32)), ["metadata"])
    c["gguf_head_count_kv_0"] = (write_gguf(d / "c2.gguf", llama__attention__head_count_kv=(0, V.UINT32)),
                                 ["n_kv_head"])
    c["gguf_head_count_kv_3"] = (write_gguf(d / "c3.gguf", llama__attention__head_count_kv=(3, V.UINT32)),
                                 ["n_kv_head"])
    c["gguf_embd_not_divisible"] = (write_gguf(d / "d.gguf", llama__attention__head_count=(5, V.UINT32)),
                                    ["divisible"])
    c["gguf_block_count_str"] = (write_gguf(d / "e.gguf", llama__block_count=("two", V.STRING)), ["n_layer"])
    c["gguf_block_count_float"] = (write_gguf(d / "f.gguf", llama__block_count=(2.5, V.FLOAT32)), ["n_layer"])
    c["gguf_block_count_array"] = (write_gguf(d / "f2.gguf", llama__block_count=([2, 2], V.ARRAY)), ["n_layer"])
    c["gguf_block_count_missing"] = (write_gguf(d / "f3.gguf", llama__block_count=None), ["n_layer"])
    c["gguf_context_1e12"] = (write_gguf(d / "g.gguf", llama__context_length=(10**12, V.UINT64)),
                              ["block_size"])
    c["gguf_ffn_0"] = (write_gguf(d / "h.gguf", llama__feed_forward_length=(0, V.UINT32)), ["n_inner"])
    c["gguf_vocab_1e9"] = (write_gguf(d / "i.gguf", llama__vocab_size=(10**9, V.UINT32)), ["vocab_size"])
    c["gguf_vocab_wrong"] = (write_gguf(d / "j.gguf", llama__vocab_size=(80, V.UINT32)),
                             ["token_embd.weight", "[64, 32]", "[80, 32]"])
    c["gguf_eps_nan"] = (write_gguf(d / "j2.gguf", llama__attention__layer_norm_rms_epsilon=(float("nan"), V.FLOAT32)),
                         ["layer_norm_epsilon"])
    c["gguf_arch"] = (write_gguf(d / "k.gguf", general__architecture=("bert", V.STRING)), ["bert"])
    c["gguf_missing_tensor"] = (write_gguf(d / "l.gguf", tensors={k: v for k, v in t.items()
                                                                  if k != "blk.1.ffn_up.weight"}),
                                ["missing tensor blk.1.ffn_up.weight"])
    c["gguf_extra_layer"] = (write_gguf(d / "m.gguf", tensors={**t, "blk.2.attn_norm.weight": t["blk.0.attn_norm.weight"]}),
                             ["2 layers", "3"])
    c["gguf_unknown_tensor"] = (write_gguf(d / "n.gguf", tensors={**t, "blk.0.attn_q_norm.weight": t["blk.0.attn_norm.weight"]}),
                                ["unexpected tensor blk.0.attn_q_norm.weight"])
    c["gguf_wrong_shape"] = (write_gguf(d / "o.gguf", tensors={**t, "blk.1.ffn_up.weight": t["blk.1.ffn_up.weight"][:40]}),
                             ["blk.1.ffn_up.weight", "[40, 32]", "[48, 32]"])
    c["gguf_transposed"] = (write_gguf(d / "o2.gguf", tensors={**t, "blk.0.ffn_down.weight": t["blk.0.ffn_down.weight"].T}),
                            ["blk.0.ffn_down.weight", "shape"])
    good = (d / "ok.gguf").read_bytes() if (d / "ok.gguf").exists() else write_gguf(d / "ok.gguf").read_bytes()
    (d / "trunc.gguf").write_bytes(good[: len(good) * 2 // 3])
    c["gguf_truncated"] = (d / "trunc.gguf", ["truncated"])
    (d / "trunc_header.gguf").write_bytes(good[:200])
    c["gguf_truncated_header"] = (d / "trunc_header.gguf", ["truncated"])
    (d / "magic.gguf").write_bytes(b"GGML" + good[4:])
    c["gguf_bad_magic"] = (d / "magic.gguf", ["bad magic"])
    (d / "version.gguf").write_bytes(good[:4] + struct.pack("<I", 99) + good[8:])
    c["gguf_bad_version"] = (d / "version.gguf", ["version 99"])
    (d / "empty.gguf").write_bytes(b"")
    c["gguf_empty"] = (d / "empty.gguf", ["bad magic"])
    c["gguf_tensor_count_2e60"] = (raw_gguf(d / "tc.gguf", 2**60), ["truncated"])
    c["gguf_kv_count_2e60"] = (raw_gguf(d / "kc.gguf", 0, n_kv=2**60), ["truncated"])
    c["gguf_key_length_2e62"] = (raw_gguf(d / "kl.gguf", 0, gstr("general.architecture", 2**62)), ["truncated"])
    c["gguf_string_length_2e62"] = (raw_gguf(d / "sl.gguf", 0, gstr("general.name") + struct.pack("<I", 8)
                                             + gstr("x", 2**62)), ["truncated"])
    c["gguf_array_count_2e60"] = (raw_gguf(d / "ac.gguf", 0, gstr("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**60)),
                                  ["truncated"])
    c["gguf_number_array_2e60"] = (raw_gguf(d / "an.gguf", 0, gstr("x") + struct.pack("<IIQ", 9, 4, 2**60)),
                                   ["truncated"])
    nested = gstr("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    c["gguf_nested_arrays_5000"] = (raw_gguf(d / "ne.gguf", 0, nested), ["nests"])
    c["gguf_value_type_99"] = (raw_gguf(d / "vt.gguf", 0, gstr("x") + struct.pack("<I", 99)), ["value type 99"])
    c["gguf_key_not_utf8"] = (raw_gguf(d / "u8.gguf", 0, gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1)), ["UTF-8"])
    c["gguf_n_dims_2e31"] = (raw_gguf(d / "nd.gguf", 1, tensor_table=gstr("token_embd.weight") + struct.pack("<I", 2**31)),
                             ["dimensions"])
    c["gguf_tensor_past_end"] = (raw_gguf(d / "pe.gguf", 1, tensor_table=gstr("token_embd.weight")
                                          + struct.pack("<IQQIQ", 2, 2**40, 2**40, 0, 0)), ["truncated"])
    c["gguf_tensor_type_q6k"] = (raw_gguf(d / "ty.gguf", 1, tensor_table=gstr("token_embd.weight")
                                          + struct.pack("<IQQIQ", 2, 256, 1, 14, 0)), ["Q6_K"])
    c["gguf_alignment_3"] = (raw_gguf(d / "al.gguf", 0, gstr("general.alignment") + struct.pack("<II", 4, 3)),
                             ["alignment"])
    return c


def hf_cases(d: Path) -> dict:
    c = {}
    c["hf_n_layer_1e9"] = (hf_folder(d / "a", GPT2, {"n_layer": 10**9}), ["n_layer"])
    c["hf_n_layer_3"] = (hf_folder(d / "b", GPT2, {"n_layer": 3}), ["3 layers", "2"])
    c["hf_n_head_0"] = (hf_folder(d / "c", GPT2, {"n_head": 0}), ["n_head"])
    c["hf_n_embd_not_divisible"] = (hf_folder(d / "d", GPT2, {"n_head": 5}), ["divisible"])
    c["hf_n_layer_str"] = (hf_folder(d / "e", GPT2, {"n_layer": "two"}), ["n_layer"])
    c["hf_n_layer_float"] = (hf_folder(d / "f", GPT2, {"n_layer": 2.5}), ["n_layer"])
    c["hf_n_embd_negative"] = (hf_folder(d / "g", GPT2, {"n_embd": -32}), ["n_embd"])
    c["hf_n_positions_1e12"] = (hf_folder(d / "h", GPT2, {"n_positions": 10**12}), ["block_size"])
    c["hf_vocab_wrong"] = (hf_folder(d / "i", GPT2, {"vocab_size": 100}), ["wte.weight", "shape"])
    c["hf_eps_str"] = (hf_folder(d / "i2", GPT2, {"layer_norm_epsilon": "tiny"}), ["layer_norm_epsilon"])
    c["hf_missing_tensor"] = (hf_folder(d / "j", GPT2, drop=["transformer.h.1.mlp.c_fc.bias"]),
                              ["missing tensor h.1.mlp.c_fc.bias"])
    c["hf_extra_tensor"] = (hf_folder(d / "k", GPT2, tensors={"transformer.h.0.attn.q_norm.weight": np.zeros(32, np.float32)}),
                            ["unexpected tensor h.0.attn.q_norm.weight"])
    c["hf_wrong_shape"] = (hf_folder(d / "l", GPT2, tensors={"transformer.h.0.mlp.c_fc.weight": np.zeros((32, 100), np.float32)}),
                           ["h.0.mlp.c_fc.weight", "shape"])
    trunc = hf_folder(d / "m", GPT2)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    c["hf_truncated_safetensors"] = (trunc, ["model.safetensors"])
    huge = hf_folder(d / "m2", GPT2)
    (huge / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + data[8:])
    c["hf_safetensors_header_2e60"] = (huge, ["model.safetensors"])
    badjson = hf_folder(d / "n", GPT2)
    (badjson / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    c["hf_bad_json"] = (badjson, ["config.json", "JSON"])
    deep = hf_folder(d / "o", GPT2)
    (deep / "config.json").write_text("[" * 200_000)
    c["hf_json_200k_brackets"] = (deep, ["config.json"])
    listjson = hf_folder(d / "p", GPT2)
    (listjson / "config.json").write_text("[1, 2]")
    c["hf_json_list"] = (listjson, ["config.json", "object"])
    c["hf_model_type"] = (hf_folder(d / "q", GPT2, {"model_type": "bert"}), ["bert"])
    # the Llama family
    c["hf_llama_layers_1e9"] = (hf_folder(d / "r", LLAMA, {"num_hidden_layers": 10**9}), ["n_layer"])
    c["hf_llama_heads_0"] = (hf_folder(d / "s", LLAMA, {"num_attention_heads": 0, "head_dim": None}),
                             ["num_attention_heads"])
    c["hf_llama_kv_heads_3"] = (hf_folder(d / "t", LLAMA, {"num_key_value_heads": 3}), ["n_kv_head"])
    c["hf_llama_hidden_str"] = (hf_folder(d / "u", LLAMA, {"hidden_size": "32"}), ["hidden_size"])
    c["hf_llama_intermediate_1e9"] = (hf_folder(d / "v", LLAMA, {"intermediate_size": 10**9}), ["n_inner"])
    c["hf_llama_wrong_shape"] = (hf_folder(d / "w", LLAMA, tensors={"model.layers.1.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}),
                                 ["k_proj", "[32, 32]", "[16, 32]"])
    c["hf_llama_theta_inf"] = (hf_folder(d / "w2", LLAMA, {"rope_theta": float("inf")}), ["rope_theta"])
    idx = d / "x"
    idx.mkdir()
    (idx / "config.json").write_text((d / "w" / "config.json").read_text())
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    c["hf_index_bad_weight_map"] = (idx, ["index"])
    return c


def checkpoint_cases(d: Path) -> dict:
    c = {}
    c["ckpt_n_layer_1e9"] = (jaxgpt_run(d / "a", meta_changes={"n_layer": 10**9}), ["n_layer"])
    c["ckpt_n_layer_3"] = (jaxgpt_run(d / "b", meta_changes={"n_layer": 3}), ["3 layers", "2"])
    c["ckpt_n_embd_64"] = (jaxgpt_run(d / "c", meta_changes={"n_embd": 64}), ["shape", "expected [192]"])
    c["ckpt_n_head_0"] = (jaxgpt_run(d / "d", meta_changes={"n_head": 0}), ["n_head"])
    c["ckpt_n_head_str"] = (jaxgpt_run(d / "d2", meta_changes={"n_head": "2"}), ["n_head"])
    c["ckpt_unknown_norm"] = (jaxgpt_run(d / "d3", meta_changes={"norm": "batchnorm"}), ["norm"])
    c["ckpt_model_config_list"] = (jaxgpt_run(d / "e", meta_changes=lambda m: {**m, "model_config": [1]}),
                                   ["model_config"])
    c["ckpt_no_model_config"] = (jaxgpt_run(d / "f", meta_changes=lambda m: {"step": 0}), ["model config"])
    bad = jaxgpt_run(d / "g")
    (bad / "checkpoints" / "0" / "meta" / "metadata").write_text('{"model_config": {')
    c["ckpt_meta_bad_json"] = (bad, ["checkpoint"])
    gone = jaxgpt_run(d / "h")
    shutil.rmtree(gone / "checkpoints" / "0" / "params")
    c["ckpt_params_missing"] = (gone, ["checkpoint", "corrupt"])
    torn = jaxgpt_run(d / "i")
    for f in (torn / "checkpoints" / "0" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    c["ckpt_data_truncated"] = (torn, ["checkpoint", "corrupt"])
    empty = d / "j"
    (empty / "checkpoints").mkdir(parents=True)
    c["ckpt_no_checkpoints"] = (empty, ["no checkpoint"])
    return c


def nanogpt_cases(d: Path) -> dict:
    import torch

    c = {}
    c["nanogpt_n_layer_1e9"] = (nanogpt_ckpt(d / "a.pt", {"n_layer": 10**9}), ["n_layer"])
    c["nanogpt_n_layer_3"] = (nanogpt_ckpt(d / "b.pt", {"n_layer": 3}), ["3 layers"])
    c["nanogpt_n_head_0"] = (nanogpt_ckpt(d / "c.pt", {"n_head": 0}), ["n_head"])
    c["nanogpt_n_embd_str"] = (nanogpt_ckpt(d / "c2.pt", {"n_embd": "32"}), ["n_embd"])
    c["nanogpt_no_model_args"] = (nanogpt_ckpt(d / "d.pt", obj={"model": {}}), ["model_args"])
    c["nanogpt_model_args_lacks"] = (nanogpt_ckpt(d / "d2.pt", obj={"model": {}, "model_args": {"n_layer": 2}}),
                                     ["lacks"])
    c["nanogpt_list"] = (nanogpt_ckpt(d / "e.pt", obj=[1, 2]), ["dict"])
    c["nanogpt_wrong_shape"] = (nanogpt_ckpt(d / "f.pt", model_changes={"transformer.h.0.attn.c_proj.weight": torch.zeros(32, 16)}),
                                ["c_proj.weight", "shape"])
    c["nanogpt_not_tensor"] = (nanogpt_ckpt(d / "f2.pt", model_changes={"transformer.ln_f.bias": 3}), ["ln_f.bias"])
    good = nanogpt_ckpt(d / "ok.pt").read_bytes()
    (d / "g.pt").write_bytes(good[: len(good) // 2])
    c["nanogpt_truncated"] = (d / "g.pt", ["g.pt"])
    (d / "h.pt").write_bytes(os.urandom(4096))
    c["nanogpt_garbage"] = (d / "h.pt", ["h.pt"])
    torch.save({"model": {}, "model_args": {}, "evil": Evil()}, str(d / "i.pt"))
    c["nanogpt_pickled_code"] = (d / "i.pt", ["i.pt", "PyTorch"])
    return c


class Evil:
    """An object whose unpickling would run code (weights_only refuses it)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def adapter_cases(d: Path, base: Path) -> dict:
    c = {}
    a = lambda name, changes=None, **kw: adapter(d, base, name, changes, **kw)  # noqa: E731
    bad = a("a")
    (bad / "adapter.json").write_text("{not json")
    c["lora_bad_json"] = (bad, ["adapter"])
    lst = a("b")
    (lst / "adapter.json").write_text("[]")
    c["lora_json_list"] = (lst, ["adapter.json", "object"])
    c["lora_missing_rank"] = (a("c", {"rank": None}), ["missing 'rank'"])
    c["lora_rank_str"] = (a("d", {"rank": "2"}), ["rank", "integer"])
    c["lora_rank_0"] = (a("e", {"rank": 0}), ["rank"])
    c["lora_rank_1e9"] = (a("f", {"rank": 10**9}), ["rank"])
    c["lora_rank_4_saved_2"] = (a("g", {"rank": 4}), ["lora_a", "shape"])
    c["lora_alpha_str"] = (a("h", {"alpha": "x"}), ["alpha"])
    c["lora_targets_int"] = (a("i", {"targets": 5}), ["targets"])
    c["lora_targets_unknown"] = (a("j", {"targets": ["q_norm"]}), ["q_norm"])
    c["lora_targets_more"] = (a("j2", {"targets": ["c_attn", "c_fc", "mlp.c_proj"]}), ["missing tensor", "c_proj"])
    c["lora_targets_fewer"] = (a("j3", {"targets": ["c_attn"]}), ["unexpected tensor", "c_fc"])
    c["lora_model_config_list"] = (a("k", {"model_config": [1]}), ["model_config"])
    c["lora_model_config_lacks"] = (a("l", {"model_config": {"n_layer": 2}}), ["model_config"])
    c["lora_model_config_other"] = (a("m", {"model_config": {**GPT2.to_dict(), "n_embd": 64}}), ["n_embd=64"])
    c["lora_base_missing"] = (a("n", {"base": str(d / "nowhere")}), ["nowhere"])
    c["lora_base_int"] = (a("o", {"base": 7}), ["base"])
    selfish = a("p")
    meta = json.loads((selfish / "adapter.json").read_text())
    (selfish / "adapter.json").write_text(json.dumps({**meta, "base": str(selfish)}))
    c["lora_base_is_itself"] = (selfish, ["another LoRA adapter"])
    gone = a("q")
    shutil.rmtree(gone / "lora")
    c["lora_arrays_missing"] = (gone, ["adapter"])
    return c


# ---- running them ---------------------------------------------------------------------------------
def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@contextmanager
def rss_growth():
    """{"mb": the most this process's resident memory rose above its level at entry, sampled
    every 2 ms meanwhile}. (Not ru_maxrss: its peak is the whole session's, so a rise shows
    only above the highest point any earlier test reached, and that depends on the order.)"""
    out, stop = {"mb": 0.0}, threading.Event()
    base = rss_mb()

    def watch():
        while not stop.is_set():
            out["mb"] = max(out["mb"], rss_mb() - base)
            stop.wait(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["mb"] = max(out["mb"], rss_mb() - base)


def assert_refused(path: Path, needles) -> tuple[float, float]:
    """(CPU s, MB) of jaxgpt.load(path), which raises one ConfigError line holding `needles`, within TIME_LIMIT_S of
    CPU time and without raising the process's memory by more than RSS_GROWTH_LIMIT_MB."""
    # (CPU time of this thread: the process's would count what threads of earlier tests in the
    # same session do meanwhile, e.g. a background compiler or a server's engine thread)
    t0, c0 = time.perf_counter(), time.thread_time()
    with rss_growth() as grown, pytest.raises(ConfigError) as e:
        jaxgpt.load(path)
    cpu, wall, grown = time.thread_time() - c0, time.perf_counter() - t0, grown["mb"]
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert cpu < TIME_LIMIT_S and wall < HANG_LIMIT_S, (cpu, wall, msg)
    assert grown < RSS_GROWTH_LIMIT_MB, (grown, msg)
    return cpu, grown


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


_BUILT: dict[str, dict] = {}


def cases_of(fmt: str, root: Path) -> dict:
    """Every hostile file of one format, by case name -> (path, needles), plus the valid original
    under 'ok_*' (needles None); built once per module."""
    if fmt not in _BUILT:
        d = root / fmt
        d.mkdir()
        if fmt == "gguf":
            cases = {"ok_gguf": (write_gguf(d / "ok.gguf"), None), **gguf_cases(d)}
        elif fmt == "hf":
            cases = {"ok_hf_gpt2": (hf_folder(d / "ok", GPT2), None),
                     "ok_hf_llama": (hf_folder(d / "ok_llama", LLAMA), None), **hf_cases(d)}
        elif fmt == "nanogpt":
            cases = {"ok_nanogpt": (nanogpt_ckpt(d / "ok.pt"), None), **nanogpt_cases(d)}
        elif fmt == "ckpt":
            cases = {"ok_ckpt": (jaxgpt_run(d / "ok"), None), **checkpoint_cases(d)}
        else:
            base = cases_of("ckpt", root)["ok_ckpt"][0]
            cases = {"ok_lora": (adapter(d, base, "ok"), None), **adapter_cases(d, base)}
        _BUILT[fmt] = cases
    return _BUILT[fmt]


FORMATS = ["gguf", "hf", pytest.param("nanogpt", marks=pytest.mark.slow),
           pytest.param("ckpt", marks=pytest.mark.slow),
           pytest.param("lora", marks=pytest.mark.slow)]  # (torch and orbax writes take the time)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_files_are_one_line_fast(root, fmt):
    """The valid file of the format loads with the shape written (the positive control); every
    hostile one is one ConfigError line within 5 s and bounded memory. Prints the tally."""
    cases = cases_of(fmt, root)
    for name, (path, needles) in cases.items():
        if name.startswith("ok_"):
            lm = jaxgpt.load(path)
            want = LLAMA if "llama" in name or "gguf" in name else GPT2
            assert (lm.config.n_layer, lm.config.n_embd, lm.config.vocab_size) == \
                (want.n_layer, want.n_embd, want.vocab_size), name
    tried = {name: case for name, case in cases.items() if not name.startswith("ok_")}
    failures, worst = [], (0.0, 0.0)
    for name, (path, needles) in tried.items():
        try:
            worst = tuple(map(max, worst, assert_refused(path, needles)))
        except BaseException as e:  # noqa: BLE001 (collected, all reported at once)
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    print(f"\nhostile {fmt} files: {len(tried)} tried, {len(tried) - len(failures)} handled "
          f"(at most {worst[0]:.2f} s CPU, +{worst[1]:.0f} MB)")
    assert not failures, "\n".join(failures)


def test_shape_check_runs_before_the_model_is_built(root, monkeypatch):
    """A config declaring more layers than the file holds is refused before GPT(...) is built
    (GPT's constructor is never reached), for the GGUF and HF readers."""
    import jaxgpt.model.gpt

    files = {fmt: cases_of(fmt, root)[name][0]  # (made first: writing them builds models)
             for fmt, name in (("gguf", "gguf_block_count_3"), ("hf", "hf_n_layer_3"))}
    built = []
    real = jaxgpt.model.gpt.GPT.__init__
    monkeypatch.setattr(jaxgpt.model.gpt.GPT, "__init__",
                        lambda self, cfg, **kw: (built.append(cfg), real(self, cfg, **kw))[1])
    for fmt, path in files.items():
        with pytest.raises(ConfigError, match="3 layers"):
            jaxgpt.load(path)
    assert built == []


# ---- through the CLIs (slow) ----------------------------------------------------------------------
def vm_hwm_mb(pid: int, module: str) -> float | None:
    """The peak RSS (VmHWM, MB) of process `pid` once it runs `python -m module`, else None.
    (Before its exec the child is a copy of this pytest process, and the peak a fork carries
    into ru_maxrss is the parent's: ~2.9 GB late in the full suite, for a CLI that used 300 MB.)"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"\0-m\0" + module.encode() + b"\0" not in f.read():
                return None
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def run_cli(*args, timeout=300):
    """(returncode, stdout, stderr, CPU seconds, peak RSS MB) of `python -m args...`: that child's
    own CPU time (os.wait4), not RUSAGE_CHILDREN's, which adds every child the test session has
    reaped; its peak RSS read from /proc while it runs (vm_hwm_mb; where there is no /proc,
    wait4's ru_maxrss, which counts the forked parent's pages too)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    got = {}
    readers = [threading.Thread(target=lambda k, s: got.__setitem__(k, s.read()), args=(k, s))
               for k, s in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    t0, peak = time.monotonic(), None
    while True:
        hwm = vm_hwm_mb(p.pid, str(args[0]))
        peak = hwm if peak is None or (hwm is not None and hwm > peak) else peak
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > timeout:
            p.kill()
            os.wait4(p.pid, 0)
            raise subprocess.TimeoutExpired(args, timeout)
        time.sleep(0.02)
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if peak is None and not os.path.exists(f"/proc/{os.getpid()}/status"):
        peak = usage.ru_maxrss / 1024
    assert peak is not None, "the child's peak RSS was never read"
    return p.returncode, got["out"], got["err"], usage.ru_utime + usage.ru_stime, peak


@pytest.fixture(scope="module")
def cli_baseline():
    """CPU seconds of a CLI refusing a path that does not exist: the interpreter and imports,
    which the 5 s bound on refusing a hostile file comes on top of."""
    rc, _, err, cpu, _ = run_cli("jaxgpt.sample", "/nonexistent/model", "--max-new-tokens", "1")
    assert rc == 2, err
    return cpu


@pytest.mark.slow
@pytest.mark.parametrize("case,command", [
    ("gguf_block_count_1e9", ["jaxgpt.sample", "{}", "--max-new-tokens", "1"]),
    ("gguf_head_count_0", ["jaxgpt.chat", "{}"]),
    ("hf_n_layer_1e9", ["jaxgpt.eval", "{}", "--text", str(REPO / "README.md")]),
    ("hf_llama_heads_0", ["jaxgpt.convert", "{}", "{out}"]),
    ("ckpt_n_layer_1e9", ["jaxgpt.quantize", "{}", "{out}"]),
    ("lora_rank_str", ["jaxgpt.serve", "{}", "--port", "0"]),
    ("nanogpt_n_layer_1e9", ["jaxgpt.sft", "{}", "--out", "{out}"]),
    ("gguf_truncated", ["jaxgpt.train", "--init-from", "{}", "--out", "{out}", "--max-iters", "1"]),
])
def test_cli_refuses_hostile_file(root, cli_baseline, tmp_path, case, command):
    fmt = case.split("_")[0]
    path, needles = cases_of(fmt, root)[case]
    args = [a.replace("{}", str(path)).replace("{out}", str(tmp_path / "out")) for a in command]
    rc, out, err, cpu, rss = run_cli(*args)
    print(f"\n{command[0]} {case}: exit {rc}, {cpu:.1f} s CPU (baseline {cli_baseline:.1f} s), "
          f"peak RSS {rss:.0f} MB: {err.strip()[:120]}")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert cpu < cli_baseline + TIME_LIMIT_S, (cpu, cli_baseline)
    assert rss < 2048, rss
