"""nanoGPT's `ckpt.pt` (its `model_args` and `model` state dict) read into jaxgpt.

nanoGPT uses `nn.Linear` with weight [out, in], so its four projection matrices per layer
(c_attn, attn.c_proj, c_fc, mlp.c_proj) are transposed on the way in; the file needs torch and
is opened with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.formats.hf import _to_numpy, _tokenizer_for, _torch_load, model_from_tensors, rename_table
from jaxgpt.model.gpt import GPT


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


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
