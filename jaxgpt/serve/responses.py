"""OpenAI's Responses API (POST /v1/responses) on the chat machinery: a Responses body becomes a
chat body (`instructions` + `input` items -> messages, flat function tools -> chat tools,
`text.format` -> `response_format`, `max_output_tokens` -> `max_completion_tokens`), which
`schemas.parse_chat` validates and the one scheduler runs; the chat answer is written back as a
Response object (`from_chat`), and its chunk stream as the Responses API's typed server-sent
events (`events`). Stateless: `previous_response_id` and stored responses are refused."""

from __future__ import annotations

import json
import uuid

from jaxgpt.serve.schemas import APIError, Context, GenRequest, _kind, parse_chat, text_content

# fields a Responses body carries that mean the same in a chat body
_SAME = ("model", "temperature", "top_p", "parallel_tool_calls", "stream", "user", "seed",
         "presence_penalty", "frequency_penalty", "logit_bias")


def _messages(body: dict) -> list[dict]:
    """`instructions` and `input` as chat messages (function calls and their outputs included)."""
    msgs = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise APIError(f"'instructions' must be a string, got {_kind(body['instructions'])}", "instructions")
        msgs.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise APIError("'input' must be a string or a non-empty array of items", "input")
    for i, it in enumerate(items):
        where = f"input[{i}]"
        kind = it.get("type", "message") if isinstance(it, dict) else None
        if kind == "message" and it.get("role") in ("user", "system", "developer", "assistant"):
            role = "system" if it["role"] == "developer" else it["role"]
            msgs.append({"role": role, "content": text_content(it.get("content"), f"{where}.content", ("input_text", "output_text", "text"), "input")})
        elif kind == "function_call":
            call = {"id": str(it.get("call_id") or it.get("id") or ""), "type": "function",
                    "function": {"name": it.get("name"), "arguments": it.get("arguments", "")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)  # (parallel calls: one assistant turn)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": str(it.get("call_id", "")),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        else:
            raise APIError(f"'{where}' must be a message (role user, system, developer or assistant), "
                           "a function_call or a function_call_output", "input")
    return msgs


def _tools(body: dict) -> dict:
    """Responses' flat function tools and tool_choice, as the chat body's."""
    out = {}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise APIError(f"'tools' must be an array, got {_kind(tools)}", "tools")
        out["tools"] = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function":
                raise APIError(f"'tools[{i}]' must be {{\"type\": \"function\", \"name\": ...}} "
                               "(this server calls functions only)", "tools")
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
            out["tools"].append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _format(body: dict) -> dict:
    """`text.format` as the chat body's response_format."""
    text = body.get("text")
    if text is None:
        return {}
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError("'text.format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}", "text")
    if fmt["type"] == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    return {"response_format": {"type": fmt["type"]}}


def chat_body(body: dict) -> dict:
    """The chat-completions body that asks for what the Responses body asks for."""
    if body.get("previous_response_id") is not None:
        raise APIError("'previous_response_id' is not supported: this server stores no responses; "
                       "send the whole conversation in 'input'", "previous_response_id")
    if body.get("background"):
        raise APIError("'background' responses are not supported", "background")
    chat = {k: body[k] for k in _SAME if k in body}
    chat["messages"] = _messages(body)
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("truncation") == "auto":  # (the oldest turns leave when the context is full)
        chat["truncate_prompt_tokens"] = -1
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return {**chat, **_tools(body), **_format(body)}


def parse_responses(body: dict, ctx: Context) -> GenRequest:
    """The body of POST /v1/responses, validated as the chat request it becomes."""
    req = parse_chat(chat_body(body), ctx)
    req.responses = body
    return req


def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def _response(rid: str, created: int, model: str, body: dict, output: list, usage, finish) -> dict:
    """A Response object; status "incomplete" when the token budget ended it."""
    done = finish is not None
    status = "incomplete" if finish == "length" else ("completed" if done else "in_progress")
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "usage": _usage(usage), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": body.get("text") or {"format": {"type": "text"}}, "metadata": body.get("metadata") or {},
            "previous_response_id": None, "store": False, "truncation": body.get("truncation", "disabled")}


