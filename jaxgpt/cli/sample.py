"""`python -m jaxgpt.sample CKPT --prompt TEXT`: sample text from a model (jaxgpt.decode.sample.text_samples)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxgpt.formats.load import load_for_inference
from jaxgpt.cli import run
from jaxgpt.cli.flags import add_int8, add_model, add_sampling
from jaxgpt.config import ConfigError
from jaxgpt.decode.sampling import check_sampling
from jaxgpt.decode.sample import text_samples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.sample",
        description="Sample text from a model. Stdout gets only the text (prompt + continuation; "
                    "samples separated by a line '---'); logs and warnings go to stderr. A prompt "
                    "longer than the model's context is truncated from the left (a warning says so).")
    add_model(p)
    p.add_argument("--prompt", default="", help="text to continue (default: <|endoftext|>, or a "
                   "newline for models without it)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1, help="samples, decoded as one batch")
    add_sampling(p, temperature=1.0, top_k=None, top_p=None)
    p.add_argument("--no-stop", action="store_true", help="don't stop at <|endoftext|>")
    p.add_argument("--no-cache", action="store_true",
                   help="re-run the whole context each step instead of using the KV cache")
    p.add_argument("--no-decode-copy", action="store_true",
                   help="decode with the model's own weights: on a CPU jaxgpt otherwise keeps a "
                        "transposed copy of the layer kernels and an int8 screen of the head "
                        "(same tokens, ~25%% faster at batch 1, about the layer weights' size "
                        "again in memory)")
    p.add_argument("--json", action="store_true",
                   help='print {"samples": [{"text", "tokens"}]} (tokens = prompt + generated ids)')
    p.add_argument("--raw", action="store_true",
                   help="send --prompt as it is, even to an instruction-tuned checkpoint (by default "
                        "its saved chat template wraps the prompt)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to JSON valid against the JSON Schema in FILE "
                        "(structured output: jaxgpt.grammar; decoded by the slot engine)")
    g.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    g.add_argument("--regex", default=None, help="constrain the output to match this regular expression")
    g.add_argument("--choice", action="append", default=None, metavar="TEXT",
                   help="constrain the output to one of these strings (repeat the flag)")
    add_int8(p)
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    schema = None
    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"--json-schema: cannot read {args.json_schema}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"--json-schema: {args.json_schema} is not valid JSON ({e})") from None
    lm = load_for_inference(args.ckpt, args.int8)
    grammar = None
    if schema is not None or args.json_object or args.regex is not None or args.choice:
        from jaxgpt.decode.grammar import compile_grammar
        if lm.tokenizer is None:
            raise ConfigError("this model has no tokenizer, so its output cannot follow a grammar")
        grammar = compile_grammar(lm.tokenizer, lm.config.vocab_size, json_schema=schema,
                                  json_object=args.json_object, regex=args.regex, choice=args.choice)
    samples = text_samples(lm, args.prompt, args.max_new_tokens, num_samples=args.num_samples,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, stop=not args.no_stop, use_cache=not args.no_cache,
                           fast_decode=False if args.no_decode_copy else None, raw=args.raw,
                           grammar=grammar)
    if args.json:
        print(json.dumps({"samples": samples}, ensure_ascii=False))
    else:
        print("\n---\n".join(s["text"] for s in samples))
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
