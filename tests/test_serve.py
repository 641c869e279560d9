"""jaxgpt.serve against real clients: the `openai` package (completions and chat, streamed and
not, equal to jaxgpt.sample's greedy output), httpx for the raw SSE framing and every bad input
(4xx OpenAI-shaped, the server keeps serving), 16 concurrent streams with mixed lengths and
adapters each equal to its solo run, a dropped client freeing its slot within one step, 429 on a
full queue, logprobs, stop strings, n/seed, multi-LoRA vs merged adapters, int8, no
recompilation after warm-up, /metrics, the CLI's errors. One in-process server (uvicorn in a
thread) over a tiny random GPT-2 (GPT-2's vocabulary, context 64) and two LoRA adapters."""

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


import jaxgpt  # noqa: E402
from jaxgpt.tokenizers import templates  # noqa: E402
from jaxgpt.decode.sample import text_samples  # noqa: E402
from jaxgpt.serve.app import build_service, create_app  # noqa: E402

from conftest import REPO, cli, random_adapter, xla_compiles  # noqa: E402

pytestmark = pytest.mark.slow  # servers, processes or the real model: the slow tier

torch.set_num_threads(2)
CTX = 64
EOT = 50256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` in a thread on a free port."""

    def __init__(self, app, lifespan="auto"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=CTX)).eval()
    hf.save_pretrained(root / "hf")
    a = random_adapter(root / "hf", root / "ad_a", 4, ["c_attn", "mlp.c_proj"], 1)
    b = random_adapter(root / "hf", root / "ad_b", 2, ["c_fc", "attn.c_proj"], 2)
    t = time.perf_counter()
    service = build_service(str(root / "hf"), [("a", str(a)), ("b", str(b))], max_batch=8,
                            max_queue=16, log=lambda s: None)
    warm = time.perf_counter() - t
    server = Server(create_app(service))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield SimpleNamespace(url=server.url, service=service, client=client, root=root, warmup_s=warm,
                          lm=jaxgpt.load(root / "hf"), adapters={"a": a, "b": b})
    server.close()
    service.scheduler.stop()


def greedy(lm, prompt: str, n: int) -> str:
    """jaxgpt.sample's greedy continuation (cut at <|endoftext|>), as text."""
    s = text_samples(lm, prompt, n, temperature=0.0, raw=True, log=lambda s: None)[0]
    return lm.tokenizer.decode(s["tokens"][len(lm.tokenizer.encode(prompt)):])


def metric(url: str, name: str, **labels) -> float:
    """One value from /metrics (summed over label sets matching `labels`)."""
    total, found = 0.0, False
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("#") or not line.startswith(f"jaxgpt_{name}"):
            continue
        key, value = line.rsplit(" ", 1)
        base, _, lab = key.partition("{")
        if base != f"jaxgpt_{name}":
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total, found = total + float(value), True
    assert found, name
    return total


def sse(response) -> list:
    """The data payloads of an SSE response, checking the framing: every event is exactly one
    `data: ...` line followed by a blank line; JSON until the final [DONE]."""
    raw = b"".join(response.iter_bytes()).decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")
    assert events[-1] == ""
    out = []
    for ev in events[:-1]:
        assert ev.startswith("data: ") and "\n" not in ev, ev[:200]
        out.append(ev[6:])
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return [json.loads(d) for d in out[:-1]]


def wait_for(cond, timeout=20.0, what=""):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


PROMPT = "The meaning of life is"


# ---- (1) completions and chat through the engine ---------------------------------------------
def test_completions_equal_sample_greedy_streamed_or_not(srv):
    want = greedy(srv.lm, PROMPT, 20)
    r = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=20, temperature=0)
    c = r.choices[0]
    assert c.text == want and c.finish_reason == "length" and r.object == "text_completion"
    n_prompt = len(srv.lm.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)
    chunks = list(srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=20,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == n_prompt
    # echo; a token-id prompt; two prompts in one request
    r = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=20, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + want
    ids = srv.lm.tokenizer.encode(PROMPT)
    r = srv.client.completions.create(model="hf", prompt=ids, max_tokens=20, temperature=0)
    assert r.choices[0].text == want
    r = srv.client.completions.create(model="hf", prompt=[PROMPT, "Hi"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == want[:len(r.choices[0].text)] and r.choices[1].text == greedy(srv.lm, "Hi", 6)


def test_chat_equals_sample_greedy_of_the_template(srv):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    prompt = templates.render_prompt("alpaca", messages)
    want = greedy(srv.lm, prompt, 16)
    r = srv.client.chat.completions.create(model="hf", messages=messages, max_tokens=16, temperature=0)
    m = r.choices[0]
    assert m.message.role == "assistant" and m.message.content == want and r.object == "chat.completion"
    n_prompt = len(srv.lm.tokenizer.encode_ordinary(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 16)
    stream = srv.client.chat.completions.create(model="hf", messages=messages, max_tokens=16,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.total_tokens == n_prompt + 16
    # a multi-turn conversation renders all turns; no max_tokens: the rest of the context
    r = srv.client.chat.completions.create(model="hf", temperature=0, messages=messages + [
        {"role": "assistant", "content": want}, {"role": "user", "content": "Another."}])
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CTX and r.choices[0].finish_reason == "length"


def test_raw_sse_framing(srv):
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 7, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert all(e["object"] == "text_completion" and e["model"] == "a" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "n": 2, "seed": 1}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = sse(r)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    finishes = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events
                if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


# ---- (2) bad input: 4xx, OpenAI-shaped, the server keeps serving --------------------------------
MSG = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"
BAD = [  # (id, path, body (dict, or raw bytes), headers, status, param, in the message)
    ("non-JSON", C, b'{"prompt": "x",', None, 400, None, "not valid JSON"),
    ("JSON-not-object", C, b'[1, 2]', None, 400, None, "JSON object"),
    ("content-type", C, b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, None, "application/json"),
    ("no-content-type", C, b'{"prompt": "x"}', {"content-type": ""}, 415, None, "application/json"),
    ("missing-prompt", C, {"max_tokens": 3}, None, 400, "prompt", "required"),
    ("missing-messages", CH, {"max_tokens": 3}, None, 400, "messages", "required"),
    ("prompt-type", C, {"prompt": 5}, None, 400, "prompt", "must be a string"),
    ("prompt-empty-list", C, {"prompt": []}, None, 400, "prompt", "empty"),
    ("prompt-bad-token", C, {"prompt": [1, 99999]}, None, 400, "prompt", "outside the vocabulary"),
    ("messages-type", CH, {"messages": "hi"}, None, 400, "messages", "array"),
    ("message-type", CH, {"messages": ["hi"]}, None, 400, "messages[0]", "object"),
    ("content-type-field", CH, {"messages": [{"role": "user", "content": 3}]}, None, 400, "messages[0].content", "string"),
    ("unknown-role", CH, {"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages[0].role", "wizard"),
    ("empty-messages", CH, {"messages": []}, None, 400, "messages", "at least one"),
    ("max_tokens-type", C, {"prompt": "x", "max_tokens": "10"}, None, 400, "max_tokens", "integer"),
    ("temperature-type", C, {"prompt": "x", "temperature": "hot"}, None, 400, "temperature", "number"),
    ("stream-type", CH, {"messages": MSG, "stream": "yes"}, None, 400, "stream", "boolean"),
    ("n<1", C, {"prompt": "x", "n": 0}, None, 400, "n", ">= 1"),
    ("max_tokens<1", C, {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens", ">= 1"),
    ("max_tokens>context", CH, {"messages": MSG, "max_tokens": 1000}, None, 400, "max_tokens", "64"),
    ("prompt+max_tokens>context", C, {"prompt": "x " * 40, "max_tokens": 30}, None, 400, "max_tokens",
     "in the prompt"),
    ("temperature<0", C, {"prompt": "x", "temperature": -0.5}, None, 400, "temperature", ">= 0"),
    ("top_p=0", C, {"prompt": "x", "top_p": 0}, None, 400, "top_p", "(0, 1]"),
    ("top_p>1", CH, {"messages": MSG, "top_p": 1.5}, None, 400, "top_p", "(0, 1]"),
    ("top_k<0", C, {"prompt": "x", "top_k": -1}, None, 400, "top_k", ">= 0"),
    ("logprobs>20", C, {"prompt": "x", "logprobs": 21}, None, 400, "logprobs", "<= 20"),
    ("top_logprobs>20", CH, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, None, 400, "top_logprobs", "<= 20"),
    ("too-many-stops", C, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop", "at most 4"),
    ("stop-type", C, {"prompt": "x", "stop": 3}, None, 400, "stop", "string"),
    ("unknown-model", C, {"prompt": "x", "model": "gpt-5"}, None, 404, "model", "does not exist"),
    ("prompt>context", C, {"prompt": [7] * 100}, None, 400, "prompt", "has 100 tokens; this model's context is 64"),
    ("chat>context", CH, {"messages": [{"role": "user", "content": "word " * 80}]}, None, 400, "messages", "context is 64"),
    ("body-too-large", C, {"prompt": "x" * (1 << 21)}, None, 413, None, "larger than"),
    ("stream_options-without-stream", C, {"prompt": "x", "stream_options": {"include_usage": True}},
     None, 400, "stream_options", "stream"),
    ("unsupported", C, {"prompt": "x", "best_of": 3}, None, 400, "best_of", "not supported"),
    ("logit_bias-range", C, {"prompt": "x", "logit_bias": {"1": 500}}, None, 400, "logit_bias", "[-100, 100]"),
    ("seed-type", C, {"prompt": "x", "seed": "s"}, None, 400, "seed", "integer"),
]


@pytest.mark.parametrize("path,body,headers,status,param,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_openai_error(srv, path, body, headers, status, param, text):
    kw = {"content": body, "headers": {"content-type": "application/json", **(headers or {})}} \
        if isinstance(body, bytes) else {"json": body}
    if headers and headers.get("content-type") == "" and isinstance(body, bytes):
        kw["headers"] = {}
    r = httpx.post(srv.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and text in err["message"], err
    assert "Traceback" not in r.text
    ok = httpx.post(srv.url + C, json={"prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_routes_errors_models_health(srv):
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(srv.url + C)
    assert r.status_code == 405 and "error" in r.json()
    models = srv.client.models.list()
    assert [m.id for m in models.data] == ["hf", "a", "b"]
    assert srv.client.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="nope", prompt="x", max_tokens=1)
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 8 and h["models"] == ["hf", "a", "b"]


def test_api_key(srv):
    """With a key set, /v1/* wants 'Authorization: Bearer KEY' (401 otherwise); /health does not."""
    # the same scheduler behind a second app (lifespan off: its shutdown must not stop it)
    keyed = Server(create_app(dataclasses.replace(srv.service, api_key="sekrit")), lifespan="off")
    try:
        body = {"prompt": "x", "max_tokens": 2}
        for headers, status in (({}, 401), ({"authorization": "Bearer nope"}, 401),
                                ({"authorization": "sekrit"}, 401), ({"authorization": "Bearer sekrit"}, 200)):
            r = httpx.post(keyed.url + C, json=body, headers=headers, timeout=30)
            assert r.status_code == status, (headers, r.text)
            if status == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
        assert httpx.get(keyed.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="hf", prompt="x", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        keyed.close()


# ---- sampling options ---------------------------------------------------------------------------
def test_stop_strings_n_and_seed(srv):
    full = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[8:12]
    cut = full.index(stop)
    r = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    chunks = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=24, temperature=0,
                                           stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    # n choices with a seed: reproducible, different from each other; choice 0 is the seed's own
    # stream, the same as n=1
    kw = dict(model="hf", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7, extra_body={"top_k": 50})
    a = [c.text for c in srv.client.completions.create(n=3, **kw).choices]
    b = [c.text for c in srv.client.completions.create(n=3, **kw).choices]
    assert a == b and len(set(a)) == 3
    assert srv.client.completions.create(n=1, **kw).choices[0].text == a[0]
    assert srv.client.completions.create(n=1, **{**kw, "seed": 8}).choices[0].text != a[0]
    big = srv.client.completions.create(n=1, **{**kw, "seed": 2 ** 63 + 5}).choices[0].text
    assert big != srv.client.completions.create(n=1, **{**kw, "seed": 5}).choices[0].text


def test_logprobs(srv):
    """Each token's logprob is the model's log-softmax at that position (before temperature);
    the alternatives are the most likely tokens, best first."""
    lm = srv.lm
    r = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = lm.tokenizer.encode(PROMPT)
    new = lm.tokenizer.encode(r.choices[0].text)
    assert len(lp.tokens) == 5 and "".join(lp.tokens) == r.choices[0].text
    logits = lm.logits(ids + new)
    for i in range(5):
        ref = np.asarray(jax.nn.log_softmax(logits[len(ids) - 1 + i]))
        assert abs(lp.token_logprobs[i] - ref[new[i]]) < 1e-4
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(top) == 3 and abs(top[0] - np.sort(ref)[-1]) < 1e-4
        assert abs(lp.token_logprobs[i] - top[0]) < 1e-6  # greedy: the chosen one is the best
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    c = srv.client.chat.completions.create(model="b", messages=MSG, max_tokens=4, logprobs=True,
                                           top_logprobs=2, seed=3)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    assert srv.client.chat.completions.create(model="hf", messages=MSG, max_tokens=2).choices[0].logprobs is None


# ---- (3) continuous batching: concurrency, batch invariance, cancel, 429, metrics ----------------
def stream_text(url, path, body):
    """(text, finish reasons, saw [DONE]) of one streamed request read with httpx."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse(r)
    key = "text" if path == C else "delta"
    text = "".join((c[key] if key == "text" else c[key].get("content") or "") for e in events for c in e["choices"])
    return text, [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]], True


def test_sixteen_concurrent_streams_equal_their_solo_runs(srv):
    """16 streams at once over 8 slots (so rows join and leave the running batch), mixed prompt
    lengths, lengths, adapters, greedy and seeded sampling: each finishes once, with [DONE], and
    gets exactly what it gets alone."""
    specs = []
    for i in range(16):
        body = {"model": ["hf", "a", "b"][i % 3], "max_tokens": 4 + (i * 7) % 23,
                "temperature": 0.0 if i % 2 == 0 else 0.9, "seed": 100 + i}
        if i in (1, 3):  # (short: a batch with a top-p/top-k row sorts the vocabulary each step)
            body.update({"top_p": 0.9} if i == 1 else {"top_k": 30}, max_tokens=5)
        if i % 5 == 4:
            specs.append((CH, {**body, "messages": [{"role": "user", "content": f"Question {i}: " + "why " * i}]}))
        else:
            specs.append((C, {**body, "prompt": f"Request {i}:" + " word" * (2 * i)}))
    solo = [stream_text(srv.url, p, b) for p, b in specs]
    steps0 = metric(srv.url, "engine_steps_total")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda s: stream_text(srv.url, *s), specs))
    steps = metric(srv.url, "engine_steps_total") - steps0
    for i, ((text, fins, done), (want, _, _)) in enumerate(zip(together, solo)):
        assert len(fins) == 1 and done, (i, fins)
        assert text == want, (i, specs[i])
    tokens = sum(b["max_tokens"] for _, b in specs)
    assert steps < 0.5 * tokens, (steps, tokens)  # rows were batched, not run one by one
    assert metric(srv.url, "requests_running") == 0


def running_choice(service):
    (req,) = [r for r in service.scheduler.engine.requests if r is not None]
    return req, req.on_token.__self__


def test_dropped_client_frees_its_slot_within_one_step(srv):
    sched = srv.service.scheduler
    cancelled0 = metric(srv.url, "requests_cancelled_total")
    body = {"prompt": "Tell me a long story", "max_tokens": 55, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + C, json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
        assert len(got) == 3
        sched.pause()  # no step runs until resume: what happens next is exact
        req, choice = running_choice(srv.service)
        n = len(req.tokens)
        assert n < 55 and metric(srv.url, "requests_running") == 1
    try:  # the client is gone
        wait_for(lambda: choice.job.cancelled, what="the server to see the disconnect")
    finally:
        sched.resume()
    wait_for(lambda: metric(srv.url, "requests_running") == 0, what="the slot to be freed")
    assert len(req.tokens) == n  # not a single step more for it
    assert metric(srv.url, "requests_cancelled_total") == cancelled0 + 1
    assert metric(srv.url, "slots_free") == 8
    r = srv.client.completions.create(model="hf", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_full_queue_answers_429_with_retry_after(srv):
    sched = srv.service.scheduler
    old = sched.max_queue
    sched.max_queue = 1
    sched.pause()
    try:
        with ThreadPoolExecutor(9) as pool:
            futs = [pool.submit(httpx.post, srv.url + C, json={"prompt": f"q{i}", "max_tokens": 2}, timeout=60)
                    for i in range(9)]  # the 8 slots' worth + 1 waiting (the thread is paused)
            wait_for(lambda: metric(srv.url, "requests_waiting") == 9, what="9 waiting")
            r = httpx.post(srv.url + C, json={"prompt": "one too many", "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                srv.client.completions.create(model="hf", prompt="x", max_tokens=1)
            sched.resume()
            assert [f.result().status_code for f in futs] == [200] * 9
    finally:
        sched.max_queue = old
        sched.resume()
    assert metric(srv.url, "requests_rejected_total") >= 2


def test_metrics_are_prometheus_text(srv):
    text = httpx.get(srv.url + "/metrics").text
    assert httpx.get(srv.url + "/metrics").headers["content-type"].startswith("text/plain")
    for name, kind in (("requests_running", "gauge"), ("requests_waiting", "gauge"),
                       ("generation_tokens_total", "counter"),
                       ("time_to_first_token_seconds", "histogram"),
                       ("inter_token_latency_seconds", "histogram")):
        assert f"# TYPE jaxgpt_{name} {kind}" in text
    buckets = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("jaxgpt_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == metric(srv.url, "time_to_first_token_seconds_count") > 0
    assert metric(srv.url, "generation_tokens_total") > 0


def test_no_recompilation_after_warmup(srv):
    """Whatever the prompt lengths, n, adapters, logprobs, stop strings and seeds: nothing compiles
    (once the programs compiling in the background since start-up are done)."""
    if srv.service.warming is not None:
        srv.service.warming.join(600)
    with xla_compiles() as compiles:
        bodies = [{"prompt": [5] * n, "max_tokens": 3, "model": m, "n": k, "logprobs": lp, "seed": n,
                   "temperature": t, "stop": ["e"]}
                  for n, m, k, lp, t in ((1, "hf", 1, None, 0), (17, "a", 2, 5, 0.8), (33, "b", 3, 0, 1.0),
                                         (60, "hf", 1, 20, 0.5), (9, "a", 8, None, 0))]
        with ThreadPoolExecutor(5) as pool:
            rs = list(pool.map(lambda b: httpx.post(srv.url + C, json=b, timeout=60), bodies))
        assert all(r.status_code == 200 for r in rs)
        stream_text(srv.url, CH, {"messages": MSG, "max_tokens": 3, "model": "b", "logprobs": True})
    assert compiles == []


# ---- (5) multi-LoRA; int8 ---------------------------------------------------------------------
def test_adapters_equal_their_merged_models(srv):
    """A row with adapter k computes the base plus adapter k's update (gathered per row): its
    greedy text is that of the adapter merged into the base (jaxgpt.load of the adapter folder)."""
    texts = {}
    for name in ("a", "b"):
        merged = jaxgpt.load(srv.adapters[name])
        want = greedy(merged, PROMPT, 16)
        texts[name] = srv.client.completions.create(model=name, prompt=PROMPT, max_tokens=16,
                                                    temperature=0).choices[0].text
        assert texts[name] == want, name
    assert len({texts["a"], texts["b"], greedy(srv.lm, PROMPT, 16)}) == 3  # the adapters matter


def test_int8_base(srv):
    from fastapi.testclient import TestClient

    service = build_service(str(srv.root / "hf"), int8=True, max_batch=2, warmup=False, log=lambda s: None)
    try:
        client = TestClient(create_app(service), base_url="http://localhost")  # (an allowed Host)
        r = client.post(C, json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy(srv.lm.quantize(), PROMPT, 10)
    finally:
        service.scheduler.stop()


# ---- the command line ---------------------------------------------------------------------------
def test_cli_serves_an_adapter_with_a_key_file_and_stops_on_sigint(srv, tmp_path):
    key = tmp_path / "key"
    key.write_text("k1\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", str(srv.root / "hf"), "--port", str(port),
                             "--max-batch", "1", "--api-key-file", str(key), "--adapter", f"a={srv.adapters['a']}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120, "python -m jaxgpt.serve to listen")
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["hf", "a"]
        got = client.completions.create(model="a", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        assert got == srv.client.completions.create(model="a", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "serving hf, a at" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors_exit_2(tmp_path):
    r = cli("jaxgpt.serve", tmp_path / "missing", "--port", "1")  # (in this process: conftest.cli)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    r = cli("jaxgpt.serve", tmp_path, "--adapter", "noequals")
    assert r.returncode == 2 and "NAME=PATH" in r.stderr, r.stderr
    r = cli("jaxgpt.serve", "--help")
    assert r.returncode == 0 and "--max-batch" in r.stdout and "--api-key-file" in r.stdout
