"""Structured outputs and tool calls through jaxgpt.serve, with the clients apps use: openai-python
(response_format json_schema, `parse` with a pydantic model, tools streamed and not), LangChain's
ChatOpenAI (bind_tools, with_structured_output by json_schema and by function_calling) and
LiteLLM (tool calls). The served model is a tiny random GPT-2-shaped model with GPT-2's
vocabulary: it writes noise, so every valid JSON answer and every well-formed call is the
grammar's doing, checked with jsonschema. All slow (a server, compiles on demand)."""

import json

import pytest

pytestmark = pytest.mark.slow

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("xgrammar")
pytest.importorskip("uvicorn")
pydantic = pytest.importorskip("pydantic")

from jaxgpt.formats.load import LoadedModel  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.serve.app import build_service, create_app  # noqa: E402
from jaxgpt.tokenizers.tokenizer import GPT2Tokenizer  # noqa: E402
from test_serve import Server, sse  # noqa: E402

NAME = "tiny"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small numbers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, vocab_size=50257)
    LoadedModel(GPT(cfg, seed=0), GPT2Tokenizer(), {"source": "tiny"}).save(root / "m")
    service = build_service(str(root / "m"), max_batch=4, name=NAME, warmup=False, log=lambda s: None)
    server = Server(create_app(service))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    yield server, client
    server.close()
    service.scheduler.stop()


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        name = c.function.name if hasattr(c, "function") else c["name"]
        args = json.loads(c.function.arguments) if hasattr(c, "function") else c["args"]
        assert names is None or name in names
        jsonschema.validate(args, TOOLS[name])


def test_openai_response_format_json_schema_and_parse(srv):
    _, client = srv
    schema = Person.model_json_schema()
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert r.choices[0].finish_reason == "stop"
    parsed = client.chat.completions.parse(model=NAME, messages=[{"role": "user", "content": "A person"}],
                                           response_format=Person, max_tokens=60, temperature=0.7, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "JSON"}], max_tokens=60,
                                       response_format={"type": "json_object"}, temperature=0,
                                       logit_bias={"1": 8, "92": 8})  # '"' and '}': the key closes soon
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_tools_not_streamed_and_streamed(srv):
    server, client = srv
    msgs = [{"role": "user", "content": "Weather in Paris, and 2 + 3?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, ADD],
                                       tool_choice="required", max_tokens=120, seed=1, temperature=0.8,
                                       top_p=1.0)  # (not the server's default top-p: with it this seed's
    ch = r.choices[0]                              # draw starts a second call it cannot end in 120 tokens)
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    check_calls(ch.message.tool_calls)
    assert all(c.id.startswith("call_") and c.type == "function" for c in ch.message.tool_calls)
    # streamed, a named function: the deltas add up to one call of that function
    stream = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER, ADD], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "add"}},
                                            max_tokens=80, parallel_tool_calls=False)
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"name": "", "arguments": ""})
                acc["name"] += d.function.name or ""
                acc["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["add"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), TOOLS["add"])
    # auto: the noise model answers in text; the history's calls and results are accepted
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER, ADD], max_tokens=8,
                                       temperature=0, frequency_penalty=0.5, presence_penalty=0.2, user="u1",
                                       metadata={"a": "b"}, store=False)  # (fields a client sends by habit)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": NAME, "messages": msgs, "tools": [ADD], "tool_choice": "required", "stream": True,
            "max_tokens": 80, "parallel_tool_calls": False}, timeout=300) as resp:  # (parallel: the
        events = sse(resp)  # noise model may keep adding calls until max_tokens: finish "length")
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert any("tool_calls" in d for d in deltas) and events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_langchain_bind_tools_and_structured_output(srv):
    lc = pytest.importorskip("langchain_openai")
    server, _ = srv
    chat = lc.ChatOpenAI(model=NAME, base_url=server.url + "/v1", api_key="unused", max_tokens=120,
                         temperature=0.7, max_retries=0, timeout=300)
    msg = chat.bind_tools([WEATHER, ADD], tool_choice="any").invoke("What is the weather in Rome?")
    check_calls(msg.tool_calls)
    msg = chat.bind_tools([WEATHER, ADD]).invoke("Hi")  # auto: answered (text from the noise model)
    assert isinstance(msg.content, str)
    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(person, Person), method


