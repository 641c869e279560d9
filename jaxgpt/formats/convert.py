"""Weight conversion between jaxgpt and Hugging Face GPT-2 / Llama (safetensors / .bin), GGUF
files (llama.cpp) or nanoGPT ckpt.pt.

    python -m jaxgpt.convert SRC OUT_DIR [--force]          # HF folder, .gguf, hub name or ckpt.pt -> jaxgpt
    python -m jaxgpt.convert --to-hf CKPT OUT_DIR [--force]  # jaxgpt run dir -> HF folder

GPT-2 goes through one rename table (`rename_table`), written in HF's names; the Llama family
through another (`llama_rename_table`, HF LlamaForCausalLM's names), whose q/k/v and gate/up
projections are fused into c_attn and c_fc. A GGUF file's tensors are renamed to the Llama
table's HF names (`GGUF_NAMES`), dequantized to float32 and their q/k rows un-permuted (llama.cpp
stores them in Meta's interleaved rotary order). Layouts:
  * HF GPT-2 stores its projections as `Conv1D` with weight [in, out], the same layout as our
    `nnx.Linear` kernels, so nothing is transposed between HF and jaxgpt.
  * nanoGPT uses `nn.Linear` with weight [out, in], so its four projection matrices per layer
    (c_attn, attn.c_proj, c_fc, mlp.c_proj) are transposed on the way in.
Weights are read with numpy (`safetensors.numpy`); a legacy `pytorch_model.bin` or a nanoGPT
`ckpt.pt` needs torch and is opened with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.files import atomic_dir, check_writable
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.formats.shapes import check_tensors

GPT2_VOCAB = 50257  # vocabularies at least this big are GPT-2 BPE (nanoGPT pads to 50304)
# GPT2Config fields that change the math, read into (and written back from) GPTConfig as they are:
# HF name -> HF's default (transformers.GPT2Config; tie_word_embeddings: PretrainedConfig's)
MATH_FIELDS = {"activation_function": "gelu_new", "n_inner": None, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "tie_word_embeddings": True}
# GPT2Config fields whose non-default value jaxgpt cannot implement: HF name -> the only value allowed
REFUSED_FIELDS = {"add_cross_attention": False}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


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


def _path(dotted: str) -> tuple:
    """'h.0.attn.c_attn.kernel' -> ('h', 0, 'attn', 'c_attn', 'kernel'), nnx's state path."""
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


# ---- the Llama family (GPTConfig.llama) ------------------------------------------------------------
class LlamaEntry(NamedTuple):
    ours: str  # jaxgpt parameter path
    hf: tuple[str, ...]  # HF LlamaForCausalLM names, concatenated along the output axis when several
    linear: bool  # nn.Linear weights [out, in]: transposed into our [in, out] kernel


def llama_rename_table(cfg: GPTConfig) -> list[LlamaEntry]:
    """Every Llama tensor, jaxgpt path <-> HF name(s): c_attn = [q | k | v], c_fc = [gate | up]."""
    table = [LlamaEntry("wte.embedding", ("model.embed_tokens.weight",), False)]
    for i in range(cfg.n_layer):
        h, m = f"h.{i}", f"model.layers.{i}"
        table += [
            LlamaEntry(f"{h}.ln_1.scale", (f"{m}.input_layernorm.weight",), False),
            LlamaEntry(f"{h}.attn.c_attn.kernel", tuple(f"{m}.self_attn.{x}_proj.weight" for x in "qkv"), True),
            LlamaEntry(f"{h}.attn.c_proj.kernel", (f"{m}.self_attn.o_proj.weight",), True),
            LlamaEntry(f"{h}.ln_2.scale", (f"{m}.post_attention_layernorm.weight",), False),
            LlamaEntry(f"{h}.mlp.c_fc.kernel", (f"{m}.mlp.gate_proj.weight", f"{m}.mlp.up_proj.weight"), True),
            LlamaEntry(f"{h}.mlp.c_proj.kernel", (f"{m}.mlp.down_proj.weight",), True),
        ]
    table.append(LlamaEntry("ln_f.scale", ("model.norm.weight",), False))
    if not cfg.tie_word_embeddings:
        table.append(LlamaEntry("lm_head.kernel", ("lm_head.weight",), True))
    return table


