"""Chat with a model in the terminal: the template applied, tokens streamed as they are generated;
`python -m jaxgpt.chat CKPT` (interactive) or `--prompt TEXT` (one reply, for scripts).

A front end over jaxgpt.decode.chat.ChatSession: `/reset` forgets the conversation, `/exit` (or Ctrl-D)
leaves, Ctrl-C stops the reply being written and keeps the session.
"""

from __future__ import annotations

import argparse
import sys

from jaxgpt.tokenizers import templates
from jaxgpt.formats.load import load_for_inference
from jaxgpt.decode.chat import ChatSession
from jaxgpt.cli import run
from jaxgpt.cli.flags import add_int8, add_model, add_sampling
from jaxgpt.decode.sampling import check_sampling


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.chat", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model(p)
    p.add_argument("--prompt", default=None, help="answer this one message and exit (no prompt loop)")
    p.add_argument("--template", default=None,
                   help=f"one of {', '.join(templates.TEMPLATES)} (default: the one saved with the model, else alpaca)")
    p.add_argument("--system", default=None, help="a system message (alpaca: replaces the header line)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    add_sampling(p, temperature=0.7, top_k=50, top_p=None)
    add_int8(p)
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    from jaxgpt import runtime

    runtime.enable_compilation_cache()  # the decoder's programs, kept for the next chat
    if args.template is not None:
        templates.check_template(args.template)
    lm = load_for_inference(args.ckpt, args.int8)
    chat = ChatSession(lm, args.template, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       system=args.system)
    if args.prompt is not None:
        chat.reply(args.prompt, write)
        write("\n")
        return 0
    print(f"chatting with {lm!r}, template {chat.template}. /reset forgets, /exit leaves.",
          file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        write("bot> ")
        try:
            chat.reply(text, write)
        except KeyboardInterrupt:  # stop this reply, keep the session
            chat.messages.pop()
        write("\n")


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
