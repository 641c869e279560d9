"""`python -m jaxgpt.tokenizer train SOURCE... --vocab-size N --out DIR` (jaxgpt.tokenizer_train),
`python -m jaxgpt.tokenizer encode DIR [TEXT]` and `decode DIR [ID...]` for a quick look.
Bad input is one line and exit status 2 (jaxgpt.cli.run)."""

import argparse
import sys

from jaxgpt.cli import run
from jaxgpt.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.tokenizer",
        description="Train a byte-level BPE tokenizer on your corpus (Hugging Face tokenizers), "
                    "written as a folder that transformers.AutoTokenizer and every jaxgpt "
                    "--tokenizer flag read; or encode / decode with one.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,encode,decode}")
    t = sub.add_parser("train", help="train a tokenizer on SOURCEs into --out DIR",
                       description="Train a byte-level BPE (every byte is a token; the special "
                                   "tokens take the first ids) on the SOURCEs and write DIR/"
                                   "tokenizer.json + DIR/tokenizer_config.json. The same input "
                                   "gives the same files.")
    t.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="what python -m jaxgpt.prepare reads: a text file (one document), a "
                        "directory or glob, .jsonl/.json/.parquet records, .gz/.zst "
                        "compressed, or hf:NAME[:CONFIG][:SPLIT]")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the vocabulary, special tokens and the 256 bytes included "
                        "(e.g. 32768); a small corpus may give fewer (see --min-frequency)")
    t.add_argument("--out", required=True, help="the folder to write the tokenizer into")
    t.add_argument("--split", default="gpt2", choices=["gpt2", "llama3"],
                   help="pre-tokenizer split pattern: gpt2 (GPT-2's regex) or llama3 (Llama 3's: "
                        "digits in groups of up to 3, case-insensitive contractions, newlines "
                        "kept with punctuation)")
    t.add_argument("--eos-token", default="<|endoftext|>",
                   help="the end-of-text token (id 0; tokenizer_config.json's eos_token): "
                        "prepare puts it before every document, generation stops at it")
    t.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                   help="more special tokens (ids after the eos token), e.g. '<|pad|>'")
    t.add_argument("--chat-template", default=None, metavar="chatml|FILE",
                   help="a chat template for tokenizer_config.json: chatml (adds <|im_start|> "
                        "and <|im_end|> as special tokens) or a Jinja file")
    t.add_argument("--min-frequency", type=int, default=2,
                   help="merge only pairs seen at least this often (default 2)")
    t.add_argument("--text-field", default="text",
                   help="the field holding a record's text in jsonl/json/parquet/hf sources")
    t.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (--no-progress to hide them)")
    for name, what in (("encode", "print the token ids of TEXT (or stdin)"),
                       ("decode", "print the text of IDs (or stdin's)")):
        e = sub.add_parser(name, help=what, description=what.capitalize() + ".")
        e.add_argument("tokenizer", metavar="DIR",
                       help="a tokenizer folder (tokenizer.json), or gpt2")
        e.add_argument("items", nargs="*", metavar="TEXT" if name == "encode" else "ID",
                       help="the text (words are joined by spaces)" if name == "encode"
                       else "token ids (also comma-separated)")
        if name == "encode":
            e.add_argument("--show", action="store_true",
                           help="print each token's text next to its id, one a line")
    return p


def _train(args) -> int:
    from jaxgpt.tokenizers.train import train_tokenizer

    train_tokenizer(args.sources, args.out, args.vocab_size, split=args.split,
                    special_tokens=args.special_tokens, eos_token=args.eos_token,
                    chat_template=args.chat_template, min_frequency=args.min_frequency,
                    text_field=args.text_field, force=args.force,
                    progress=args.progress and sys.stderr.isatty(),
                    log=lambda msg: print(msg, file=sys.stderr))
    return 0


def _load(name: str):
    from jaxgpt.tokenizers.tokenizer import get_tokenizer, is_tokenizer_dir

    if name != "gpt2" and not is_tokenizer_dir(name):
        raise ConfigError(f"{name}: not a tokenizer folder (nor gpt2)")
    return get_tokenizer(name)


def _encode(args) -> int:
    tok = _load(args.tokenizer)
    text = " ".join(args.items) if args.items else sys.stdin.read()
    ids = tok.encode(text)
    if args.show:
        for i in ids:
            print(f"{i}\t{tok.decode([i])!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def _decode(args) -> int:
    tok = _load(args.tokenizer)
    words = " ".join(args.items) if args.items else sys.stdin.read()
    try:
        ids = [int(w) for w in words.replace(",", " ").split()]
    except ValueError:
        raise ConfigError("decode takes integer token ids") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": _train, "encode": _encode, "decode": _decode}[args.command](args)


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