def llama_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM name -> shape ([out, in] for nn.Linear weights) of every tensor `cfg` has."""
    C, V, M, D = cfg.n_embd, cfg.vocab_size, cfg.mlp_dim, cfg.head_dim
    q, kv = cfg.n_head * D, cfg.kv_heads * D
    layer = {"input_layernorm": (C,), "self_attn.q_proj": (q, C), "self_attn.k_proj": (kv, C),
             "self_attn.v_proj": (kv, C), "self_attn.o_proj": (C, q),
             "post_attention_layernorm": (C,), "mlp.gate_proj": (M, C), "mlp.up_proj": (M, C),
             "mlp.down_proj": (C, M)}
    out = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg.n_layer):
        out.update({f"model.layers.{i}.{k}.weight": shape for k, shape in layer.items()})
    out["model.norm.weight"] = (C,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, C)
    return out


def _llama_named(cfg: GPTConfig, tensors: dict) -> dict:
    """The tensors a Llama-family model is built from: buffers and a tied lm_head dropped."""
    named = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer
    if cfg.tie_word_embeddings:
        named.pop("lm_head.weight", None)
    return named


def model_from_llama_tensors(cfg: GPTConfig, tensors: dict[str, np.ndarray], source: str) -> GPT:
    """A Llama-family GPT from HF LlamaForCausalLM-named tensors; every tensor accounted for."""
    named = _llama_named(cfg, tensors)
    check_tensors(cfg.n_layer, {k: np.shape(v) for k, v in named.items()}, lambda: llama_shapes(cfg), source)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))
    shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(state)}
    params = {}
    for e in llama_rename_table(cfg):
        missing = [n for n in e.hf if n not in named]
        if missing:
            raise ConfigError(f"{source}: missing tensor {missing[0]}")
        parts = [np.asarray(named.pop(n), dtype=np.float32) for n in e.hf]
        x = np.concatenate([p.T for p in parts], axis=1) if e.linear else parts[0]
        if x.shape != shapes[_path(e.ours)]:
            raise ConfigError(f"{source}: tensor(s) {', '.join(e.hf)} give shape {list(x.shape)} for "
                              f"{e.ours}, expected {list(shapes[_path(e.ours)])} for this config")
        params[_path(e.ours)] = x
    if named:
        raise ConfigError(f"{source}: unexpected tensor {sorted(named)[0]}"
                          + (f" (and {len(named) - 1} more)" if len(named) > 1 else ""))
    return _model_with(cfg, params)


def llama_tensors_from_model(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under HF LlamaForCausalLM names (the fused kernels split again)."""
    cfg = model.config
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    widths = {3: [cfg.n_head * cfg.head_dim] + [cfg.kv_heads * cfg.head_dim] * 2, 2: [cfg.mlp_dim] * 2}
    out = {}
    for e in llama_rename_table(cfg):
        x = flat[_path(e.ours)]
        if not e.linear:
            out[e.hf[0]] = np.ascontiguousarray(x, dtype=np.float32)
            continue
        cuts = np.cumsum(widths.get(len(e.hf), [x.shape[1]]))[:-1]
        for name, part in zip(e.hf, np.split(x, cuts, axis=1)):
            out[name] = np.ascontiguousarray(part.T, dtype=np.float32)  # kernel [in, out] -> [out, in]
    return out