def from_chat(chat: dict, body: dict) -> dict:
    """The Response object of a finished chat completion (its first choice)."""
    choice = chat["choices"][0]
    msg = choice["message"]
    output = []
    if msg.get("content"):
        output.append(_message_item("msg_" + chat["id"].removeprefix("chatcmpl-"), msg["content"]))
    output += [_call_item(c) for c in msg.get("tool_calls") or []]
    return _response("resp_" + chat["id"].removeprefix("chatcmpl-"), chat["created"], chat["model"], body,
                     output, chat["usage"], choice["finish_reason"])


class _ResponseEvents:
    """The typed events of one streamed response, made from the chat route's chunks: each method
    returns the events (SSE strings) one part of a chunk makes, numbered in order."""

    def __init__(self, body: dict):
        self.body, self.seq, self.output = body, 0, []
        self.text = None  # the message item being streamed: {"id", "index", "buf"}
        self.rid = self.created = self.model = self.usage = self.finish = None

    def ev(self, kind: str, **fields) -> str:
        self.seq += 1
        data = json.dumps({"type": kind, "sequence_number": self.seq - 1, **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n"

    def start(self, chunk: dict) -> list[str]:
        self.rid = "resp_" + chunk["id"].removeprefix("chatcmpl-")
        self.created, self.model = chunk["created"], chunk["model"]
        empty = _response(self.rid, self.created, self.model, self.body, [], None, None)
        return [self.ev("response.created", response=empty), self.ev("response.in_progress", response=empty)]

    def text_delta(self, text: str) -> list[str]:
        out = []
        if self.text is None:
            idx, iid = len(self.output), f"msg_{uuid.uuid4().hex[:24]}"
            self.text = {"id": iid, "index": idx, "buf": ""}
            out += [self.ev("response.output_item.added", output_index=idx, item=_message_item(iid, None, "in_progress")),
                    self.ev("response.content_part.added", item_id=iid, output_index=idx, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []})]
        t = self.text
        t["buf"] += text
        return out + [self.ev("response.output_text.delta", item_id=t["id"], output_index=t["index"],
                              content_index=0, delta=text, logprobs=[])]

    def close_text(self) -> list[str]:
        item, self.text = self.text, None
        if item is None:
            return []
        full = _message_item(item["id"], item["buf"])
        self.output.append(full)
        at = dict(item_id=item["id"], output_index=item["index"], content_index=0)
        return [self.ev("response.output_text.done", **at, text=item["buf"], logprobs=[]),
                self.ev("response.content_part.done", **at, part=full["content"][0]),
                self.ev("response.output_item.done", output_index=item["index"], item=full)]

    def call(self, call: dict) -> list[str]:  # (a tool call arrives whole)
        out = self.close_text()
        item, idx = _call_item(call), len(self.output)
        self.output.append(item)
        return out + [
            self.ev("response.output_item.added", output_index=idx, item={**item, "arguments": "", "status": "in_progress"}),
            self.ev("response.function_call_arguments.delta", item_id=item["id"], output_index=idx, delta=item["arguments"]),
            self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                    arguments=item["arguments"], name=item["name"]),
            self.ev("response.output_item.done", output_index=idx, item=item)]

    def end(self) -> list[str]:
        out = self.close_text()
        if self.rid is not None:
            final = _response(self.rid, self.created, self.model, self.body, self.output, self.usage, self.finish or "stop")
            out.append(self.ev("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                               response=final))
        return out


async def events(chat_sse, body: dict):
    """The Responses API's server-sent events for a stream of chat chunks (`chat_sse`: the
    `data: ...` strings of app._stream, which asked for usage in its last chunk)."""
    stream = _ResponseEvents(body)
    async for raw in chat_sse:
        data = raw.removeprefix("data: ").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:  # the engine failed on this request
            yield stream.ev("error", code=chunk["error"].get("code"), message=chunk["error"]["message"], param=None)
            return
        out = stream.start(chunk) if stream.rid is None else []
        stream.usage = chunk.get("usage") or stream.usage
        for c in chunk["choices"]:
            if c["delta"].get("content"):
                out += stream.text_delta(c["delta"]["content"])
            for call in c["delta"].get("tool_calls") or []:
                out += stream.call(call)
            stream.finish = c.get("finish_reason") or stream.finish
        for e in out:
            yield e
    for e in stream.end():
        yield e
