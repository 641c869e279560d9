"""Tiny random Llama models for the tests: an HF LlamaForCausalLM folder and the same weights as a
GGUF file written by the `gguf` package (llama.cpp's q/k row order, each matrix in a chosen type)."""

from pathlib import Path

import numpy as np

GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def hf_llama(seed=0, **fields):
    """A random transformers LlamaForCausalLM (eval mode), small enough for many tests."""
    import torch
    import transformers

    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**shape, **fields})).eval()
    with torch.no_grad():  # HF's init leaves RMSNorm scales at 1: make them matter too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF's rotary halves -> Meta's pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, qtype: str = "F32", tokenizer: dict | None = None) -> Path:
    """`model` (HF LlamaForCausalLM) as a GGUF file: norms F32, matrices and the embedding in
    `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...), quantized by gguf.quants. `tokenizer`:
    extra tokenizer.* metadata, e.g. a tiny gpt2-style vocabulary."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None)
                         else float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    for key, value in (tokenizer or {}).items():
        getattr(w, key)(value)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in model.state_dict().items():
        x = t.detach().float().numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            sub = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{GGUF_LAYER[sub]}.weight"
            if sub == "self_attn.q_proj":
                x = _permute(x, c.num_attention_heads)
            elif sub == "self_attn.k_proj":
                x = _permute(x, c.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if x.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, x.astype(np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