def config_from_hf_llama(hf: dict, source: str) -> GPTConfig:
    """GPTConfig.llama from an HF LlamaConfig dict (model_type llama); one-line errors for what
    jaxgpt's Llama blocks do not implement (biases, other head sizes, other rotary scalings)."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{source}: {key}=true is not supported (jaxgpt's Llama blocks have no biases)")
    H, C = hf.get("num_attention_heads", 32), hf.get("hidden_size", 4096)
    if not all(_positive_int(x) for x in (H, C)):
        raise ConfigError(f"{source}: num_attention_heads ({H!r}) and hidden_size ({C!r}) must be "
                          f"positive integers")
    if hf.get("head_dim") not in (None, C // H):
        raise ConfigError(f"{source}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads "
                          f"({C // H}) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"{source}: rope scaling {kind!r} is not supported (default, linear, llama3)")
    scaling = {}
    if kind != "default":
        scaling = dict(rope_scaling=kind, rope_factor=float(rope.get("factor", 1.0)),
                       rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                       rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                       rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
    try:
        return GPTConfig.llama(
            vocab_size=hf.get("vocab_size", 32000), block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf.get("num_hidden_layers", 32), n_head=H,
            n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
            n_inner=hf.get("intermediate_size", 11008), layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), **scaling)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad config.json value: {e}") from None


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def hf_llama_config(cfg: GPTConfig, tokenizer: dict | None = None) -> dict:
    """config.json for transformers.LlamaForCausalLM with this architecture."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
         "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
         "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
         "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.layer_norm_epsilon,
         "rope_theta": cfg.rope_theta, "attention_bias": False, "mlp_bias": False,
         "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": "float32", "use_cache": True}
    if cfg.rope_scaling:
        d["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor,
                             "low_freq_factor": cfg.rope_low_freq_factor,
                             "high_freq_factor": cfg.rope_high_freq_factor,
                             "original_max_position_embeddings": cfg.rope_original_max_len}
    for key in ("bos_token", "eot_token"):
        if tokenizer and tokenizer.get(key) is not None:
            d[key.replace("eot", "eos") + "_id"] = tokenizer[key]
    return d


# ---- GGUF files (llama.cpp) -----------------------------------------------------------------------
GGUF_ARCHITECTURES = ("llama",)
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _gguf_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None: not a known name)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GGUF_NAMES:
        return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
    return None


