"""Request bodies -> validated generation settings, or an OpenAI-shaped error.

Every client mistake becomes an `APIError` (HTTP 4xx) whose JSON is what OpenAI's API answers:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

`parse_completion` and `parse_chat` read the bodies of /v1/completions and
/v1/chat/completions (the OpenAI fields jaxgpt implements; unknown fields are ignored, as
OpenAI-compatible servers do, and unsupported features asked for with a non-default value are
refused by name) into a `GenRequest`: the prompts as token ids plus the per-row settings the
engine runs with. `parse_tokenize` and `parse_detokenize` read the bodies of vLLM's /tokenize
and /detokenize (what lm-evaluation-harness's remote tokenizer sends).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError
from jaxgpt.evaluate.scoring import prepend_bos
from jaxgpt.serve.limits import MAX_STOP, MAX_TOP_LOGPROBS, Limits  # noqa: F401 (re-exported)
from jaxgpt.decode.text import stop_tables
from jaxgpt.serve.defaults import SamplingDefaults

MAX_N = 128
INT32 = (-2 ** 31, 2 ** 31 - 1)  # what the engine's per-row int settings hold
FLOAT32_MAX = 3.4028234663852886e38  # a larger float is inf in the engine's float32 settings
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (as vLLM): logits / t would overflow
ROLES = ("system", "user", "assistant", "developer", "tool")  # developer: OpenAI's newer name for system


class APIError(Exception):
    """An error answered as OpenAI-shaped JSON with HTTP `status` (and extra response headers)."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Context:
    """What validation needs to know about the served model."""

    models: dict[str, int]  # model name -> adapter index (0: the base)
    base_name: str
    context: int  # positions in the engine's cache (the model's block_size)
    vocab_size: int
    tokenizer: Any
    templates: dict[str, str]  # model name -> chat template
    eot: int | None
    limits: Limits = field(default_factory=Limits)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # for fields left out


@dataclass
class GenRequest:
    """One validated generation request: len(prompts) * n sequences (choices)."""

    kind: str  # "completion" | "chat"
    model: str
    adapter: int
    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: int | list[int]  # one per prompt when it came from the remaining room
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's logprob + k alternatives
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    stop_tables: list | None = None  # decode.text.stop_tables(stop), made off the event loop

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.n
    # structured outputs and tools (jaxgpt.grammar, jaxgpt.serve.tools)
    grammar: Any = None  # a compiled jaxgpt.decode.grammar.Grammar every choice is constrained to
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None  # {token id: bias}
    parse_tools: bool = False  # split the answer into content and tool_calls
    dropped_messages: int = 0  # chat: the oldest messages left out to fit (truncate_prompt_tokens)
    responses: dict | None = None  # POST /v1/responses: its body (the answer's shape; responses.py)

    def max_tokens_for(self, i: int) -> int:
        return self.max_tokens[i] if isinstance(self.max_tokens, list) else self.max_tokens


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or APIError 400: not JSON (NaN / Infinity are not), nested
    deeper than the parser's recursion allows, or holding a string that is not valid UTF-8
    text (a lone surrogate, "\\ud800": it could not be written back out)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError("the request body is nested too deeply", None, code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", None, code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_kind(body)}")
    _check_text(body)
    return body


