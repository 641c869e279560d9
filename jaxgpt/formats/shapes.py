"""A model file's declared shape against the tensors it holds, checked before anything is built.

Every loader (GGUF, Hugging Face safetensors / .bin, nanoGPT ckpt.pt, jaxgpt's orbax checkpoints,
LoRA adapters) reads two things from a file: what its metadata declares (a GPTConfig, already
bounded by GPTConfig's own checks) and the name and shape of each tensor it holds (from the
header, without reading the data). `check_tensors` compares them, in this order:

1. the layers: the declared `n_layer` against the distinct layer indices among the tensor names
   (`h.N.` / `layers.N.`), so that a config declaring 10**9 layers fails here, in microseconds,
   instead of in building a table or a model of that size;
2. then, with the expected table now as small as the file, every tensor: missing, unexpected
   (named, with how many more) and of the wrong shape.

What a format's tensors are called and shaped stays with the format (the rename
tables of jaxgpt.formats.hf and .llama, the model's own parameter tree); this module only compares. One line per error, naming
the file: a ConfigError, which the CLIs print as `error: ...` with exit status 2.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Sequence

from jaxgpt.config import ConfigError

Shapes = Mapping[str, Sequence[int]]
LAYER = re.compile(r"(?:^|\.)(?:h|layers|blk)\.(\d+)\.")  # GPT-2 / jaxgpt, HF Llama, GGUF


def layer_indices(names: Iterable[str]) -> set[int]:
    """The distinct layer indices among tensor names ('h.3.attn...', 'model.layers.3....')."""
    return {int(m.group(1)) for m in map(LAYER.search, names) if m}


def check_tensors(n_layer: int, found: Shapes, expected: Callable[[], Shapes] | Shapes,
                  source: str, declared_by: str = "its config") -> None:
    """ConfigError (one line, naming `source`) unless the tensors `found` (name -> shape) are
    exactly those `expected` (name -> shape, or a function building that table: called only once
    the layer count is known to match, so its size is bounded by the file's)."""
    layers = layer_indices(found)
    if len(layers) != n_layer:
        raise ConfigError(f"{source}: {declared_by} declares {n_layer} layers, but the file holds "
                          f"tensors of {len(layers)}")
    want = expected() if callable(expected) else expected
    missing = [n for n in want if n not in found]
    if missing:
        raise ConfigError(f"{source}: missing tensor {missing[0]}" + _more(len(missing)))
    extra = sorted(n for n in found if n not in want)
    if extra:
        raise ConfigError(f"{source}: unexpected tensor {extra[0]}" + _more(len(extra)))
    for name, shape in want.items():
        if tuple(found[name]) != tuple(shape):
            raise ConfigError(f"{source}: tensor {name} has shape {list(found[name])}, expected "
                              f"{list(shape)} for this config")


def _more(n: int) -> str:
    return f" (and {n - 1} more)" if n > 1 else ""
