"""The Llama family (GPTConfig.llama) in its two file formats: Hugging Face LlamaForCausalLM
folders (the rename table in HF's names, whose q/k/v and gate/up projections are fused into
c_attn and c_fc; the config both ways) and GGUF files (llama.cpp), whose tensors are renamed to
that table's HF names (`GGUF_NAMES`), dequantized to float32 and their q/k rows un-permuted
(llama.cpp stores them in Meta's interleaved rotary order).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from flax import nnx

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.formats.shapes import check_tensors
from jaxgpt.model.gpt import GPT, model_with, param_path

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
    graphdef, state = nnx.split(GPT.abstract(cfg))
    shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(state)}
    params = {}
    for e in llama_rename_table(cfg):
        missing = [n for n in e.hf if n not in named]
        if missing:
            raise ConfigError(f"{source}: missing tensor {missing[0]}")
        parts = [np.asarray(named.pop(n), dtype=np.float32) for n in e.hf]
        x = np.concatenate([p.T for p in parts], axis=1) if e.linear else parts[0]
        if x.shape != shapes[param_path(e.ours)]:
            raise ConfigError(f"{source}: tensor(s) {', '.join(e.hf)} give shape {list(x.shape)} for "
                              f"{e.ours}, expected {list(shapes[param_path(e.ours)])} for this config")
        params[param_path(e.ours)] = x
    if named:
        raise ConfigError(f"{source}: unexpected tensor {sorted(named)[0]}"
                          + (f" (and {len(named) - 1} more)" if len(named) > 1 else ""))
    return model_with(cfg, params)


def llama_tensors_from_model(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under HF LlamaForCausalLM names (the fused kernels split again)."""
    cfg = model.config
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    widths = {3: [cfg.n_head * cfg.head_dim] + [cfg.kv_heads * cfg.head_dim] * 2, 2: [cfg.mlp_dim] * 2}
    out = {}
    for e in llama_rename_table(cfg):
        x = flat[param_path(e.ours)]
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


