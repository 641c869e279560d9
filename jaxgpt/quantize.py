"""The quantization CLI, `python -m jaxgpt.quantize CKPT OUT`: write an int8 copy of a model.

CKPT is anything `jaxgpt.load` takes (jaxgpt run, Hugging Face folder or hub name, nanoGPT
ckpt.pt); OUT becomes a jaxgpt checkpoint folder whose meta has {"quant": {"bits": 8, ...}},
usable by `jaxgpt.load(OUT, allow_int8=True)`, `python -m jaxgpt.sample` and `python -m jaxgpt.eval`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxgpt.config import ConfigError


def dir_bytes(path: str | Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def quantize_checkpoint(ckpt: str, out: str, embedding: bool = True, force: bool = False,
                        log=lambda s: print(s, file=sys.stderr)) -> dict:
    """Quantize `ckpt` to int8 and save it as `out`; returns the sizes in bytes.

    {"fp32_param_bytes", "int8_param_bytes", "disk_bytes"}. ConfigError for an already
    quantized `ckpt` or a non-empty `out` (without `force`); nothing is written then.
    """
    from jaxgpt import checkpoint
    from jaxgpt.api import load
    from jaxgpt.model import param_bytes

    checkpoint.check_writable(out, force)  # before the (slow) load
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.quantize",
        description="Write an int8 copy of a model: symmetric per-output-channel int8 weights with "
                    "float32 scales for every matmul kernel and (by default) the tied token "
                    "embedding; LayerNorms, biases and position embeddings stay float32. The result "
                    "is inference-only (sample, eval).")
    p.add_argument("ckpt", help="jaxgpt run/checkpoint folder, Hugging Face GPT-2 folder, hub name "
                                "or nanoGPT ckpt.pt")
    p.add_argument("out", help="output folder (a jaxgpt checkpoint)")
    p.add_argument("--keep-embedding", action="store_true",
                   help="keep the token embedding / tied head (wte) in float32")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        quantize_checkpoint(args.ckpt, args.out, embedding=not args.keep_embedding, force=args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
