"""`python -m jaxgpt.eval CKPT --text FILE [--stride S] [--json]`: perplexity of a model on a text
(jaxgpt.evaluate.scoring.evaluate); `--task hellaswag --data FILE.jsonl [--limit N]`: HellaSwag accuracy
(jaxgpt.evaluate.hellaswag.score)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxgpt.formats.load import load_for_inference
from jaxgpt.cli import run
from jaxgpt.cli.flags import add_int8, add_model
from jaxgpt.config import ConfigError
from jaxgpt.evaluate.scoring import check_stride, evaluate
from jaxgpt.evaluate import hellaswag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.eval",
        description="Mean next-token cross-entropy (nats/token) and perplexity of a model on a text "
                    "file, scored in windows of the model's context length; or, with --task "
                    "hellaswag, HellaSwag accuracy (acc, acc_norm, acc_norm_harness).")
    add_model(p)
    p.add_argument("--task", choices=("perplexity", "hellaswag"), default="perplexity",
                   help="perplexity of --text (default), or HellaSwag accuracy on --data")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file, tokenized as one stream (--task perplexity)")
    p.add_argument("--data", default=None,
                   help="HellaSwag jsonl in the official format, e.g. hellaswag_val.jsonl "
                        "(--task hellaswag)")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N HellaSwag examples")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding windows every S tokens (each token scored once, with up to a "
                        "context length of history); default: non-overlapping windows")
    p.add_argument("--batch-size", type=int, default=None, help="windows per compiled call")
    p.add_argument("--json", action="store_true",
                   help='print {"loss", "perplexity", "tokens"}; with --task hellaswag {"n", "acc", '
                        '"acc_norm", "acc_norm_harness", "per_example"}')
    add_int8(p)
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "hellaswag":
        return _hellaswag(args)
    for flag in ("data", "limit"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} is for --task hellaswag")
    if args.text is None:
        raise ConfigError("--text FILE is required (or --task hellaswag --data FILE)")
    path = Path(args.text)
    if not path.is_file():
        raise ConfigError(f"--text {path}: no such file")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_stride(args.stride, sys.maxsize)  # < 1 fails before the (slow) load
    lm = load_for_inference(args.ckpt, args.int8)
    check_stride(args.stride, lm.config.block_size)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    ids = lm.encode(text)
    if len(ids) < 2:
        raise ConfigError(f"--text {path} has {len(ids)} token(s); at least 2 are needed")
    print(f"scoring {len(ids)} tokens in windows of {lm.config.block_size}"
          + (f", stride {args.stride}" if args.stride else ""), file=sys.stderr)
    result = evaluate(lm.model, ids, args.stride, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} | "
              f"{result['tokens']} tokens scored")
    return 0


def _hellaswag(args) -> int:
    for flag in ("text", "stride", "batch_size"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} is for --task perplexity")
    if args.data is None:
        raise ConfigError("--task hellaswag needs --data FILE.jsonl (the official HellaSwag format)")
    examples = hellaswag.read_examples(args.data, args.limit)  # bad data fails before the load
    from jaxgpt.formats.load import load_for_inference  # late: loading pulls in orbax

    lm = load_for_inference(args.ckpt, args.int8)
    hellaswag.check_tokenizer(lm.model, lm.tokenizer)
    print(f"scoring {len(examples)} HellaSwag examples", file=sys.stderr)
    result = hellaswag.score(lm.model, lm.tokenizer, examples)
    note = None
    if hellaswag.is_gpt2_124m(lm.config, lm.meta.get("source")):
        note = hellaswag.reference_note(full=result["n"] == 10042)
    if args.json:
        print(json.dumps(result))
        if note:
            print(note, file=sys.stderr)
    else:
        print(hellaswag.format_table(result))
        if note:
            print(note)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
