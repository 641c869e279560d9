"""GPT-2 in Hugging Face's format (and the door to HF folders of either family): the rename table,
HF folders read (config.json + safetensors / .bin, sharded or not; a Llama folder goes on to
jaxgpt.formats.llama) and written back (`save_hf`, both families).

    python -m jaxgpt.convert SRC OUT_DIR [--force]          # HF folder, .gguf, hub name or ckpt.pt -> jaxgpt
    python -m jaxgpt.convert --to-hf CKPT OUT_DIR [--force]  # jaxgpt run dir -> HF folder

GPT-2 goes through one rename table (`rename_table`), written in HF's names. HF GPT-2 stores its
projections as `Conv1D` with weight [in, out], the same layout as our `nnx.Linear` kernels, so
nothing is transposed between HF and jaxgpt (nanoGPT's [out, in] weights are: jaxgpt.formats.nanogpt).
Weights are read with numpy (`safetensors.numpy`); a legacy `pytorch_model.bin` needs torch and
is opened with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import nnx

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.files import atomic_dir, check_writable
from jaxgpt.formats.llama import config_from_hf_llama, hf_llama_config, llama_tensors_from_model, model_from_llama_tensors
from jaxgpt.formats.shapes import check_tensors
from jaxgpt.model.gpt import GPT, model_with, param_path

GPT2_VOCAB = 50257  # vocabularies at least this big are GPT-2 BPE (nanoGPT pads to 50304)
# GPT2Config fields that change the math, read into (and written back from) GPTConfig as they are:
# HF name -> HF's default (transformers.GPT2Config; tie_word_embeddings: PretrainedConfig's)
MATH_FIELDS = {"activation_function": "gelu_new", "n_inner": None, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "tie_word_embeddings": True}
# GPT2Config fields whose non-default value jaxgpt cannot implement: HF name -> the only value allowed
REFUSED_FIELDS = {"add_cross_attention": False}


# ---- the rename table ---------------------------------------------------------------------------
# ---- the rename table ---------------------------------------------------------------------------
class Entry(NamedTuple):
    hf: str  # HF name, without the optional "transformer." prefix
    ours: str  # jaxgpt parameter path (dots; layer indices are ints)
    shape: tuple[int, ...]  # expected shape in HF layout (= jaxgpt layout unless `linear`)
    matrix: bool = False  # a projection matrix: [in, out] here, [out, in] in nanoGPT (transposed)
    linear: bool = False  # an nn.Linear weight [out, in] in HF too (lm_head): transposed both ways


def rename_table(cfg: GPTConfig) -> list[Entry]:
    """Every GPT-2 tensor, HF name <-> jaxgpt path, with its shape for `cfg`."""
    C, V, M = cfg.n_embd, cfg.vocab_size, cfg.mlp_dim
    table = [Entry("wte.weight", "wte.embedding", (V, C)),  # also the output head, when tied
             Entry("wpe.weight", "wpe.embedding", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        table += [
            Entry(f"{h}.ln_1.weight", f"{h}.ln_1.scale", (C,)),
            Entry(f"{h}.ln_1.bias", f"{h}.ln_1.bias", (C,)),
            Entry(f"{h}.attn.c_attn.weight", f"{h}.attn.c_attn.kernel", (C, 3 * C), True),  # q|k|v
            Entry(f"{h}.attn.c_attn.bias", f"{h}.attn.c_attn.bias", (3 * C,)),
            Entry(f"{h}.attn.c_proj.weight", f"{h}.attn.c_proj.kernel", (C, C), True),
            Entry(f"{h}.attn.c_proj.bias", f"{h}.attn.c_proj.bias", (C,)),
            Entry(f"{h}.ln_2.weight", f"{h}.ln_2.scale", (C,)),
            Entry(f"{h}.ln_2.bias", f"{h}.ln_2.bias", (C,)),
            Entry(f"{h}.mlp.c_fc.weight", f"{h}.mlp.c_fc.kernel", (C, M), True),  # M = n_inner or 4C
            Entry(f"{h}.mlp.c_fc.bias", f"{h}.mlp.c_fc.bias", (M,)),
            Entry(f"{h}.mlp.c_proj.weight", f"{h}.mlp.c_proj.kernel", (M, C), True),
            Entry(f"{h}.mlp.c_proj.bias", f"{h}.mlp.c_proj.bias", (C,)),
        ]
    table += [Entry("ln_f.weight", "ln_f.scale", (C,)), Entry("ln_f.bias", "ln_f.bias", (C,))]
    if not cfg.tie_word_embeddings:  # HF/nanoGPT nn.Linear weight [V, C]; our kernel [C, V]
        table.append(Entry("lm_head.weight", "lm_head.kernel", (V, C), linear=True))
    return table


def _is_buffer(name: str) -> bool:
    """HF's/nanoGPT's causal-mask buffers (h.N.attn.bias, h.N.attn.masked_bias): not weights."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


