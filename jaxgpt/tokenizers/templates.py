"""Chat templates: how a conversation becomes the prompt text a model continues (SFT, chat, sample).

Every instruction record is first normalised to a list of messages, `[{"role", "content"}]`
(roles: system, user, assistant), ending with the assistant reply that SFT trains on. A template
renders everything *before* that reply as the prompt; the reply follows it directly and is
closed by `<|endoftext|>`, the stop token, which the tokenizer adds as its own id.

  alpaca  the Alpaca / "LLMs from scratch" format (the default, exactly as below)
  chatml  <|im_start|>role\\n...<|im_end|> blocks (plain text for GPT-2's vocabulary)
  none    the prompt text as it is (for data that is already formatted)
  model   the model's own chat template: the Jinja source a GGUF file (tokenizer.chat_template)
          or an HF folder (tokenizer_config.json) ships, rendered as transformers'
          apply_chat_template renders it (SmolLM2's: ChatML with its default system prompt).
          The reply is closed by the model's eos token (SmolLM2: <|im_end|>).

The template's name is saved with every SFT checkpoint, so `sample`/`chat` reuse it (with
"model", the Jinja source travels with the tokenizer, as its `chat_template`). A rendered
prompt becomes ids through `encode_prompt`: a model's own special tokens in it (SmolLM2's
<|im_start|>) become their ids; in GPT-2's vocabulary the same text is plain text.
"""

from __future__ import annotations

import sys
import threading
import time
from functools import lru_cache

from jaxgpt.config import ConfigError

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")

Message = dict[str, str]


def _alpaca_turn(user: str, user_input: str = "") -> str:
    """One instruction (plus its optional input) up to and including the response header."""
    text = f"### Instruction:\n{user}"
    if user_input:
        text += f"\n\n### Input:\n{user_input}"
    return text + "\n\n### Response:\n"


def render_alpaca(messages: list[Message]) -> str:
    """The Alpaca prompt. Earlier turns become Instruction/Response pairs; a system message
    replaces the standard header line; a user message may carry an "input" (Alpaca's field)."""
    header = next((m["content"] for m in messages if m["role"] == "system"), ALPACA_HEADER)
    text = header
    for m in messages:
        if m["role"] == "user":
            text += "\n\n" + _alpaca_turn(m["content"], m.get("input", ""))
        elif m["role"] == "assistant":
            text += m["content"]  # a previous reply, right after its "### Response:\n"
    return text


def render_chatml(messages: list[Message]) -> str:
    """ChatML: each message as <|im_start|>role\\ncontent<|im_end|>\\n, then the assistant header."""
    text = ""
    for m in messages:
        content = m["content"]
        if m["role"] == "user" and m.get("input"):
            content += "\n\n" + m["input"]
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def render_none(messages: list[Message]) -> str:
    """The user text as it is (plus its input on the next line), earlier turns concatenated."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            continue
        parts.append(m["content"] + ("\n" + m["input"] if m.get("input") else ""))
    return "".join(parts)


RENDER_SECONDS = 10.0  # bounds on one render of a model's own template (the server's are flags)
RENDER_CHARS = 1 << 22


class TemplateLimit(ConfigError):
    """A model's chat template ran past its time or size bound."""


