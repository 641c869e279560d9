"""The server's OpenAPI document (GET /openapi.json): the request bodies of /v1/completions and
/v1/chat/completions as this server validates them (schemas.py: types, ranges, the served
model names, the per-request limits), and OpenAI's error body for every 4xx / 5xx.

It is what clients and fuzzers read: tests/test_serve_hardening.py runs schemathesis over it
(valid and invalid bodies) while streams are in flight.
"""

from __future__ import annotations

from jaxgpt.serve.schemas import INT32, MAX_N, MAX_TOP_LOGPROBS, ROLES, Context


def _common(ctx: Context) -> dict:
    lim = ctx.limits
    stop = {"type": "string", "minLength": 1, "maxLength": lim.max_stop_chars}
    return {
        "model": {"type": "string", "enum": list(ctx.models)},
        "temperature": {"type": "number", "minimum": 0, "nullable": True},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
        "top_k": {"type": "integer", "minimum": 0, "maximum": INT32[1], "nullable": True,
                  "description": "an extension: keep the k most likely tokens (0: off)"},
        "n": {"type": "integer", "minimum": 1, "maximum": min(MAX_N, lim.max_choices), "nullable": True},
        "stop": {"oneOf": [stop, {"type": "array", "items": stop, "maxItems": lim.max_stops}],
                 "nullable": True},
        "seed": {"type": "integer", "minimum": -2 ** 63, "maximum": 2 ** 64 - 1, "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {"type": "object", "nullable": True,
                           "properties": {"include_usage": {"type": "boolean"}}},
    }


def _max_tokens(ctx: Context) -> dict:
    return {"type": "integer", "minimum": 1, "maximum": ctx.context, "nullable": True}


def _completion(ctx: Context) -> dict:
    V, lim = ctx.vocab_size, ctx.limits
    ids = {"type": "array", "minItems": 1, "maxItems": ctx.context - 1,
           "items": {"type": "integer", "minimum": 0, "maximum": V - 1}}
    prompt = {"oneOf": [{"type": "string"},
                        {"type": "array", "minItems": 1, "maxItems": lim.max_choices, "items": {"type": "string"}},
                        ids,
                        {"type": "array", "minItems": 1, "maxItems": lim.max_choices, "items": ids}]}
    props = {"prompt": prompt, **_common(ctx), "max_tokens": _max_tokens(ctx),
             "echo": {"type": "boolean", "nullable": True},
             "logprobs": {"type": "integer", "minimum": 0,
                          "maximum": min(MAX_TOP_LOGPROBS, lim.max_logprobs), "nullable": True}}
    return {"type": "object", "required": ["prompt"], "properties": props}


def _chat(ctx: Context) -> dict:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"type": "string", "enum": list(ROLES)},
                              "content": {"oneOf": [{"type": "string"},
                                                    {"type": "array", "items": part}]}}}
    props = {"messages": {"type": "array", "minItems": 1, "items": message}, **_common(ctx),
             "max_tokens": _max_tokens(ctx), "max_completion_tokens": _max_tokens(ctx),
             "logprobs": {"type": "boolean", "nullable": True},
             "top_logprobs": {"type": "integer", "minimum": 0,
                              "maximum": min(MAX_TOP_LOGPROBS, ctx.limits.max_logprobs), "nullable": True}}
    return {"type": "object", "required": ["messages"], "properties": props}


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True},
                   "code": {"type": "string", "nullable": True}}}}}


def _operation(summary: str, body: dict, max_body: int) -> dict:
    err = {"description": "OpenAI's error body", "content": {"application/json": {"schema": ERROR}}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}},
                        "description": f"at most {max_body} bytes"},
        "responses": {"200": {"description": "the completion (JSON, or server-sent events with "
                                             "'stream': true)"},
                      **{code: err for code in ("400", "401", "403", "404", "413", "415", "429", "500")}}}}


def openapi_schema(ctx: Context, max_body: int) -> dict:
    """The OpenAPI 3.0 document of the generation routes, for `ctx`'s models and limits."""
    return {"openapi": "3.0.3",
            "info": {"title": "jaxgpt.serve", "version": "1"},
            "paths": {"/v1/completions": _operation("a text completion", _completion(ctx), max_body),
                      "/v1/chat/completions": _operation("a chat completion", _chat(ctx), max_body)}}
