"""`python -m jaxgpt.serve CKPT`: serve a model over an OpenAI-compatible HTTP API and a web chat
page (jaxgpt.serve: FastAPI + uvicorn, continuous batching over one decode engine)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from jaxgpt.tokenizers import templates
from jaxgpt.cli import run
from jaxgpt.cli.flags import add_int8, add_model
from jaxgpt.config import ConfigError
from jaxgpt.serve.limits import Limits
from jaxgpt.serve import defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.serve",
        description="Serve a model: POST /v1/completions and /v1/chat/completions (OpenAI's "
                    "request and response shapes, streaming as server-sent events), GET /v1/models, "
                    "/health, /metrics (Prometheus), and a chat page at /. Requests share the "
                    "engine's slots (continuous batching); each may name the base model or an "
                    "adapter in 'model'.")
    add_model(p, what="the model to serve (its folder name is the base model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="also serve the LoRA adapter at PATH (trained on CKPT) as model NAME; "
                        "repeatable; rows of one batch may use different adapters")
    add_int8(p, help="serve the int8-quantized base (adapters stay float)")
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
                   help="requests that may wait for a slot beside those running (2 slots and "
                        "--max-queue 2 take 4 at once); more are answered 429 with Retry-After "
                        "(default: %(default)s)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file")
    p.add_argument("--template", default=None,
                   help=f"chat template for /v1/chat/completions, one of {', '.join(templates.TEMPLATES)} "
                        "(default: the one saved with the model, else alpaca)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: CKPT's folder name)")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="HOSTS",
                   help="also answer requests whose Host / Origin names one of these (comma-separated; "
                        "'.example.com': that domain and its subdomains; '*': any host). By default only "
                        "localhost, IP addresses and --host are (DNS-rebinding protection); others get 403")
    lim = p.add_argument_group("per-request limits (over one: a 400 naming the field)")
    d = Limits()
    lim.add_argument("--max-choices", type=int, default=d.max_choices,
                     help="choices per request: prompts x n (default: %(default)s)")
    lim.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                     help="prompt tokens per request, summed over its prompts (default: %(default)s)")
    lim.add_argument("--max-stops", type=int, default=d.max_stops,
                     help="stop strings per request (default: %(default)s, as OpenAI)")
    lim.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars,
                     help="characters of one stop string (default: %(default)s)")
    lim.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                     help="largest 'logprobs' / 'top_logprobs', 0..20 (default: %(default)s)")
    lim.add_argument("--template-timeout", type=float, default=d.template_seconds,
                     help="seconds one render of the model's own Jinja chat template may take; past it "
                          "(or past --template-max-chars of output) the request is a 400 (default: %(default)s)")
    lim.add_argument("--template-max-chars", type=int, default=d.template_chars,
                     help="characters a render of the model's own chat template may write (default: %(default)s)")
    return p


def bind_port(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before the model loads and warms up): ConfigError if
    it is taken or cannot be bound. uvicorn serves on this socket."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: cannot resolve it ({e})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "it is already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise ConfigError(f"cannot listen on {host}:{port}: {why} (another server? pick --port)") from None
    sock.set_inheritable(True)
    return sock


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
    limits = Limits(args.max_choices, args.max_prompt_tokens, args.max_stops, args.max_stop_chars,
                    args.max_logprobs, args.template_timeout, args.template_max_chars)
    allowed = [h.strip() for spec in args.allowed_hosts for h in spec.split(",") if h.strip()]
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

    from jaxgpt.serve.app import build_service, check_limits, create_app

    check_limits(limits)
    sock = bind_port(args.host, args.port)  # a busy port is an error now, not after the warm-up
    try:
        service = build_service(args.ckpt, adapters, int8=args.int8, max_batch=args.max_batch,
                                max_queue=args.max_queue, template=args.template, api_key=api_key,
                                name=args.name, max_len=args.max_len, limits=limits,
                                sampling={"temperature": args.temperature, "top_p": args.top_p,
                                          "top_k": args.top_k, "max_tokens": args.max_tokens})
    except BaseException:
        sock.close()
        raise
    url = f"http://{args.host}:{args.port}"
    print(f"serving {', '.join(service.ctx.models)} at {url}/v1 (chat page: {url}/)",
          file=sys.stderr, flush=True)
    app = create_app(service, allowed_hosts=[args.host, *allowed])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # (uvicorn re-raises the Ctrl-C it shut down on; as uvicorn.run)
        pass
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
