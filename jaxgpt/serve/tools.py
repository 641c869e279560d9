"""Tool calls for /v1/chat/completions: OpenAI's `tools` into the prompt, the model's calls out of
its text, and the grammar that makes a call certain.

The format (Hermes / Qwen's, which many small instruct models were trained on): the model calls
a function by writing

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one block per call), and reads each result back as a `<tool_response>` block in a user turn.

- Prompt: a chat template that handles tools itself (its Jinja source mentions `tools`) gets
  OpenAI's `tools` and the history's `tool_calls` / `tool` messages as transformers'
  apply_chat_template passes them. Any other template (SmolLM2's, alpaca, chatml) gets
  DEFAULT_TOOL_PROMPT: the tools' JSON signatures and the format above, appended to the system
  message (or as a system message of their own); an assistant message's `tool_calls` become
  its `<tool_call>` blocks and `tool` messages become user turns of `<tool_response>` blocks.
- Output: `ToolCallParser` splits the text into content and calls, as the text streams
  (content goes out at once, a call when its block closes); a block that does not hold
  {"name": str, "arguments": object} stays content.
- tool_choice "required" or a named function: the output is constrained to such blocks
  (jaxgpt.decode.grammar.compile_tool_calls), so it always parses; "auto" leaves the model free and
  "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import secrets

from jaxgpt.tokenizers import templates

OPEN, CLOSE = "<tool_call>", "</tool_call>"

DEFAULT_TOOL_PROMPT = """# Tools

You can call the functions below to help with the user's request. Their signatures, as JSON:
<tools>
{tools}
</tools>

To call a function, answer with one block per call, each holding a JSON object with the
function's name and its arguments:
<tool_call>
{{"name": "function_name", "arguments": {{"argument": "value"}}}}
</tool_call>
A function's result comes back to you inside <tool_response></tool_response>."""


def template_handles_tools(template: str, chat_template: str | None) -> bool:
    """Whether the served template renders tools itself (a model's Jinja source that uses them)."""
    return template == "model" and bool(chat_template) and "tools" in chat_template


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (arguments: a JSON string or an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def tool_prompt(tools: list[dict]) -> str:
    return DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages (with tool_calls / tool roles) as plain role/content messages carrying
    the default tool format, for a template that knows nothing of tools."""
    out: list[dict] = []
    if tools:
        prompt = tool_prompt(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + prompt})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def render(template: str, messages: list[dict], tools: list[dict] | None, chat_template: str | None,
           **bounds) -> str:
    """The prompt text for OpenAI `messages` (and `tools`, or None) in the served template (a
    model's own Jinja one rendered within `bounds`: templates.render_model's seconds / max_chars)."""
    if template_handles_tools(template, chat_template):
        msgs = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # transformers' convention: arguments as an object
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _as_object(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            msgs.append(m)
        return templates.render_model(msgs, chat_template, tools=tools, **bounds)
    return templates.render_prompt(template, plain_messages(messages, tools), chat_template, **bounds)


def _as_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _call(body: str) -> dict | None:
    """{"name", "arguments" (JSON text)} from a block's text, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCallParser:
    """Text in, ("content", text) and ("call", call) events out, in order, as text streams."""

    def __init__(self):
        self.pending = ""
        self.in_call = False
        self.calls: list[dict] = []

    def feed(self, text: str) -> list[tuple]:
        self.pending += text
        events = []
        while True:
            if self.in_call:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return events
                body, self.pending = self.pending[:end], self.pending[end + len(CLOSE):]
                self.in_call = False
                events.append(self._block(body))
            else:
                start = self.pending.find(OPEN)
                if start < 0:  # hold back what may be the start of a tag
                    hold = max((j for j in range(1, len(OPEN)) if self.pending.endswith(OPEN[:j])), default=0)
                    cut = len(self.pending) - hold
                    if cut:
                        events.append(("content", self.pending[:cut]))
                        self.pending = self.pending[cut:]
                    return events
                if start:
                    events.append(("content", self.pending[:start]))
                self.pending = self.pending[start + len(OPEN):]
                self.in_call = True

    def _block(self, body: str) -> tuple:
        call = _call(body.strip())
        if call is None:
            return ("content", OPEN + body + CLOSE)
        self.calls.append(call)
        return ("call", call)

    def finish(self) -> list[tuple]:
        """The rest: an unclosed block that holds a whole call (the model stopped after it) is one."""
        rest, self.pending = self.pending, ""
        if self.in_call:
            self.in_call = False
            ev = self._block(rest)
            return [ev if ev[0] == "call" else ("content", OPEN + rest)]
        return [("content", rest)] if rest else []


def split_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content or None, calls) of a whole answer (content: the text outside the call blocks,
    None when calls were made and nothing else was said)."""
    p = ToolCallParser()
    events = p.feed(text) + p.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls = [e[1] for e in events if e[0] == "call"]
    if calls and not content.strip():
        content = None
    return content, calls


_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def valid_name(name) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name))
