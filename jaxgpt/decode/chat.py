"""A conversation with a model: `ChatSession` applies the chat template, keeps the turns (dropping
the oldest when they outgrow the context) and streams each reply as complete UTF-8 text.

Each turn renders the whole conversation with the model's template (saved by jaxgpt.sft; Alpaca
otherwise) and decodes it through a one-slot jaxgpt.decode.engine.Engine (prefill in one pass, padded to
a power-of-two bucket, then one jitted step per token, through the decode copy on a CPU), each
token passed on as soon as it completes a UTF-8 character. The terminal front end is
jaxgpt.cli.chat (`python -m jaxgpt.chat CKPT`).
"""

from __future__ import annotations

import sys

import jax

from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError
from jaxgpt.decode.sampling import check_sampling
from jaxgpt.decode.engine import Engine, Request
from jaxgpt.decode.text import TextStream, token_bytes


class ChatSession:
    """A conversation with a loaded model (jaxgpt.load). `reply(text, on_text)` streams the answer."""

    def __init__(self, lm, template: str | None = None, *, temperature: float = 0.7,
                 top_k: int | None = 50, top_p: float | None = None, max_new_tokens: int = 256,
                 seed: int = 0, system: str | None = None, log=lambda s: print(s, file=sys.stderr)):
        tok = lm.tokenizer
        if tok is None or getattr(tok, "eot_token", None) is None:
            raise ConfigError("chat needs a model whose tokenizer has an end-of-text token (GPT-2's "
                              "<|endoftext|>, a GGUF / tokenizer.json eos such as <|im_end|>)")
        check_sampling(temperature, top_k, top_p, max_new_tokens)
        self.lm, self.tok, self.log = lm, tok, log
        self.template = templates.check_template(template or templates.default_template(lm))
        self.max_new = min(max_new_tokens, lm.config.block_size - 1)
        self.system = system
        self.key = jax.random.key(seed)
        self.turn = 0
        self.settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.engine = Engine(lm.model, slots=1)
        self.token_bytes = token_bytes(tok)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation, dropping the oldest turns if it does not fit the context."""
        L = self.lm.config.block_size
        while True:
            ids = templates.prompt_ids(self.tok, self.template, self.messages)
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
        self.turn += 1
        stream = TextStream(self.token_bytes)

        def on_token(t: int) -> None:
            if t != eot and (piece := stream.push(t)):
                on_text(piece)

        request = Request(ids, min(self.max_new, L - len(ids)), **self.settings, stop=(eot,),
                          seed=jax.random.fold_in(self.key, self.turn), on_token=on_token)
        slot = self.engine.add(request)
        try:
            self.engine.run()
        finally:
            self.engine.release(slot)  # a no-op once the reply has ended; frees it after Ctrl-C
        out = [t for t in request.tokens if t != eot]
        if tail := stream.finish():
            on_text(tail)
        answer = self.tok.decode(out)
        self.messages.append({"role": "assistant", "content": answer})
        return answer
