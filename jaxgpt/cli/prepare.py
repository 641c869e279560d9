"""`python -m jaxgpt.prepare SOURCE... --out DIR`: tokenize corpora into llm.c token shards
(jaxgpt.data.prepare.prepare). Bad input is one line and exit status 2 (jaxgpt.cli.run).
"""

import argparse
import os
import re
import sys

from jaxgpt.cli import run
from jaxgpt.data.prepare import DEFAULT_SHARD_TOKENS, prepare

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def count(text: str) -> int:
    """'100M' -> 100_000_000, '10485760' -> 10485760, '2^20' -> 1048576, '1_000' -> 1000."""
    t = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"2\^(\d+)", t)
    if m:
        return 2 ** int(m.group(1))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGbB]?)", t)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 100M, 10485760)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.prepare",
        description="Tokenize text files, directories, globs, .jsonl/.json records, .parquet "
                    "files (any of them .gz/.zst compressed) and Hugging Face datasets "
                    "(hf:NAME[:CONFIG][:SPLIT]) into llm.c token shards plus manifest.json. "
                    "Every document starts with <|endoftext|>; the first shard is validation. "
                    "Killed and run again with the same arguments, it resumes.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a text file (one document), a directory or glob (every file in it), a "
                        ".jsonl/.json/.parquet file (one document per record), .gz/.zst "
                        "compressed, or hf:NAME[:CONFIG][:SPLIT] (streamed; split default train)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|char|DIR",
                   help="gpt2 (tiktoken's GPT-2 BPE, offline), char (the corpus's characters "
                        "+ <|endoftext|>), or a tokenizer folder DIR (tokenizer.json + "
                        "tokenizer_config.json, e.g. from python -m jaxgpt.tokenizer train: its "
                        "eos_token starts every document; uint32 shards past 65,536 tokens)")
    p.add_argument("--workers", type=int, default=_default_workers(),
                   help="parallel tokenizers (default: the CPUs available); the output is the "
                        "same for any number")
    p.add_argument("--backend", default="auto", choices=["auto", "threads", "processes"],
                   help="how workers run: threads (tiktoken releases the GIL) or processes; "
                        "auto (default): processes for a tokenizer folder (a Python BPE), "
                        "else threads")
    p.add_argument("--shard-tokens", type=count, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per train shard (default 100M, as llm.c); accepts 100M, 2^20")
    p.add_argument("--val-tokens", type=count, default=None,
                   help="tokens of the first (validation) shard (default: a whole shard; 0: none)")
    p.add_argument("--text-field", default="text",
                   help="the field holding a record's text in jsonl/json/parquet/hf sources")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (--no-progress to hide it)")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    prepare(args.sources, args.out, tokenizer=args.tokenizer, workers=args.workers,
            shard_tokens=args.shard_tokens, val_tokens=args.val_tokens,
            text_field=args.text_field, backend=args.backend,
            progress=args.progress and sys.stderr.isatty(), log=log)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
