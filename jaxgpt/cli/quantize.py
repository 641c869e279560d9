"""`python -m jaxgpt.quantize CKPT OUT`: write an int8 copy of a model (jaxgpt.formats.quantize.quantize_checkpoint)."""

from __future__ import annotations

import argparse
import sys

from jaxgpt.cli import run
from jaxgpt.cli.flags import add_model
from jaxgpt.formats.quantize import quantize_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.quantize",
        description="Write an int8 copy of a model: symmetric per-output-channel int8 weights with "
                    "float32 scales for every matmul kernel and (by default) the tied token "
                    "embedding; LayerNorms, biases and position embeddings stay float32. The result "
                    "is inference-only (sample, eval).")
    add_model(p, what="the float model to quantize")
    p.add_argument("out", help="output folder (a jaxgpt checkpoint)")
    p.add_argument("--keep-embedding", action="store_true",
                   help="keep the token embedding / tied head (wte) in float32")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    quantize_checkpoint(args.ckpt, args.out, embedding=not args.keep_embedding, force=args.force)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
