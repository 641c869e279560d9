"""`python -m jaxgpt.convert SRC OUT_DIR [--to-hf] [--force]`: convert GPT-2 weights between jaxgpt,
Hugging Face and nanoGPT (through jaxgpt.load and LoadedModel.save / to_hf)."""

from __future__ import annotations

import argparse
import sys

from jaxgpt.formats.load import load
from jaxgpt.files import check_writable
from jaxgpt.cli import run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.convert",
        description="Convert GPT-2 weights. Default: SRC (a Hugging Face GPT-2 folder, a hub name "
                    "such as gpt2, or a nanoGPT ckpt.pt) -> a jaxgpt checkpoint folder. With --to-hf: "
                    "a jaxgpt run/checkpoint folder -> a Hugging Face folder (config.json + "
                    "model.safetensors) that GPT2LMHeadModel.from_pretrained loads.")
    p.add_argument("src", help="model to convert: a Hugging Face GPT-2 or Llama folder, a .gguf file, smollm2, a nanoGPT "
                   "ckpt.pt or a hub name; with --to-hf, a jaxgpt checkpoint")
    p.add_argument("out", help="output folder (written atomically; must be absent or empty)")
    p.add_argument("--to-hf", action="store_true", help="write a Hugging Face folder instead")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_writable(args.out, args.force)  # fail before the (slow) read
    lm = load(args.src)
    if args.to_hf:
        lm.to_hf(args.out, force=args.force)
    else:
        lm.save(args.out, force=args.force)
    print(f"wrote {'Hugging Face' if args.to_hf else 'jaxgpt'} model to {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