# ---- tensors -> model ---------------------------------------------------------------------------
def model_from_tensors(cfg: GPTConfig, tensors: dict[str, np.ndarray], source: str,
                       nanogpt: bool = False) -> GPT:
    """Build a GPT from HF-named tensors (either key spelling); every tensor must be accounted for."""
    named = {}
    for name, x in tensors.items():
        short = name.removeprefix("_orig_mod.").removeprefix("transformer.")  # torch.compile / LMHead
        if short in named:
            raise ConfigError(f"{source}: tensor {short} appears twice (as {name})")
        named[short] = x
    for name in [n for n in named if _is_buffer(n)]:
        del named[name]  # the causal mask is rebuilt by the model, not loaded
    head = named.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    check_tensors(cfg.n_layer, {k: np.shape(v) for k, v in named.items()},
                  lambda: {e.hf: e.shape[::-1] if nanogpt and e.matrix else e.shape
                           for e in rename_table(cfg)}, source)
    params = {}
    for e in rename_table(cfg):
        if e.hf not in named:
            raise ConfigError(f"{source}: missing tensor {e.hf}")
        x = np.asarray(named.pop(e.hf), dtype=np.float32)
        if nanogpt and e.matrix:
            x = x.T  # nn.Linear [out, in] -> kernel [in, out]
        if x.shape != e.shape:
            raise ConfigError(f"{source}: tensor {e.hf} has shape {list(x.shape)}, expected "
                              f"{list(e.shape)} for this config")
        params[param_path(e.ours)] = x.T if e.linear else x  # lm_head [V, C] -> kernel [C, V]
    if named:
        raise ConfigError(f"{source}: unexpected tensor {sorted(named)[0]}"
                          + (f" (and {len(named) - 1} more)" if len(named) > 1 else ""))
    if head is not None and not np.array_equal(np.asarray(head, np.float32), params[("wte", "embedding")]):
        # the config says the head is wte; a different lm_head contradicts it
        raise ConfigError(f"{source}: lm_head.weight differs from wte.weight, but "
                          "tie_word_embeddings=true (set it to false for an untied head)")
    return model_with(cfg, params)


def tensors_from_model(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under HF GPT2LMHeadModel names (lm_head.weight only when untied)."""
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for e in rename_table(model.config):
        x = flat[param_path(e.ours)]
        if e.linear:  # lm_head kernel [C, V] -> nn.Linear weight [V, C], outside "transformer."
            out[e.hf] = np.ascontiguousarray(x.T, dtype=np.float32)
            continue
        assert x.shape == e.shape, (e.ours, x.shape, e.shape)
        out["transformer." + e.hf] = np.ascontiguousarray(x, dtype=np.float32)  # no transpose: Conv1D
    return out


# ---- reading HF folders -------------------------------------------------------------------------
HF_MODEL_TYPES = ("gpt2", "llama")


def config_from_hf(hf: dict, source: str) -> GPTConfig:
    """GPTConfig from an HF config.json dict; anything jaxgpt can't represent is an error."""
    if hf.get("model_type") == "llama":
        return config_from_hf_llama(hf, source)
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}; jaxgpt reads "
                          f"{' and '.join(HF_MODEL_TYPES)} checkpoints")
    for key, ok in REFUSED_FIELDS.items():
        if hf.get(key, ok) != ok:
            raise ConfigError(f"{source}: {key}={json.dumps(hf[key])} is not supported by jaxgpt's "
                              f"GPT-2 (only {json.dumps(ok)})")
    math = {key: hf.get(key, default) for key, default in MATH_FIELDS.items()}
    try:
        return GPTConfig(vocab_size=hf.get("vocab_size", GPT2_VOCAB), block_size=hf.get("n_positions", 1024),
                         n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                         n_embd=hf.get("n_embd", 768),
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), **math)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{source}: bad config.json value: {e}") from None


