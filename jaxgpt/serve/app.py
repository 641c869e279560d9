"""The OpenAI-compatible HTTP server: a FastAPI app over one Scheduler (one decode engine).

    service = build_service("out_sft", adapters=[("help", "out_lora")], max_batch=8)
    app = create_app(service)          # then uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events when
`stream` is true), GET /v1/models, GET /props (llama.cpp's: the defaults a request's missing
sampling fields get), GET /health, GET /metrics (Prometheus text), GET / (the web
chat page, jaxgpt/serve/static/index.html), and vLLM's tokenizer routes POST /tokenize, POST
/detokenize, GET /tokenizer_info (what lm-evaluation-harness's local-completions model probes
for; like vLLM's, they need no API key). Every client mistake is a 4xx answer with
OpenAI's error JSON (schemas.APIError); an unexpected failure is a 500 with the same shape and
no traceback. The handlers validate, submit to the scheduler and relay its output; the model
runs in the scheduler's thread, never on the event loop, and neither does parsing: bodies are
decoded, checked, templated and tokenized in a small pool of worker threads (a model's own
chat template within its time and size bounds, schemas.Limits). Every request passes the
Host / Origin allow-list first (hosts.py). GET /openapi.json describes the two generation
routes' bodies (openapi.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgpt.model import lora
from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError
from jaxgpt.decode.steps import bucket
from jaxgpt.decode.engine import Engine, Request as EngineRequest
from jaxgpt.evaluate.scoring import adds_bos
from jaxgpt.serve.hosts import HostAllowList, HostFilter
from jaxgpt.serve.defaults import model_defaults, resolve
from jaxgpt.serve.metrics import Metrics
from jaxgpt.serve.openapi import openapi_schema
from jaxgpt.serve import responses as R
from jaxgpt.serve import tools as T
from jaxgpt.serve.scheduler import Job, Scheduler, seed_key
from jaxgpt.serve.schemas import (APIError, Context, GenRequest, Limits, parse_chat, parse_completion,
                                  parse_detokenize, parse_json, parse_tokenize)

MAX_BODY = 1 << 20  # bytes of a request body
PARSE_THREADS = 4  # worker threads that decode, template and tokenize request bodies
DROPPED_HEADER = "X-Dropped-Messages"


@dataclass
class Service:
    """Everything the routes serve: the validation context, the scheduler, the served names."""

    ctx: Context
    scheduler: Scheduler
    models: list[dict]  # /v1/models entries
    api_key: str | None = None
    max_body: int = MAX_BODY
    warming: threading.Thread | None = None  # the engine's programs still compiling (build_service)

    @property
    def metrics(self) -> Metrics:
        return self.scheduler.metrics


def _name(path: str) -> str:
    p = Path(str(path).rstrip("/"))
    return p.name or str(path)


FIRST_PROMPT = 64  # compiled before the server is ready: prompts of up to this many tokens at once


def build_service(ckpt: str, adapters=(), *, int8: bool = False, max_batch: int = 8,
                  max_queue: int = 64, template: str | None = None, api_key: str | None = None,
                  name: str | None = None, max_len: int | None = None, warmup: bool = True,
                  warmup_prompt: int | None = None, fast_decode: bool | None = None,
                  limits: Limits | None = None, background: bool = True, sampling: dict | None = None,
                  log=lambda s: print(s, file=sys.stderr, flush=True)) -> Service:
    """Load CKPT (anything jaxgpt.load takes) and the adapters [(NAME, PATH)], build the engine
    with `max_batch` slots of `max_len` positions (default: the model's context), compile the
    shapes it can meet (`warmup`; prompts up to `warmup_prompt` tokens only, if given) and start
    the scheduler. With `background` only what a first request needs is compiled before this
    returns (the decode step, through which prompts go a token per step until the chunk program
    is compiled; with a growing cache also one prompt of up to FIRST_PROMPT tokens at a time);
    the rest compiles in a thread while the server answers (Service.warming). `limits`: the per-request
    caps (schemas.Limits; checked here, ConfigError naming the flag). `sampling`: the server's
    default temperature / top_p / top_k / max_tokens flags (None: the model's, jaxgpt.serve.defaults)."""
    from flax import nnx

    from jaxgpt.formats.load import load_for_inference  # (the heavy imports stay out of `import app`)

    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if max_len is not None and max_len < 2:
        raise ConfigError(f"--max-len must be >= 2, got {max_len}")
    if max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {max_queue}")
    if template is not None:
        templates.check_template(template)
    limits = limits or Limits()
    check_limits(limits)
    defaults = resolve(sampling or {}, *model_defaults(ckpt))
    lm = load_for_inference(ckpt)
    base_name = name or _name(ckpt)
    names = {base_name: 0}
    weights, tmpl = [], {base_name: template or templates.default_template(lm)}
    for i, (aname, path) in enumerate(adapters, start=1):
        if aname in names:
            raise ConfigError(f"--adapter {aname}: the name is already taken")
        if not lora.is_adapter(path):
            raise ConfigError(f"--adapter {aname}={path}: not a LoRA adapter folder (no {lora.ADAPTER_META})")
        if lm.is_int8:
            raise ConfigError("adapters need a float base; pass the float checkpoint and --int8")
        weights.append(lora.adapter_weights(path, lm.model))
        meta = lora.read_adapter_meta(path)
        names[aname] = i
        tmpl[aname] = template or meta.get("template") or tmpl[base_name]
    if int8:
        if lm.is_int8:
            raise ConfigError(f"--int8: {ckpt} is already int8-quantized; drop the flag")
        lm = lm.quantize()
    tok = lm.tokenizer
    eot = getattr(tok, "eot_token", None)
    t = time.perf_counter()
    engine = Engine(lm.model, slots=max_batch, max_len=max_len, adapters=weights, fast_decode=fast_decode)
    warming = None
    if warmup:
        shapes = engine.shapes(warmup_prompt, first=FIRST_PROMPT)
        Tb = bucket(min(FIRST_PROMPT, warmup_prompt or FIRST_PROMPT), cap=engine.max_len)
        first, feeds = shapes, False
        if background:  # the step (and growths); with a cache of one length, prompts go a token
            # per step through it until the chunk program (the background's first) is compiled,
            # then in chunks until their own; else one prompt of <= FIRST_PROMPT is compiled too
            feeds = len(engine.capacities) == 1
            plain = lambda k: all(isinstance(x, int) for x in k[1:])  # (grammar / bias variants: later)
            first = [k for k in shapes if (k[0] in ("step", "grow") and plain(k))
                     or (not feeds and (k[1:] == (1, Tb) or k[2:] == (1, Tb)))]
        log(f"compiling the engine for {max_batch} slots of {engine.max_len} positions "
            f"({len(first)} of its {len(shapes)} programs now, kept in the compilation cache)...")
        engine.warmup(shapes=first)
        rest = [k for k in shapes if k not in engine.compiled]
        engine.queue_background(rest)  # (the request below then goes where requests will go)
        # the eager bits of a request (its key, the logprobs path), once, in a compiled program:
        # before the background starts, so that nothing else compiles at the same time
        prompt = [0] * (1 if background and feeds else Tb // 2 + 1 if Tb > 16 else 1)
        for a in range(len(weights) + 1):
            engine.add(EngineRequest(prompt[:engine.max_len - 2], 2, seed=seed_key(1, 1), logprobs=1, adapter=a))
            engine.run()
        log(f"engine: {max_batch} slots, context {engine.max_len}, ready in {time.perf_counter() - t:.1f} s")
        if rest:  # (in the order of `shapes`: the request above asked for its own prefill first)
            warming = engine.warmup_in_background(rest, log=_progress(log, len(rest)))
    created = int(time.time())
    shown = {k: v for k, v in defaults.as_dict().items() if k != "source"}
    log("defaults for requests that leave them out: " + ", ".join(
        f"{k} {'off' if v is None else v} ({defaults.source[k]})" for k, v in shown.items()))
    models = [{"id": n, "object": "model", "created": created, "owned_by": "jaxgpt",
               "root": base_name, "parent": None if i == 0 else base_name,
               "max_model_len": engine.max_len, "default_sampling": shown} for n, i in names.items()]
    ctx = Context(names, base_name, engine.max_len, lm.config.vocab_size, tok, tmpl, eot,
                  limits=limits, defaults=defaults)
    scorer = nnx.merge(engine.graphdef, engine.state)  # echoed prompts: the engine's weights, shared
    scheduler = Scheduler(engine, tok, max_queue=max_queue, eot=eot, scorer=scorer)
    scheduler.start()
    return Service(ctx, scheduler, models, api_key, warming=warming)


def _progress(log, total: int):
    """A log for Engine.warmup_in_background: a line at the end (and at each quarter)."""
    marks = {total} | {total * q // 4 for q in (1, 2, 3)}

    def report(done, _, secs):
        if done in marks:
            log(f"compiled {done} of {total} more programs in the background ({secs:.0f} s)")
    return report


LIMIT_FLAGS = {"max_choices": "--max-choices", "max_prompt_tokens": "--max-prompt-tokens",
               "max_stops": "--max-stops", "max_stop_chars": "--max-stop-chars",
               "max_logprobs": "--max-logprobs", "template_seconds": "--template-timeout",
               "template_chars": "--template-max-chars"}


def check_limits(limits: Limits) -> None:
    """ConfigError (named as the flag) for a cap that admits no request."""
    for name, flag in LIMIT_FLAGS.items():
        v, lo = getattr(limits, name), 0 if name == "max_logprobs" else 1
        if name == "template_seconds":
            if not 0 < v < float("inf"):
                raise ConfigError(f"{flag} must be > 0 seconds, got {v}")
        elif not v >= lo:
            raise ConfigError(f"{flag} must be >= {lo}, got {v}")
    if limits.max_logprobs > 20:
        raise ConfigError(f"--max-logprobs must be <= 20 (what the engine computes), got {limits.max_logprobs}")


# ---- responses ---------------------------------------------------------------------------------
def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _usage(job: Job) -> dict:
    p, c = job.prompt_tokens, job.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _completion_logprobs(infos, offset: int) -> dict:
    return {"tokens": [_text(i.bytes) for i in infos],
            "token_logprobs": [i.logprob for i in infos],
            "top_logprobs": [None if i.top is None else {_text(b): v for _, b, v in i.top} for i in infos],
            "text_offset": [i.offset + offset for i in infos]}


def _prompt_infos(job: Job, choice_index: int) -> list:
    """The echoed prompt's TokenInfos of a choice (empty unless echo + logprobs)."""
    return job.prompt_infos[choice_index // job.req.n] if job.prompt_infos else []


def _chat_logprobs(infos) -> dict:
    entry = lambda b, v: {"token": _text(b), "logprob": v, "bytes": list(b)}
    return {"content": [{**entry(i.bytes, i.logprob), "top_logprobs": [entry(b, v) for _, b, v in i.top]}
                        for i in infos]}


def _prompt_text(service: Service, req: GenRequest, choice_index: int) -> str:
    p = choice_index // req.n
    text = req.prompt_texts[p]
    return text if text is not None else service.ctx.tokenizer.decode(req.prompts[p])


def _full_response(service: Service, job: Job) -> dict:
    req = job.req
    choices = []
    for c in job.choices:
        if req.kind == "chat":
            message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
            if req.parse_tools:  # the model's <tool_call> blocks -> OpenAI tool_calls
                message["content"], calls = T.split_calls(c.text)
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": c.index, "message": message,
                            "logprobs": _chat_logprobs(c.infos) if req.logprobs is not None else None,
                            "finish_reason": finish})
        else:
            echo = _prompt_text(service, req, c.index) if req.echo else ""
            lp = None
            if req.logprobs is not None:  # the echoed prompt's tokens (offsets from 0), then the new
                head, lp = _completion_logprobs(_prompt_infos(job, c.index), 0), _completion_logprobs(c.infos, len(echo))
                lp = {k: head[k] + lp[k] for k in lp}
            choices.append({"index": c.index, "text": echo + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason})
    kind = "chat.completion" if req.kind == "chat" else "text_completion"
    return {"id": _id(job), "object": kind, "created": job.created, "model": req.model,
            "system_fingerprint": None, "choices": choices, "usage": _usage(job)}


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.req.kind == "chat" else "cmpl-") + job.id


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(service: Service, job: Job):
    """The job's server-sent events; a client that goes away cancels it (finally)."""
    req = job.req
    chat = req.kind == "chat"
    head = {"id": _id(job), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": req.model, "system_fingerprint": None}
    usage = {"usage": None} if req.include_usage else {}

    def chunk(index, text, infos, finish, first=False):
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
            lp = _chat_logprobs(infos) if req.logprobs is not None and infos else None
            c = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            lp = (_completion_logprobs(infos, offsets[index]) if req.logprobs is not None and infos
                  else None)
            c = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "choices": [c], **usage})

    def tool_chunks(index, text, infos, finish):
        """(tools) the choice's text through its ToolCallParser: content and tool_calls deltas."""
        parser = parsers.setdefault(index, T.ToolCallParser())
        out = []
        for kind, v in parser.feed(text) + (parser.finish() if finish else []):
            if kind == "content":
                out.append(chunk(index, v, infos, None))
                infos = []
            else:
                call = {"index": parser.calls.index(v), **v}
                out.append(_sse({**head, "choices": [{"index": index, "delta": {"tool_calls": [call]},
                                                      "logprobs": None, "finish_reason": None}], **usage}))
        if infos:
            out.append(chunk(index, "", infos, None))
        if finish:
            reason = "tool_calls" if parser.calls and finish == "stop" else finish
            out.append(_sse({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                  "finish_reason": reason}], **usage}))
        return out

    offsets, parsers = {}, {}
    try:
        if job.scores_prompts:  # the echo chunk carries the prompt's logprobs
            await job.scored.wait()
        for c in job.choices:
            if chat:
                yield chunk(c.index, "", [], None, first=True)
            elif req.echo:
                echo = _prompt_text(service, req, c.index)
                offsets[c.index] = 0
                first = chunk(c.index, echo, _prompt_infos(job, c.index), None)
                offsets[c.index] = len(echo)
                yield first
            offsets.setdefault(c.index, 0)
        left = len(job.choices)
        while left:
            events = await job.queue.get()
            if job.error is not None:
                yield _sse(job.error.body())
                break
            for index, text, infos, finish in events:
                if chat and req.parse_tools:
                    for c in tool_chunks(index, text, infos, finish):
                        yield c
                elif text or infos or finish:
                    yield chunk(index, text, infos, finish)
                if finish:
                    left -= 1
        else:
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            service.scheduler.cancel(job)