def test_litellm_tool_calls(srv):
    litellm = pytest.importorskip("litellm")
    server, _ = srv
    r = litellm.completion(model=f"openai/{NAME}", api_base=server.url + "/v1", api_key="unused",
                           messages=[{"role": "user", "content": "Add 2 and 2."}], tools=[WEATHER, ADD],
                           tool_choice="required", max_tokens=120, timeout=300, temperature=0,
                           parallel_tool_calls=False)  # (sampled with parallel calls, the noise model
    assert r.choices[0].finish_reason == "tool_calls"          # could keep adding calls to max_tokens)
    check_calls(r.choices[0].message.tool_calls)


def test_refusals_name_the_field(srv):
    server, _ = srv
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "response_format"),
             ({"tools": [{"type": "retrieval"}]}, "tools"),
             ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "zzz"}}}, "tool_choice"),
             ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty")]
    for extra, param in cases:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_sample_cli_json_schema(tmp_path):
    from conftest import run_cli
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=50257)
    LoadedModel(GPT(cfg, seed=0), GPT2Tokenizer(), {"source": "tiny"}).save(tmp_path / "m")
    schema = Person.model_json_schema()
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = run_cli("jaxgpt.sample", str(tmp_path / "m"), "--prompt", "A person:", "--json-schema",
                str(tmp_path / "s.json"), "--max-new-tokens", "60", "--num-samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    for s in json.loads(r.stdout)["samples"]:
        jsonschema.validate(json.loads(s["text"][len("A person:"):]), schema)
    (tmp_path / "bad.json").write_text("{not json")
    r = run_cli("jaxgpt.sample", str(tmp_path / "m"), "--json-schema", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and r.stderr.startswith("error: --json-schema") and "Traceback" not in r.stderr


def test_responses_api_with_the_openai_client(srv):
    """POST /v1/responses (issue 28): openai-python's `responses.create`, streamed and not. The
    text equals the chat route's greedy answer to the same messages; a json_schema format
    validates; a required function call is a function_call item whose arguments validate, and
    its output sent back as a function_call_output item is accepted; the streamed events add up
    to the unstreamed Response; previous_response_id is refused as one 400."""
    server, client = srv
    r = client.responses.create(model=NAME, instructions="Be brief.", input="Name a color.",
                                temperature=0, max_output_tokens=12)
    chat = client.chat.completions.create(model=NAME, temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.object == "response" and r.id.startswith("resp_")
    assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    # streamed: the deltas are the text, the last event carries the same Response
    kinds, deltas = [], []
    for e in client.responses.create(model=NAME, instructions="Be brief.", input="Name a color.",
                                     temperature=0, max_output_tokens=12, stream=True):
        kinds.append(e.type)
        if e.type == "response.output_text.delta":
            deltas.append(e.delta)
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(deltas) == r.output_text and e.response.output_text == r.output_text
    # structured output through text.format
    schema = Person.model_json_schema()
    r = client.responses.create(model=NAME, input="Invent a person.", max_output_tokens=60, temperature=0.7,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    # a required function call, streamed and not, then its output sent back
    flat = [{"type": "function", **t["function"]} for t in (WEATHER, ADD)]
    r = client.responses.create(model=NAME, input="Weather in Paris?", tools=flat, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=120, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[calls[0].name])
    streamed = [e for e in client.responses.create(
        model=NAME, input="Weather in Paris?", tools=flat, tool_choice="required", parallel_tool_calls=False,
        max_output_tokens=120, temperature=0, stream=True)]
    done = [e.item for e in streamed if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [(calls[0].name, calls[0].arguments)]
    follow = client.responses.create(model=NAME, tools=flat, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert follow.status in ("completed", "incomplete")
    bad = httpx.post(server.url + "/v1/responses", json={"model": NAME, "input": "x", "previous_response_id": "resp_1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "previous_response_id"