def _check_text(body: dict) -> None:
    """APIError 400 naming the top-level field of the first string (or key) that UTF-8 cannot
    encode. Iterative: any depth json.loads returned."""
    stack = [(k, k, v) for k, v in body.items()]
    while stack:
        top, key, v = stack.pop()
        for s in (key, v):
            if isinstance(s, str) and not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    param = top if isinstance(top, str) and top.isascii() else None
                    raise APIError("the request holds a string that is not valid UTF-8 text (a lone "
                                   "surrogate such as \\ud800)", param, code="invalid_text") from None
        if isinstance(v, dict):
            stack.extend((top, k, x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((top, None, x) for x in v)


def _kind(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _int(body, name, default, lo=None, hi=None, what=""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(f"'{name}' must be an integer, got {_kind(v)}", name)
    lo = INT32[0] if lo is None else lo  # (the engine holds int32)
    hi = INT32[1] if hi is None else min(hi, INT32[1])
    if lo is not None and v < lo:
        raise APIError(f"'{name}' must be >= {lo}{what}, got {v}", name)
    if hi is not None and v > hi:
        raise APIError(f"'{name}' must be <= {hi}{what}, got {v}", name)
    return v


def _num(body, name, default):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(f"'{name}' must be a number, got {_kind(v)}", name)
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:  # (float32 in the engine)
        raise APIError(f"'{name}' must be a finite number, got {v:g}", name)
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean, got {_kind(v)}", name)
    return v


def _model(body, ctx: Context) -> tuple[str, int]:
    name = body.get("model", ctx.base_name)
    if name is None:
        name = ctx.base_name
    if not isinstance(name, str):
        raise APIError(f"'model' must be a string, got {_kind(name)}", "model")
    if name not in ctx.models:
        raise APIError(f"the model '{name}' does not exist; this server has: "
                       f"{', '.join(ctx.models)}", "model", status=404, code="model_not_found")
    return name, ctx.models[name]


def _refuse_unsupported(body, names_defaults):
    for name, ok in names_defaults:
        if name in body and body[name] is not None and not ok(body[name]):
            raise APIError(f"'{name}' is not supported by this server", name, code="unsupported")


UNSUPPORTED_COMMON = [
    ("best_of", lambda v: v == 1), ("suffix", lambda v: v == ""), ("functions", lambda v: v == []),
]


def _penalties(body, ctx: Context, req: GenRequest) -> None:
    """presence_penalty, frequency_penalty (OpenAI: -2..2) and logit_bias ({id: -100..100})."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = _num(body, name, 0.0)
        if not -2.0 <= v <= 2.0:
            raise APIError(f"'{name}' must be in [-2, 2], got {v:g}", name)
        setattr(req, name, v)
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return
    if not isinstance(bias, dict):
        raise APIError(f"'logit_bias' must be an object {{token id: bias}}, got {_kind(bias)}", "logit_bias")
    out = {}
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise APIError(f"'logit_bias' keys must be token ids, got {json.dumps(k)}", "logit_bias") from None
        if not 0 <= t < ctx.vocab_size:
            raise APIError(f"'logit_bias' holds token id {t}, outside the vocabulary "
                           f"(0..{ctx.vocab_size - 1})", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise APIError(f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)} "
                           f"for {k}", "logit_bias")
        out[t] = float(v)
    req.logit_bias = out


def _compile(ctx: Context, param: str, **grammar):
    """A jaxgpt.decode.grammar.Grammar for the served tokenizer, or APIError naming `param`."""
    from jaxgpt.decode import grammar as G

    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer, so its output cannot follow a grammar", param)
    try:
        return G.compile_grammar(ctx.tokenizer, ctx.vocab_size, **grammar)
    except ConfigError as e:
        raise APIError(str(e), param) from None


def _response_format(body, ctx: Context):
    """The grammar of `response_format` (json_object; json_schema, strict or not: always
    enforced) or of vLLM's guided_json / guided_regex / guided_choice / guided_grammar; None."""
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise APIError("'response_format' must be an object with a 'type'", "response_format")
        kind = rf["type"]
        if kind == "text":
            pass
        elif kind == "json_object":
            return _compile(ctx, "response_format", json_object=True)
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise APIError("'response_format.json_schema' must be an object with a 'schema' object",
                               "response_format")
            return _compile(ctx, "response_format", json_schema=js.get("schema") or {"type": "object"})
        else:
            raise APIError(f"'response_format.type' must be text, json_object or json_schema, got "
                           f"{json.dumps(kind)}", "response_format")
    guided = [(n, body.get(n)) for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
              if body.get(n) is not None]
    if len(guided) > 1:
        raise APIError(f"give one of {', '.join(n for n, _ in guided)}", guided[1][0])
    if guided:
        name, v = guided[0]
        ok = {"guided_json": isinstance(v, (dict, str)), "guided_choice": isinstance(v, list),
              "guided_regex": isinstance(v, str), "guided_grammar": isinstance(v, str)}[name]
        if not ok:
            raise APIError(f"'{name}' has the wrong type: {_kind(v)}", name)
        key = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "ebnf"}[name]
        return _compile(ctx, name, **{key: v})
    return None


def _sampling(body, ctx: Context, req: GenRequest) -> None:
    lim = ctx.limits
    req.n = _int(body, "n", 1, lo=1, hi=MAX_N)
    if req.n_choices > lim.max_choices:
        raise APIError(f"this request asks for {req.n_choices} choices ({len(req.prompts)} prompts x "
                       f"n {req.n}); this server allows at most {lim.max_choices} per request",
                       "n", code="too_many_choices")
    d = ctx.defaults  # (a field left out, or null: the server's default, jaxgpt.serve.defaults)
    t = _num(body, "temperature", d.temperature)
    if t < 0:
        raise APIError(f"'temperature' must be >= 0 (0 = greedy), got {t:g}", "temperature")
    req.temperature = t if t >= GREEDY_BELOW else 0.0
    p = _num(body, "top_p", d.top_p)
    if p is not None and not 0 < p <= 1:
        raise APIError(f"'top_p' must be in (0, 1], got {p:g}", "top_p")
    req.top_p = None if p is None or p == 1.0 else p
    req.top_k = _int(body, "top_k", d.top_k, lo=0, what=" (0: off)") or None
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise APIError(f"'seed' must be an integer, got {_kind(seed)}", "seed")
        if not -2 ** 63 <= seed < 2 ** 64:
            raise APIError(f"'seed' must fit in 64 bits, got {seed}", "seed")
        req.seed = seed
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(f"'stop' must be a string or an array of strings, got {_kind(stop)}", "stop")
    if len(stop) > lim.max_stops:
        raise APIError(f"'stop' may hold at most {lim.max_stops} strings, got {len(stop)}", "stop")
    if any(s == "" for s in stop):
        raise APIError("'stop' strings must not be empty", "stop")
    if any(len(s) > lim.max_stop_chars for s in stop):
        raise APIError(f"a 'stop' string may have at most {lim.max_stop_chars} characters, got "
                       f"{max(map(len, stop))}", "stop")
    req.stop = list(dict.fromkeys(stop))
    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise APIError(f"'stream_options' must be an object, got {_kind(opts)}", "stream_options")
        if not req.stream:
            raise APIError("'stream_options' is only allowed with 'stream': true", "stream_options")
        req.include_usage = _bool(opts, "include_usage")


def _max_tokens(body, ctx: Context, req: GenRequest, names, default) -> None:
    """max_tokens (or the first of `names` given), checked against each prompt and the context.
    0 is allowed with echo (the prompt's logprobs only); then a prompt may fill the context."""
    name = next((n for n in names if body.get(n) is not None), names[0])
    L = ctx.context
    if req.echo and body.get(name) in (0, 0.0) and not isinstance(body.get(name), bool):
        m = 0
    else:
        m = _int(body, name, None, lo=1, hi=L, what=f" (the model's context is {L} tokens)"
                 + ("; 0 only with 'echo': true" if req.kind == "completion" else ""))
    room = L if m == 0 else L - 1
    for i, p in enumerate(req.prompts):
        if len(p) > room:
            raise APIError(f"the prompt{f' {i}' if len(req.prompts) > 1 else ''} has {len(p)} tokens; "
                           f"this model's context is {L} tokens, so a prompt may have at most "
                           f"{room}", "messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        if m is not None and len(p) + m > L:
            raise APIError(f"this model's context is {L} tokens, but {len(p) + m} were asked for "
                           f"({len(p)} in the prompt, {m} for the completion); lower '{name}'",
                           name, code="context_length_exceeded")
    if m is not None:
        req.max_tokens = m
    elif default is None:  # chat: as long as the context allows
        req.max_tokens = [L - len(p) for p in req.prompts]
    else:
        req.max_tokens = [min(default, L - len(p)) for p in req.prompts]


def _token_list(v, ctx: Context, param: str) -> list[int] | None:
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        bad = [t for t in v if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(f"'{param}' holds token id {bad[0]}, outside the vocabulary "
                           f"(0..{ctx.vocab_size - 1})", param)
        return list(v)
    return None


def _encode(ctx: Context, text: str, param: str) -> list[int]:
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer; send the prompt as token ids", param)
    if text == "":  # as jaxgpt.sample: the empty prompt is <|endoftext|> (or a newline)
        return [ctx.eot] if ctx.eot is not None else ctx.tokenizer.encode("\n")
    try:
        return ctx.tokenizer.encode(text)
    except Exception as e:  # a char-level vocabulary without this character
        raise APIError(f"the prompt cannot be tokenized: {e}", param) from None


def parse_completion(body: dict, ctx: Context) -> GenRequest:
    """The body of POST /v1/completions."""
    _refuse_unsupported(body, UNSUPPORTED_COMMON + [("tools", lambda v: v == [])])
    model, adapter = _model(body, ctx)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError("'prompt' is required", "prompt")
    p = body["prompt"]
    prompts, texts = [], []
    lim = ctx.limits
    if isinstance(p, list) and p and isinstance(p[0], (str, list)) and len(p) > lim.max_choices:
        raise APIError(f"'prompt' holds {len(p)} prompts; this server allows at most "
                       f"{lim.max_choices} choices per request", "prompt", code="too_many_choices")
    if isinstance(p, str):
        prompts, texts = [_encode(ctx, p, "prompt")], [p]
    elif (ids := _token_list(p, ctx, "prompt")) is not None:
        prompts, texts = [ids], [None]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts, texts = [_encode(ctx, x, "prompt") for x in p], list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        for i, x in enumerate(p):
            ids = _token_list(x, ctx, f"prompt[{i}]")
            if ids is None:
                raise APIError(f"'prompt[{i}]' must be a non-empty array of token ids", "prompt")
            prompts.append(ids)
            texts.append(None)
    else:
        raise APIError("'prompt' must be a string, an array of strings, an array of token ids, "
                       f"or an array of arrays of token ids; got {_kind(p)}"
                       + (" (empty)" if p == [] else ""), "prompt")
    req = GenRequest("completion", model, adapter, prompts, texts, 16)
    _prompt_tokens(ctx, req, "prompt")
    _sampling(body, ctx, req)
    _penalties(body, ctx, req)
    req.grammar = _response_format(body, ctx)
    # OpenAI's default for completions is 16 tokens; a --max-tokens flag or the model's own wins
    default = 16 if ctx.defaults.source.get("max_tokens", "built-in") == "built-in" else ctx.defaults.max_tokens
    lp = body.get("logprobs")
    if lp is not None and lp is not False:
        req.logprobs = _int(body, "logprobs", None, lo=0, hi=_max_logprobs(ctx))
    req.echo = _bool(body, "echo")
    keep = _truncate_to(body, ctx, ("max_tokens",))
    if keep is not None:  # vLLM's truncate_prompt_tokens: the last `keep` tokens of each prompt
        for i, p in enumerate(req.prompts):
            if len(p) > keep:
                req.prompts[i], req.prompt_texts[i] = p[-keep:], None
    _max_tokens(body, ctx, req, ("max_tokens",), default)
    req.stop_tables = stop_tables(req.stop)
    return req


def _max_logprobs(ctx: Context) -> int:
    return min(MAX_TOP_LOGPROBS, ctx.limits.max_logprobs)


def _prompt_tokens(ctx: Context, req: GenRequest, param: str) -> None:
    n, cap = sum(map(len, req.prompts)), ctx.limits.max_prompt_tokens
    if n > cap:
        raise APIError(f"the request's prompts hold {n} tokens; this server allows at most {cap} "
                       "per request", param, code="too_many_prompt_tokens")


def _truncate_to(body, ctx: Context, names) -> int | None:
    """The most prompt tokens a request with `truncate_prompt_tokens` keeps (None: not asked):
    k >= 1 as given; -1 what fits beside a reply: the context less the request's max_tokens (else
    the server's default max_tokens), of which at most half the context is set aside."""
    k = _int(body, "truncate_prompt_tokens", None, lo=-1, hi=ctx.context,
             what=f" (the model's context is {ctx.context} tokens)")
    if k is None:
        return None
    if k == 0:
        raise APIError("'truncate_prompt_tokens' must be >= 1, or -1 (as much as fits)",
                       "truncate_prompt_tokens")
    if k > 0:
        return k
    m = next((body[n] for n in names if body.get(n) is not None), None)
    ok = isinstance(m, int) and not isinstance(m, bool) and m > 0
    reserve = min(m if ok else ctx.defaults.max_tokens or 1, max(ctx.context // 2, 1))
    return max(ctx.context - reserve, 1)


def _drop_oldest(msgs: list) -> list | None:
    """`msgs` less its oldest turn (system messages and the last message stay; a reply or tool
    result whose question left goes too), or None when nothing is left to drop."""
    keep_roles = ("system", "developer")
    i = next((j for j, m in enumerate(msgs[:-1])
              if not (isinstance(m, dict) and m.get("role") in keep_roles)), None)
    if i is None:
        return None
    out = msgs[:i] + msgs[i + 1:]
    while True:  # the next one, if it answered what left
        j = next((j for j, m in enumerate(out[:-1]) if not (isinstance(m, dict) and m.get("role") in keep_roles)), None)
        if j is None or out[j].get("role") not in ("assistant", "tool"):
            return out
        out = out[:j] + out[j + 1:]


def _fit_messages(body, ctx: Context, keep: int, rendered):
    """_chat_prompt of the body with its oldest turns dropped until the prompt has at most `keep`
    tokens: (its result, how many messages were dropped); APIError when the system messages and
    the last message alone are too long."""
    msgs = body["messages"]
    while len(rendered[4]) > keep:
        fewer = _drop_oldest(msgs)
        if fewer is None:
            raise APIError(f"the prompt has {len(rendered[4])} tokens even with only the system "
                           f"messages and the last message; 'truncate_prompt_tokens' allows {keep}",
                           "messages", code="context_length_exceeded")
        msgs = fewer
        rendered = _chat_prompt({**body, "messages": msgs}, ctx)
    return rendered, len(body["messages"]) - len(msgs)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    param = f"messages[{i}].content"
    if c is None:
        if m.get("role") == "assistant":
            return ""
        raise APIError(f"'{param}' is required", param)
    return text_content(c, param)


def text_content(c, where: str, kinds: tuple[str, ...] = ("text",), param: str | None = None) -> str:
    """A message's content as one string: a string, or an array of text parts (of a type in
    `kinds`) joined; an APIError naming `where` (and the request field `param`) otherwise."""
    param = param or where
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise APIError(f"'{where}' must be a string or an array of text parts, got {_kind(c)}", param)
    parts = []
    for j, part in enumerate(c):
        if not (isinstance(part, dict) and part.get("type") in kinds and isinstance(part.get("text"), str)):
            raise APIError(f"'{where}[{j}]' must be a text part {{\"type\": \"{kinds[0]}\", \"text\": ...}}; "
                           "this model reads text only", param)
        parts.append(part["text"])
    return "".join(parts)


def _tool_calls(m: dict, i: int) -> list[dict] | None:
    """An assistant message's `tool_calls` (OpenAI's shape), checked."""
    calls = m.get("tool_calls")
    if calls is None or calls == []:
        return None
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(f"'{param}' must be an array, got {_kind(calls)}", param)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                not isinstance(f.get("arguments", "{}"), (str, dict)):
            raise APIError(f"'{param}[{j}]' must be {{\"type\": \"function\", \"function\": "
                           "{\"name\": ..., \"arguments\": ...}}", param)
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": f["name"], "arguments": f.get("arguments", "{}")}})
    return out


def _tools(body) -> tuple[list[dict] | None, object, bool]:
    """(the `tools` as OpenAI function tools or None, tool_choice: "auto" | "none" |
    "required" | a function name, parallel_tool_calls)."""
    from jaxgpt.serve.tools import valid_name

    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = _bool(body, "parallel_tool_calls", True)
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError("'tool_choice' needs 'tools'", "tool_choice")
        return None, "none", parallel
    if not isinstance(tools, list):
        raise APIError(f"'tools' must be an array, got {_kind(tools)}", "tools")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise APIError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}} "
                           "(this server calls functions only)", "tools")
        if not valid_name(f.get("name")):
            raise APIError(f"'tools[{i}].function.name' must be 1-64 letters, digits, _ . or -", "tools")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(f"'tools[{i}].function.parameters' must be a JSON Schema object", "tools")
        out.append({"type": "function", "function": {k: v for k, v in f.items() if v is not None}})
    names = [t["function"]["name"] for t in out]
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise APIError(f"'tool_choice' names the function {json.dumps(name)}, which is not in "
                           f"'tools' ({', '.join(names)})", "tool_choice")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise APIError("'tool_choice' must be auto, none, required or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", "tool_choice")
    return out, choice, parallel


def _chat_prompt(body: dict, ctx: Context, tools: list[dict] | None = None):
    """(model, adapter, template, prompt text, ids) of a body's `messages`: rendered with the
    served template (the checkpoint's, or --template) and tokenized. `tools` (OpenAI function
    tools) go into the prompt as jaxgpt.serve.tools renders them."""
    model, adapter = _model(body, ctx)
    msgs = body.get("messages")
    if msgs is None:
        raise APIError("'messages' is required", "messages")
    if not isinstance(msgs, list):
        raise APIError(f"'messages' must be an array of messages, got {_kind(msgs)}", "messages")
    if not msgs:
        raise APIError("'messages' must hold at least one message", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(f"'messages[{i}]' must be an object, got {_kind(m)}", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got "
                           f"{json.dumps(role)}", f"messages[{i}].role")
        msg = {"role": "system" if role == "developer" else role}
        if role == "assistant" and (calls := _tool_calls(m, i)):
            msg["tool_calls"] = calls
            msg["content"] = _content(m, i) if m.get("content") is not None else ""
        else:
            msg["content"] = _content(m, i)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        messages.append(msg)
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer, so it cannot chat; use /v1/completions with "
                       "token ids", "messages")
    template = ctx.templates[model]
    try:  # the template "model" is the tokenizer's own Jinja source, which may refuse messages
        chat_template = getattr(ctx.tokenizer, "chat_template", None)
        bounds = {"seconds": ctx.limits.template_seconds, "max_chars": ctx.limits.template_chars}
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            from jaxgpt.serve import tools as T
            text = T.render(template, messages, tools, chat_template, **bounds)
        else:
            text = templates.render_prompt(template, messages, chat_template, **bounds)
    except ConfigError as e:
        raise APIError(str(e), "messages") from None
    # a model's own special tokens (SmolLM2's <|im_start|>) become their ids; GPT-2's are text
    ids = templates.encode_prompt(ctx.tokenizer, text) if hasattr(ctx.tokenizer, "encode_ordinary") \
        else _encode(ctx, text, "messages")
    return model, adapter, template, text, ids


def parse_chat(body: dict, ctx: Context) -> GenRequest:
    """The body of POST /v1/chat/completions."""
    _refuse_unsupported(body, UNSUPPORTED_COMMON)
    tools, choice, parallel = _tools(body)
    model, adapter, template, text, ids = _chat_prompt(body, ctx, tools if choice != "none" else None)
    req = GenRequest("chat", model, adapter, [ids], [text], None)
    _prompt_tokens(ctx, req, "messages")
    _sampling(body, ctx, req)
    _penalties(body, ctx, req)
    req.grammar = _response_format(body, ctx)
    if choice != "none":
        req.parse_tools = True
        if choice != "auto":  # required / a named function: the output is certain to be calls
            from jaxgpt.decode import grammar as G
            fns = [(t["function"]["name"], t["function"].get("parameters")) for t in tools
                   if choice == "required" or t["function"]["name"] == choice]
            try:
                req.grammar = G.compile_tool_calls(ctx.tokenizer, ctx.vocab_size, fns,
                                                   max_calls=3 if parallel and choice == "required" else 1)
            except ConfigError as e:
                raise APIError(str(e), "tools") from None
    if _bool(body, "logprobs"):
        req.logprobs = _int(body, "top_logprobs", 0, lo=0, hi=_max_logprobs(ctx))
    elif body.get("top_logprobs") is not None:
        raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    names = ("max_completion_tokens", "max_tokens")
    keep = _truncate_to(body, ctx, names)
    if keep is not None and len(ids) > keep:  # whole turns leave, oldest first
        (_, _, _, text, ids), req.dropped_messages = _fit_messages(body, ctx, keep, (model, adapter, template, text, ids))
        req.prompts, req.prompt_texts = [ids], [text]
    _max_tokens(body, ctx, req, names, ctx.defaults.max_tokens)
    if template == "chatml" and "<|im_end|>" not in req.stop:
        req.stop.append("<|im_end|>")  # the template's end of turn (beside <|endoftext|>)
    req.stop_tables = stop_tables(req.stop)
    return req


# ---- vLLM's tokenizer routes ------------------------------------------------------------------
def parse_tokenize(body: dict, ctx: Context) -> tuple[list[int], str]:
    """(ids, model name) for the body of POST /tokenize: vLLM's {"prompt": text,
    "add_special_tokens": true} (the tokenizer's BOS first if it prepends one by default) or
    {"messages": [...]} (rendered with the model's chat template, as /v1/chat/completions does;
    "add_special_tokens" false by default). Special-token text (<|endoftext|>) is its id."""
    model, _ = _model(body, ctx)
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer", None)
    if body.get("messages") is not None:
        if not _bool(body, "add_generation_prompt", True):
            raise APIError("'add_generation_prompt': false is not supported by this server",
                           "add_generation_prompt", code="unsupported")
        ids, add = _chat_prompt(body, ctx)[4], _bool(body, "add_special_tokens", False)
    elif body.get("prompt") is not None:
        text, add = body["prompt"], _bool(body, "add_special_tokens", True)
        if not isinstance(text, str):
            raise APIError(f"'prompt' must be a string, got {_kind(text)}", "prompt")
        try:
            ids = ctx.tokenizer.encode(text)
        except Exception as e:  # a char-level vocabulary without this character
            raise APIError(f"the prompt cannot be tokenized: {e}", "prompt") from None
    else:
        raise APIError("'prompt' (a string) or 'messages' is required", "prompt")
    return prepend_bos(ctx.tokenizer, ids, None if add else False), model


def parse_detokenize(body: dict, ctx: Context) -> list[int]:
    """The token ids of the body of POST /detokenize: {"tokens": [ids]} (may be empty)."""
    _model(body, ctx)
    if ctx.tokenizer is None:
        raise APIError("this model has no tokenizer", None)
    tokens = body.get("tokens")
    if tokens is None:
        raise APIError("'tokens' is required", "tokens")
    if tokens == []:
        return []
    ids = _token_list(tokens, ctx, "tokens")
    if ids is None:
        raise APIError(f"'tokens' must be an array of token ids, got {_kind(tokens)}", "tokens")
    return ids
