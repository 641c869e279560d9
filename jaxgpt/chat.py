"""Chat with a model in the terminal: the template applied, tokens streamed as they are generated;
`python -m jaxgpt.chat CKPT` (interactive) or `--prompt TEXT` (one reply, for scripts).

Each turn renders the whole conversation with the model's template (saved by jaxgpt.sft; Alpaca
otherwise), prefills a KV cache with it in one pass (padded to a power-of-two bucket so a new
prompt length rarely recompiles), then decodes one token per jitted step, printing each as soon
as it is complete UTF-8. `/reset` forgets the conversation, `/exit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import templates
from jaxgpt.config import ConfigError
from jaxgpt.model import init_cache
from jaxgpt.sample import bucket, check_sampling, sample_token


class ChatSession:
    """A conversation with a loaded model (jaxgpt.load). `reply(text, on_text)` streams the answer."""

    def __init__(self, lm, template: str | None = None, *, temperature: float = 0.7,
                 top_k: int | None = 50, top_p: float | None = None, max_new_tokens: int = 256,
                 seed: int = 0, system: str | None = None, log=lambda s: print(s, file=sys.stderr)):
        tok = lm.tokenizer
        if tok is None or getattr(tok, "eot_token", None) is None:
            raise ConfigError("chat needs a model with GPT-2's tokenizer (an <|endoftext|> token)")
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        self.lm, self.tok, self.log = lm, tok, log
        self.template = templates.check_template(template or lm.meta.get("template", templates.DEFAULT))
        self.max_new = min(max_new_tokens, lm.config.block_size - 1)
        self.system = system
        self.key = jax.random.key(seed)
        self.turn = 0
        pick = partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
        graphdef, self.state = nnx.split(lm.model)

        @jax.jit
        def prefill(state, ids, n, key):
            # ids: [1, Tb] prompt padded on the right; n: its real length
            model = nnx.merge(graphdef, state)
            cache = init_cache(model.config, 1)
            logits, cache = model(ids, cache=cache, logits_at=n - 1)  # [1, 1, V]: the last real token
            cache["index"] = n  # the padding after n is overwritten as decoding goes
            return pick(logits[:, 0], key), cache

        @partial(jax.jit, donate_argnums=(1,))
        def step(state, cache, tok_id, key):
            model = nnx.merge(graphdef, state)
            logits, cache = model(tok_id[:, None], cache=cache, logits_at=0)  # [1, 1, V]
            return pick(logits[:, -1], key), cache

        self._prefill, self._step = prefill, step
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation, dropping the oldest turns if it does not fit the context."""
        L = self.lm.config.block_size
        while True:
            ids = self.tok.encode_ordinary(templates.render_prompt(self.template, self.messages))
            if len(ids) + self.max_new <= L:
                return ids
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if len(users) > 1:  # forget the oldest user/assistant pair
                del self.messages[users[0]:users[1]]
                self.log("(the conversation outgrew the context; dropped the oldest turn)")
                continue
            keep = max(L - self.max_new, 1)
            self.log(f"(the message is {len(ids)} tokens; keeping its last {keep})")
            return ids[-keep:]

    def reply(self, text: str, on_text=lambda s: None) -> str:
        """Add a user message, generate and stream the reply (on_text gets text pieces), return it."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        L, eot = self.lm.config.block_size, self.tok.eot_token
        padded = np.full((1, bucket(len(ids), L)), eot, np.int32)
        padded[0, :len(ids)] = ids
        self.turn += 1
        key = jax.random.fold_in(self.key, self.turn)
        tok_id, cache = self._prefill(self.state, padded, jnp.int32(len(ids)), jax.random.fold_in(key, 0))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        for i in range(min(self.max_new, L - len(ids))):
            t = int(tok_id[0])
            if t == eot:
                break
            out.append(t)
            piece = decoder.decode(self.tok.decode_bytes([t]))
            if piece:
                on_text(piece)
            if len(ids) + len(out) >= L:
                break
            tok_id, cache = self._step(self.state, cache, tok_id, jax.random.fold_in(key, i + 1))
        tail = decoder.decode(b"", final=True)
        if tail:
            on_text(tail)
        answer = self.tok.decode(out)
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.chat", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="model: jaxgpt checkpoint (e.g. an SFT output), LoRA adapter folder, "
                   "Hugging Face GPT-2 folder or hub name")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (no prompt loop)")
    p.add_argument("--template", default=None,
                   help=f"one of {', '.join(templates.TEMPLATES)} (default: the one saved with the model, else alpaca)")
    p.add_argument("--system", default=None, help="a system message (alpaca: replaces the header line)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (argmax)")
    p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8", action="store_true", help="quantize the weights to int8 on load")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxgpt.api import load_for_inference

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        if args.template is not None:
            templates.check_template(args.template)
        lm = load_for_inference(args.ckpt, args.int8)
        chat = ChatSession(lm, args.template, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           system=args.system)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