@lru_cache(maxsize=8)
def _jinja(source: str):
    """A compiled Jinja chat template, in the environment transformers renders them in (sandboxed,
    trim_blocks + lstrip_blocks, raise_exception and strftime_now available), where `*`, `**`
    and `+` refuse results past the render's size bound (one C-level operation a time bound
    could not interrupt: "x" * 10**10)."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"the model's chat template refused the messages: {message}")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            cap = getattr(_bound, "chars", RENDER_CHARS)
            size = lambda v: len(v) if isinstance(v, (str, list, tuple)) else None
            if operator == "*":
                for a, b in ((left, right), (right, left)):
                    if size(a) is not None and isinstance(b, int) and size(a) * b > cap:
                        raise TemplateLimit(f"the model's chat template built a value of over {cap} items")
            elif operator == "+" and size(left) is not None and size(right) is not None:
                if size(left) + size(right) > cap:
                    raise TemplateLimit(f"the model's chat template built a value of over {cap} items")
            elif (operator == "**" and isinstance(left, int) and isinstance(right, int)
                  and abs(left) > 1 and right > 4096):
                raise TemplateLimit(f"the model's chat template computed {left} ** {right}")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ConfigError(f"the model's chat template is not valid Jinja: {e}") from None


_bound = threading.local()  # the render in progress on this thread: its size bound


def render_model(messages: list[Message], chat_template: str | None, special: dict | None = None,
                 tools: list | None = None, *, seconds: float = RENDER_SECONDS,
                 max_chars: int = RENDER_CHARS) -> str:
    """The model's own Jinja template over `messages`, with the generation prompt (the assistant
    header) at the end. `special`: bos_token / eos_token strings the template may use; `tools`:
    OpenAI tool definitions, for a template that renders them (messages may then carry
    tool_calls / tool_call_id, passed on as transformers' apply_chat_template passes them).

    A model's template is code from its file, so one render is bounded: `seconds` (checked at
    every line the template runs and every call it makes: a trace function on this thread, so
    nested loops stop too) and `max_chars` of output (and of any one string or list it builds
    with * or +); past either, TemplateLimit. Any other failure of the template is a
    ConfigError naming it."""
    if not chat_template:
        raise ConfigError("template 'model': this model ships no chat template; "
                          "choose alpaca, chatml or none")
    msgs = [{**{k: v for k, v in m.items() if k != "input"},
             "content": m["content"] + ("\n\n" + m["input"] if m.get("input") else "")}
            for m in messages]
    tmpl = _jinja(chat_template)
    try:
        return _bounded_render(tmpl, seconds, max_chars, messages=msgs, add_generation_prompt=True,
                               **({"tools": tools} if tools else {}), **(special or {}))
    except ConfigError:
        raise
    except Exception as e:  # the template's own error (jinja's, or a TypeError in it)
        raise ConfigError(f"the model's chat template failed on these messages: "
                          f"{type(e).__name__}: {e}") from None


def _bounded_render(tmpl, seconds: float, max_chars: int, **context) -> str:
    deadline = time.monotonic() + seconds
    fired = []

    def trace(frame, event, arg):  # 'call' of every frame; 'line' in the template's own code
        if not fired and time.monotonic() > deadline:
            fired.append(1)
            raise TemplateLimit(f"the model's chat template ran past {seconds:g} s")
        return trace if frame.f_code.co_filename == "<template>" else None

    parts, size = [], 0
    old, _bound.chars = sys.gettrace(), max_chars
    sys.settrace(trace)
    try:
        for chunk in tmpl.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateLimit(f"the model's chat template wrote over {max_chars} characters")
            parts.append(chunk)
    finally:
        sys.settrace(old)
        del _bound.chars
    if fired:  # (the limit fired where something swallowed it)
        raise TemplateLimit(f"the model's chat template ran past {seconds:g} s")
    return "".join(parts)


TEMPLATES = {"alpaca": render_alpaca, "chatml": render_chatml, "none": render_none, "model": None}
DEFAULT = "alpaca"


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return name


def default_template(lm) -> str:
    """The template a loaded model is used with when none is asked for: the one saved with it
    (SFT), else its own chat template if its tokenizer carries one (GGUF, HF folders), else alpaca."""
    return lm.meta.get("template") or ("model" if getattr(lm.tokenizer, "chat_template", None) else DEFAULT)


def render_prompt(name: str, messages: list[Message], chat_template: str | None = None,
                  **bounds) -> str:
    """The prompt text for `messages` (which must not include the reply to be generated);
    `chat_template`: the model's Jinja source, for the template "model" (rendered within
    `bounds`: render_model's seconds / max_chars)."""
    if check_template(name) == "model":
        return render_model(messages, chat_template, **bounds)
    return TEMPLATES[name](messages)


def prompt_ids(tok, name: str, messages: list[Message]) -> list[int]:
    """Token ids of the prompt for `messages` (which exclude the reply) in template `name`; the
    template "model" is the tokenizer's own `chat_template` (as in transformers)."""
    return encode_prompt(tok, render_prompt(name, messages, getattr(tok, "chat_template", None)))


def encode_prompt(tok, text: str) -> list[int]:
    """The ids of a rendered prompt. A tokenizer with special tokens of its own (a byte-level BPE
    from GGUF / tokenizer.json: SmolLM2's <|im_start|>, <|im_end|>) reads them as their ids, as
    transformers does; GPT-2's reads `<|im_start|>` and even `<|endoftext|>` in a prompt as plain
    text (encode_ordinary), so that user text cannot inject an end-of-text token."""
    if getattr(tok, "special_tokens", None):
        return tok.encode(text, allow_special=True)
    return tok.encode_ordinary(text) if hasattr(tok, "encode_ordinary") else tok.encode(text)


# ---- records -> messages ---------------------------------------------------------------------
def _need(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        got = "missing" if field not in record else f"a {type(value).__name__}, not a string"
        raise ConfigError(f"{where}: field {field!r} is {got}")
    return value


def to_messages(record, where: str) -> list[Message]:
    """Normalise one record (Alpaca, prompt/completion, or chat) to messages ending with the reply.

    `where` names the record in error messages, e.g. "data.json record 17".
    """
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f"{where}: field 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ConfigError(f"{where}: messages[{i}] is not an object")
            role = _need(m, "role", f"{where} messages[{i}]")
            if role not in ("system", "user", "assistant"):
                raise ConfigError(f"{where}: messages[{i}] has role {role!r}; "
                                  "expected system, user or assistant")
            out.append({"role": role, "content": _need(m, "content", f"{where} messages[{i}]")})
        if out[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: the last message must be the assistant's reply")
        if not any(m["role"] == "user" for m in out):
            raise ConfigError(f"{where}: no user message")
        return out
    if "instruction" in record:
        user = {"role": "user", "content": _need(record, "instruction", where)}
        if record.get("input"):
            user["input"] = _need(record, "input", where)
        return [user, {"role": "assistant", "content": _need(record, "output", where)}]
    if "prompt" in record:
        return [{"role": "user", "content": _need(record, "prompt", where)},
                {"role": "assistant", "content": _need(record, "completion", where)}]
    raise ConfigError(f"{where}: unknown record shape (keys {sorted(record)[:6]}); expected "
                      "instruction/input/output, prompt/completion, or messages")
