"""`python -m jaxgpt.serve CKPT`: serve a model over an OpenAI-compatible HTTP API and a web chat
page (jaxgpt.serve: FastAPI + uvicorn, continuous batching over one decode engine)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxgpt.tokenizers import templates
from jaxgpt.cli import run
from jaxgpt.config import ConfigError
from jaxgpt.serve import defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.serve",
        description="Serve a model: POST /v1/completions and /v1/chat/completions (OpenAI's "
                    "request and response shapes, streaming as server-sent events), GET /v1/models, "
                    "/health, /metrics (Prometheus), and a chat page at /. Requests share the "
                    "engine's slots (continuous batching); each may name the base model or an "
                    "adapter in 'model'.")
    p.add_argument("ckpt", help="model: jaxgpt checkpoint (an SFT output too), LoRA adapter folder, "
                   "Hugging Face GPT-2 folder or hub name; its folder name is the base model's name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="also serve the LoRA adapter at PATH (trained on CKPT) as model NAME; "
                        "repeatable; rows of one batch may use different adapters")
    p.add_argument("--int8", action="store_true",
                   help="serve the int8-quantized base (adapters stay float)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="engine slots: sequences decoded together (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions of each slot's KV cache, prompt + reply (default: the model's "
                        "whole context); smaller is less memory")
    d = defaults.BUILTIN
    p.add_argument("--temperature", type=float, default=None,
                   help="for requests that leave 'temperature' out (default: the model's "
                        "generation_config.json / GGUF general.sampling / measured setting, else "
                        f"{d['temperature']}; 0 = greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"for requests that leave 'top_p' out (default: the model's, else {d['top_p']}; 1 = off)")
    p.add_argument("--top-k", type=int, default=None,
                   help="for requests that leave 'top_k' out (default: the model's, else off; 0 = off)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length for chat requests that leave 'max_tokens' out, and for completions "
                        f"in place of OpenAI's 16 (default: the model's, else {d['max_tokens']} for chat; "
                        "0 = as many as the context holds). /props and /v1/models show what is in effect")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more are answered 429 with Retry-After "
                        "(default: %(default)s)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--template", default=None,
                   help=f"chat template for /v1/chat/completions, one of {', '.join(templates.TEMPLATES)} "
                        "(default: the one saved with the model, else alpaca)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: CKPT's folder name)")
    return p


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter wants NAME=PATH, got {spec!r}")
        if not Path(path).is_dir():
            raise ConfigError(f"--adapter {name}: no such folder {path}")
        out.append((name, path))
    return out


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.template is not None:
        templates.check_template(args.template)
    adapters = parse_adapters(args.adapter)
    from jaxgpt import runtime

    runtime.enable_compilation_cache()  # a second start skips compiling the warm-up's programs
    api_key = args.api_key
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--api-key-file: {e}") from None
        if not api_key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
    import uvicorn

    from jaxgpt.serve.app import build_service, create_app

    service = build_service(args.ckpt, adapters, int8=args.int8, max_batch=args.max_batch,
                            max_queue=args.max_queue, template=args.template, api_key=api_key,
                            name=args.name, max_len=args.max_len,
                            sampling={"temperature": args.temperature, "top_p": args.top_p,
                                      "top_k": args.top_k, "max_tokens": args.max_tokens})
    url = f"http://{args.host}:{args.port}"
    print(f"serving {', '.join(service.ctx.models)} at {url}/v1 (chat page: {url}/)",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