# ---- the app -----------------------------------------------------------------------------------
def page_html() -> str:
    return (resources.files("jaxgpt.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(service: Service, allowed_hosts=()) -> FastAPI:
    """The FastAPI app serving `service` (its scheduler is stopped on shutdown). Requests must
    name a local host, an IP address or one of `allowed_hosts` (hosts.py; "*": any)."""
    pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="jaxgpt-parse")

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.scheduler.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="jaxgpt", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(HostFilter, allowed=HostAllowList(allowed_hosts))
    page = page_html()
    metrics = service.metrics

    async def off_loop(fn, *args):
        """fn(*args) in a parse worker thread (JSON decoding, chat templates, tokenization:
        work that grows with the body must not stall the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        if e.status < 500:
            metrics.inc("bad_requests_total")
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        metrics.inc("bad_requests_total")
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return _error(APIError(msg, None, status=e.status_code,
                               code={404: "not_found", 405: "method_not_allowed"}.get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        metrics.inc("bad_requests_total")
        return _error(APIError(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        print(f"jaxgpt.serve: internal error on {request.url.path}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return _error(APIError("internal server error", None, status=500, type="server_error"))

    def check_key(request: Request) -> None:
        if service.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise APIError("missing API key: send the header 'Authorization: Bearer KEY'", None,
                           status=401, code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), service.api_key.encode()):
            raise APIError("incorrect API key", None, status=401, code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(f"the Content-Type must be application/json, got {ctype or 'none'}", None,
                           status=415, code="unsupported_media_type")
        limit = service.max_body
        length = request.headers.get("content-length", "")
        too_big = APIError(f"the request body is larger than {limit} bytes", None, status=413,
                           code="request_too_large")
        if length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_big
        return bytes(data)

    async def parsed(request: Request, parse):
        """parse(the body as JSON, the context), off the event loop."""
        raw = await read_body(request)
        return await off_loop(lambda: parse(parse_json(raw), service.ctx))

    async def generate(request: Request, parse, full=_full_response, stream=_stream) -> Response:
        """parse the body into a request, run it, answer: full(service, job) as JSON, or the
        server-sent events of stream(service, job)."""
        check_key(request)
        req = await parsed(request, parse)
        job = service.scheduler.submit(req, asyncio.get_running_loop())
        # (chat with truncate_prompt_tokens: how many of the oldest messages the model did not see)
        dropped = {DROPPED_HEADER: str(req.dropped_messages)} if req.dropped_messages else {}
        if req.stream:
            return StreamingResponse(stream(service, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **dropped})
        try:
            while not job.done.is_set():
                try:
                    await asyncio.wait_for(job.done.wait(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        service.scheduler.cancel(job)
                        return Response(status_code=499)
        finally:
            if not job.finished:
                service.scheduler.cancel(job)
        if job.error is not None:
            raise job.error
        return JSONResponse(full(service, job), headers=dropped)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)

    @app.post("/v1/responses")  # (the Responses API: serve/responses.py, on the chat machinery)
    async def responses(request: Request):
        return await generate(request, R.parse_responses,
                              full=lambda s, job: R.from_chat(_full_response(s, job), job.req.responses),
                              stream=lambda s, job: R.events(_stream(s, job), job.req.responses))

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": service.models}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        for m in service.models:
            if m["id"] == model_id:
                return m
        raise APIError(f"the model '{model_id}' does not exist", "model", status=404,
                       code="model_not_found")

    # vLLM's tokenizer routes, as lm_eval's RemoteTokenizer calls them (no API key, as vLLM)
    @app.post("/tokenize")
    async def tokenize(request: Request):
        ids, _ = await parsed(request, parse_tokenize)
        return {"count": len(ids), "max_model_len": service.ctx.context, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ids = await parsed(request, parse_detokenize)
        return {"prompt": await off_loop(service.ctx.tokenizer.decode, ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok, ctx = service.ctx.tokenizer, service.ctx
        if tok is None:
            raise APIError("this model has no tokenizer", None, status=404, code="not_found")
        text = lambda i: None if i is None else tok.decode([i])
        bos = getattr(tok, "bos_token", None)
        return {"tokenizer_class": f"jaxgpt.{getattr(tok, 'name', type(tok).__name__)}",
                "eos_token": text(ctx.eot), "eos_token_id": ctx.eot, "bos_token": text(bos),
                "bos_token_id": bos, "pad_token": None,
                "add_bos_token": adds_bos(tok),
                "model_max_length": ctx.context, "vocab_size": ctx.vocab_size,
                "chat_template": getattr(tok, "chat_template", None)}

    schema = openapi_schema(service.ctx, service.max_body)

    @app.get("/openapi.json")
    async def openapi():
        return schema

    @app.get("/props")
    async def props():  # (as llama.cpp's server: what a request that sets nothing gets)
        d = service.ctx.defaults
        return {"model": service.ctx.base_name, "n_ctx": service.ctx.context,
                "default_generation_settings": {k: getattr(d, k) for k in ("temperature", "top_p", "top_k", "max_tokens")},
                "source": d.source, "total_slots": service.scheduler.engine.slots,
                "compiling": service.warming is not None and service.warming.is_alive()}

    @app.get("/health")
    async def health():
        s = service.scheduler
        return {"status": "ok", "slots": s.engine.slots, "running": int(metrics.value("requests_running")),
                "waiting": int(metrics.value("requests_waiting")), "models": list(service.ctx.models)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    return app