def read_hf_tensors(folder: Path) -> tuple[dict[str, np.ndarray], str]:
    """(name -> float array, file description) from model.safetensors, shards, or pytorch_model.bin."""
    single, index, binary = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                             folder / "pytorch_model.bin")
    if single.is_file():
        return _read_safetensors(single), str(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(x, str) for x in shards):
                raise TypeError("weight_map values must be file names")
        except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
            raise ConfigError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                              f"{str(e)[:160]})") from None
        tensors = {}
        for shard in shards:
            tensors.update(_read_safetensors(folder / shard))
        return tensors, str(index)
    if binary.is_file():
        return _torch_load(binary), str(binary)
    raise ConfigError(f"{folder}: no weights found (expected model.safetensors, "
                      "model.safetensors.index.json or pytorch_model.bin)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ConfigError(f"{path}: missing safetensors shard")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError for truncated/corrupt files, among others
        raise ConfigError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _torch_load(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers (weights_only=True): no code runs."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{path}: reading a PyTorch pickle needs torch; install it, or convert "
                          "the file to safetensors") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable PyTorch weights file ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _to_numpy(tensors: dict) -> dict[str, np.ndarray]:
    """torch tensors -> float32 numpy arrays (non-tensor entries are an error, named)."""
    out = {}
    for name, t in tensors.items():
        if not hasattr(t, "detach"):
            raise ConfigError(f"entry {name} is a {type(t).__name__}, not a tensor")
        out[name] = t.detach().float().numpy()
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def read_hf_folder(folder: str | Path) -> tuple[GPT, dict | None, dict]:
    """(model, tokenizer dict, meta) from a Hugging Face GPT-2 folder (config.json + weights)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    cfg = config_from_hf(hf, str(cfg_path))
    tensors, source = read_hf_tensors(folder)
    if source.endswith(".bin"):
        tensors = _to_numpy(tensors)
    meta = {"source": str(folder), "source_format": "huggingface"}
    if cfg.family == "llama":
        model = model_from_llama_tensors(cfg, tensors, source)
        return model, *_hf_tokenizer(folder, meta)
    model = model_from_tensors(cfg, tensors, source)
    return model, _tokenizer_for(cfg), meta


def _hf_tokenizer(folder: Path, meta: dict) -> tuple[dict | None, dict]:
    """(tokenizer dict, meta) of a non-GPT-2 HF folder: its tokenizer.json (byte-level BPE, with
    tokenizer_config.json's chat template); no tokenizer if it ships none."""
    from jaxgpt.tokenizers.bpe import BPETokenizer

    if not (folder / "tokenizer.json").is_file():
        return None, meta
    return BPETokenizer.from_hf_folder(folder).to_dict(), meta


def _tokenizer_for(cfg: GPTConfig) -> dict | None:
    """GPT-2 BPE for GPT-2-sized vocabularies; otherwise unknown (e.g. a char model's meta.pkl)."""
    return {"type": "gpt2"} if cfg.vocab_size >= GPT2_VOCAB else None


# ---- writing HF folders -------------------------------------------------------------------------
def hf_config(cfg: GPTConfig) -> dict:
    """config.json for transformers.GPT2LMHeadModel with this architecture."""
    d = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
         "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
         "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.layer_norm_epsilon,
         "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
         "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
         **{key: getattr(cfg, key) for key in MATH_FIELDS}}  # activation, n_inner, scaling, tying
    if cfg.vocab_size >= GPT2_VOCAB:
        d.update(bos_token_id=GPT2_VOCAB - 1, eos_token_id=GPT2_VOCAB - 1)  # <|endoftext|>
    return d


def save_hf(model: GPT, out: str | Path, tokenizer_dict: dict | None = None, force: bool = False) -> Path:
    """Write `out/` with config.json + model.safetensors (+ the tokenizer's files: GPT-2's
    vocab.json/merges.txt, or a BPE's tokenizer.json/tokenizer_config.json), atomically:
    a GPT2LMHeadModel folder, or a LlamaForCausalLM one for a Llama-family model."""
    from safetensors.numpy import save_file

    check_writable(out, force)
    family = model.config.family
    if family == "custom":
        raise ConfigError("this model mixes GPT-2 and Llama blocks; Hugging Face has no class for it")
    tensors = tensors_from_model(model) if family == "gpt2" else llama_tensors_from_model(model)
    config = hf_config(model.config) if family == "gpt2" else hf_llama_config(model.config, tokenizer_dict)
    if family == "gpt2" and tokenizer_dict and tokenizer_dict.get("type") == "bpe":
        for key in ("bos", "eos"):  # the tokenizer's own ids, not GPT-2's 50256
            config.pop(f"{key}_token_id", None)
            if tokenizer_dict.get(key) is not None:
                config[f"{key}_token_id"] = tokenizer_dict[key]
    with atomic_dir(out, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dict and tokenizer_dict.get("type") == "gpt2":
            # GPT-2's BPE files under HF's names, so AutoTokenizer.from_pretrained(out) works too
            assets = resources.files("jaxgpt") / "assets" / "gpt2"
            (tmp / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
            (tmp / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
        elif tokenizer_dict and tokenizer_dict.get("type") == "bpe":
            # a byte-level BPE (trained with python -m jaxgpt.tokenizer, from a GGUF or HF
            # folder): tokenizer.json + tokenizer_config.json, so AutoTokenizer gives our ids
            from jaxgpt.tokenizers.bpe import BPETokenizer
            from jaxgpt.tokenizers.train import hf_tokenizer_files

            for name, data in hf_tokenizer_files(BPETokenizer.from_dict(tokenizer_dict)).items():
                (tmp / name).write_bytes(data)
    return Path(out)