def _hf_gguf_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (_gguf_hf_name's inverse)."""
    ours = {hf: g for g, hf in GGUF_NAMES.items()}
    parts = name.split(".")
    if name.startswith("model.layers."):
        return f"blk.{parts[2]}.{ours['.'.join(parts[3:-1])]}.{parts[-1]}"
    return f"{ours['.'.join(parts[:-1])]}.{parts[-1]}"


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (per head, the rotary pairs interleaved: Meta's layout)
    back to HF's (per head, the first halves then the second halves): w [heads*D, in]."""
    D = w.shape[0] // heads
    return w.reshape(heads, D // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict, tensor_names, source: str) -> GPTConfig:
    """GPTConfig.llama from a GGUF file's `{arch}.*` metadata."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    if "rope_freqs.weight" in tensor_names or get("rope.scaling.type", "none") not in ("none", "linear"):
        raise ConfigError(f"{source}: this GGUF's rotary scaling (rope_freqs / "
                          f"{get('rope.scaling.type')!r}) is not supported")
    H, C = get("attention.head_count"), get("embedding_length")
    try:
        if get("rope.dimension_count", C // H) != C // H:
            raise ConfigError(f"rope.dimension_count {get('rope.dimension_count')} != head size {C // H}")
        scaling = {}
        if get("rope.scaling.type") == "linear":
            scaling = dict(rope_scaling="linear", rope_factor=float(get("rope.scaling.factor", 1.0)))
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        return GPTConfig.llama(
            vocab_size=vocab, block_size=get("context_length"), n_layer=get("block_count"),
            n_head=H, n_kv_head=get("attention.head_count_kv", H), n_embd=C,
            n_inner=get("feed_forward_length"), layer_norm_epsilon=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensor_names, **scaling)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:  # e.g. a head count of 0
        raise ConfigError(f"{source}: bad or missing {arch}.* metadata "
                          f"({type(e).__name__}: {str(e)[:160]})") from None


def read_gguf_file(path: str | Path) -> tuple[GPT, dict | None, dict]:
    """(model, tokenizer dict, meta) from a GGUF file: weights dequantized to float32, the
    tokenizer and chat template from its metadata."""
    from jaxgpt.formats.gguf import read_gguf
    from jaxgpt.tokenizers.bpe import BPETokenizer

    f = read_gguf(path)
    cfg = config_from_gguf(f.metadata, f.tensors, str(path))
    hf_names = {}
    for name in f.tensors:
        hf_names[name] = _gguf_hf_name(name)
        if hf_names[name] is None:
            raise ConfigError(f"{path}: unexpected tensor {name}")
    gguf_names = {hf: name for name, hf in hf_names.items()}  # (errors name the file's tensors)
    check_tensors(cfg.n_layer, {n: info.shape for n, info in f.tensors.items()},
                  lambda: {gguf_names.get(hf, _hf_gguf_name(hf)): shape for hf, shape in llama_shapes(cfg).items()},
                  str(path), "its metadata")  # before dequantizing
    tensors = {}
    for name in f.tensors:
        hf = hf_names[name]
        w = f.tensor(name)
        if name.endswith("attn_q.weight"):
            w = _unpermute_rotary(w, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            w = _unpermute_rotary(w, cfg.kv_heads)
        tensors[hf] = w
    model = model_from_llama_tensors(cfg, tensors, str(path))
    tok = None  # a file without tokenizer.* metadata (weights only) takes token ids
    if "tokenizer.ggml.model" in f.metadata:
        tok = BPETokenizer.from_gguf_metadata(f.metadata).to_dict()  # with its chat template
    types = sorted({i.type_name for i in f.tensors.values()})
    return model, tok, {"source": str(path), "source_format": "gguf", "gguf_types": types}


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
        params[_path(e.ours)] = x.T if e.linear else x  # lm_head [V, C] -> kernel [C, V]
    if named:
        raise ConfigError(f"{source}: unexpected tensor {sorted(named)[0]}"
                          + (f" (and {len(named) - 1} more)" if len(named) > 1 else ""))
    if head is not None and not np.array_equal(np.asarray(head, np.float32), params[("wte", "embedding")]):
        # the config says the head is wte; a different lm_head contradicts it
        raise ConfigError(f"{source}: lm_head.weight differs from wte.weight, but "
                          "tie_word_embeddings=true (set it to false for an untied head)")
    return _model_with(cfg, params)


def _model_with(cfg: GPTConfig, params: dict[tuple, np.ndarray]) -> GPT:
    """A GPT whose parameters are `params` (path -> array), without a random init of the real size."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tensors_from_model(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under HF GPT2LMHeadModel names (lm_head.weight only when untied)."""
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for e in rename_table(model.config):
        x = flat[_path(e.ours)]
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


def read_nanogpt(path: str | Path, log: Callable[[str], None] = _stderr) -> tuple[GPT, dict | None, dict]:
    """(model, tokenizer dict, meta) from a nanoGPT `ckpt.pt` (keys under 'model', 'model_args')."""
    path = Path(path)
    ckpt = _torch_load(path)
    if "model" not in ckpt or "model_args" not in ckpt:
        raise ConfigError(f"{path}: not a nanoGPT checkpoint (needs 'model' and 'model_args')")
    args = ckpt["model_args"]
    try:
        cfg = GPTConfig(vocab_size=args["vocab_size"], block_size=args["block_size"],
                        n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                        activation_function="gelu")  # nanoGPT's MLP: nn.GELU(), exact (erf)
    except KeyError as e:
        raise ConfigError(f"{path}: model_args lacks {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad model_args value: {e}") from None
    tensors = _to_numpy(ckpt["model"])
    if args.get("bias", True) is False:
        # nanoGPT's bias=False drops every Linear/LayerNorm bias: the same as a bias of zeros
        for e in rename_table(cfg):
            if e.hf.endswith(".bias"):
                tensors.setdefault(e.hf, np.zeros(e.shape, np.float32))
    model = model_from_tensors(cfg, tensors, str(path), nanogpt=True)
    return model, _tokenizer_for(cfg), {"source": str(path), "source_format": "nanogpt"}


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
