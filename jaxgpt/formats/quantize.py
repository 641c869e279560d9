"""An int8 copy of a checkpoint on disk: `quantize_checkpoint(CKPT, OUT)`, as
`python -m jaxgpt.quantize CKPT OUT` runs it (the CLI lives in jaxgpt.cli.quantize).

CKPT is anything `jaxgpt.load` takes (jaxgpt run, Hugging Face folder or hub name, nanoGPT
ckpt.pt); OUT becomes a jaxgpt checkpoint folder whose meta has {"quant": {"bits": 8, ...}},
usable by `jaxgpt.load(OUT, allow_int8=True)`, `python -m jaxgpt.sample` and `python -m jaxgpt.eval`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxgpt.formats.load import load
from jaxgpt.config import ConfigError
from jaxgpt import files
from jaxgpt.model.gpt import param_bytes


def dir_bytes(path: str | Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def quantize_checkpoint(ckpt: str, out: str, embedding: bool = True, force: bool = False,
                        log=lambda s: print(s, file=sys.stderr)) -> dict:
    """Quantize `ckpt` to int8 and save it as `out`; returns the sizes in bytes.

    {"fp32_param_bytes", "int8_param_bytes", "disk_bytes"}. ConfigError for an already
    quantized `ckpt` or a non-empty `out` (without `force`); nothing is written then.
    """
    files.check_writable(out, force)  # before the (slow) load
    lm = load(ckpt, allow_int8=True)
    if lm.is_int8:
        raise ConfigError(f"{ckpt} is already int8-quantized; quantize its float32 source instead")
    qlm = lm.quantize(embedding=embedding)
    qlm.save(out, force=force)
    sizes = {"fp32_param_bytes": param_bytes(lm.model), "int8_param_bytes": param_bytes(qlm.model),
             "disk_bytes": dir_bytes(out)}
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    log(f"params: {mb(sizes['fp32_param_bytes'])} fp32 -> {mb(sizes['int8_param_bytes'])} int8 "
        f"({sizes['fp32_param_bytes'] / sizes['int8_param_bytes']:.2f}x smaller"
        f"{', embedding kept float32' if not embedding else ''})")
    log(f"on disk: {mb(sizes['disk_bytes'])} in {out}")
    return sizes
