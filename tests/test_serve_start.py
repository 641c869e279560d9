"""Issue 28 (3-5): the server's sampling defaults (flags > the model's generation_config.json /
GGUF general.sampling > built-in), prompts truncated on request (vLLM's truncate_prompt_tokens:
completions keep their last tokens, chats lose their oldest turns), the blockwise attention over
a whole-context cache (equal to the full forward, grouped-query too), the engine compiling in
the background while it serves, and (slow) a server that is ready and answers at its full context."""

import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.tokenizers import templates  # noqa: E402
from jaxgpt.config import ConfigError, GPTConfig  # noqa: E402
from jaxgpt.decode.engine import Engine, Request, _engine_insert, _engine_prefill, _engine_step  # noqa: E402
from jaxgpt.model.gpt import BLOCKWISE_FROM, GPT, init_cache  # noqa: E402
from jaxgpt.serve.defaults import BUILTIN, model_defaults, resolve  # noqa: E402
from jaxgpt.serve.schemas import APIError, Context, parse_chat, parse_completion  # noqa: E402

from conftest import REPO, xla_compiles  # noqa: E402


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random GPT-2 folder (GPT-2's tokenizer, context 128) and jaxgpt.load of it."""
    root = tmp_path_factory.mktemp("start")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval().save_pretrained(root / "hf")
    return root / "hf", jaxgpt.load(root / "hf")


def ctx_for(lm, defaults=None, context=128, template="chatml"):
    tok = lm.tokenizer
    return Context({"m": 0}, "m", context, lm.config.vocab_size, tok, {"m": template}, tok.eot_token,
                   **({"defaults": defaults} if defaults is not None else {}))


# ---- (3) defaults --------------------------------------------------------------------------------
def test_defaults_come_from_flags_then_the_model_then_builtin(hf, tmp_path):
    folder, lm = hf
    assert model_defaults(str(folder)) == ({}, None)  # save_pretrained's config has no sampling
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "temperature": 0.6, "top_p": 0.95, "top_k": 50, "max_new_tokens": 300}))
    model, where = model_defaults(str(tmp_path / "m"))
    assert model == {"temperature": 0.6, "top_p": 0.95, "top_k": 50, "max_tokens": 300}
    d = resolve({"temperature": 0.0, "top_p": None, "top_k": None, "max_tokens": None}, model, where)
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (0.0, 0.95, 50, 300)
    assert d.source["temperature"] == "flag" and d.source["top_p"].endswith("generation_config.json")
    d = resolve({}, {}, None)
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == tuple(BUILTIN[k] for k in ("temperature", "top_p", "top_k", "max_tokens"))
    assert set(d.source.values()) == {"built-in"}
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": 1.5}, {"max_tokens": -3}):
        with pytest.raises(ConfigError):
            resolve(bad, {}, None)
    (tmp_path / "m" / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        model_defaults(str(tmp_path / "m"))


def test_gguf_sampling_keys_are_the_models_defaults(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_float32("general.sampling.temp", 0.4)
    w.add_int32("general.sampling.top_k", 30)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model, where = model_defaults(str(tmp_path / "x.gguf"))
    assert model == {"temperature": pytest.approx(0.4), "top_k": 30} and "general.sampling" in where


def test_requests_get_the_defaults_for_what_they_leave_out(hf):
    _, lm = hf
    d = resolve({"top_k": 7, "max_tokens": 20}, {"temperature": 0.3}, "m")
    ctx = ctx_for(lm, d)
    msgs = [{"role": "user", "content": "Hi"}]
    req = parse_chat({"messages": msgs}, ctx)
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (0.3, BUILTIN["top_p"], 7, [20])
    req = parse_chat({"messages": msgs, "temperature": 1.0, "top_p": 1, "top_k": 0, "max_tokens": 5}, ctx)
    assert (req.temperature, req.top_p, req.top_k, req.max_tokens) == (1.0, None, None, 5)
    # completions: OpenAI's 16 unless the server (flag or model) says otherwise
    assert parse_completion({"prompt": "a"}, ctx).max_tokens == [20]
    assert parse_completion({"prompt": "a"}, ctx_for(lm, resolve({}, {}, None))).max_tokens == [16]


# ---- (5) truncation ----------------------------------------------------------------------------
def test_completions_truncate_to_the_last_tokens(hf):
    _, lm = hf
    ctx = ctx_for(lm, resolve({}, {}, None), context=64)
    ids = list(range(100, 190))  # 90 tokens, more than the context
    with pytest.raises(APIError) as e:
        parse_completion({"prompt": ids, "max_tokens": 4}, ctx)
    assert e.value.body()["error"]["code"] == "context_length_exceeded"
    assert parse_completion({"prompt": ids, "max_tokens": 4, "truncate_prompt_tokens": 10}, ctx).prompts == [ids[-10:]]
    req = parse_completion({"prompt": ids, "max_tokens": 4, "truncate_prompt_tokens": -1, "echo": True}, ctx)
    assert req.prompts == [ids[-60:]]  # the context less max_tokens
    text = "word " * 80
    req = parse_completion({"prompt": text, "max_tokens": 4, "truncate_prompt_tokens": 20}, ctx)
    assert req.prompts == [lm.tokenizer.encode(text)[-20:]] and req.prompt_texts == [None]
    for bad in (0, -2, 65, "x"):
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": ids, "truncate_prompt_tokens": bad}, ctx)
        assert e.value.param == "truncate_prompt_tokens"


def test_chat_truncation_drops_the_oldest_turns(hf):
    _, lm = hf
    ctx = ctx_for(lm, resolve({}, {}, None), context=128)
    sys_msg = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i}: " + "tell me more " * 4},
                  {"role": "assistant", "content": f"Answer {i}: " + "fine " * 6}]
    msgs = [sys_msg] + turns + [{"role": "user", "content": "And now?"}]
    with pytest.raises(APIError) as e:  # as OpenAI: refused unless asked to truncate
        parse_chat({"messages": msgs, "max_tokens": 16}, ctx)
    assert e.value.body()["error"]["code"] == "context_length_exceeded"
    req = parse_chat({"messages": msgs, "max_tokens": 16, "truncate_prompt_tokens": -1}, ctx)
    n = req.dropped_messages
    assert n > 0 and n % 2 == 0  # whole turns (a question and its answer)
    kept = [sys_msg] + turns[n:] + msgs[-1:]
    want = templates.prompt_ids(lm.tokenizer, "chatml", kept)
    assert req.prompts == [want] and len(want) <= 128 - 16
    # one more turn would not have fitted
    assert len(templates.prompt_ids(lm.tokenizer, "chatml", [sys_msg] + turns[n - 2:] + msgs[-1:])) > 128 - 16
    # a fitting conversation is left as it is
    short = [sys_msg, turns[0], turns[1], msgs[-1]]
    req = parse_chat({"messages": short, "truncate_prompt_tokens": -1, "max_tokens": 16}, ctx)
    assert req.dropped_messages == 0 and req.prompts == [templates.prompt_ids(lm.tokenizer, "chatml", short)]
    # the system message and the newest turn alone too long: refused
    with pytest.raises(APIError) as e:
        parse_chat({"messages": [sys_msg, {"role": "user", "content": "x " * 200}], "truncate_prompt_tokens": -1}, ctx)
    assert e.value.body()["error"]["code"] == "context_length_exceeded"


# ---- (4) a whole-context cache, compiled in the background ------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_blockwise_attention_equals_the_full_forward(kv_heads):
    """A cache of BLOCKWISE_FROM+ positions is attended in blocks only as far as it is filled:
    the logits equal the uncached forward's, for a prefill, a step, rows at different positions."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=kv_heads, n_embd=32, block_size=BLOCKWISE_FROM + 100,
                    vocab_size=97, position="rope" if kv_heads < 4 else "learned")
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 700), 0, 97)
    ref = np.asarray(model(ids)[0])
    cache = init_cache(cfg, 2, cfg.block_size)
    out, cache = model(ids[:, :600], cache=cache)  # (a cache of 1124: the last block shifted back)
    step, _ = model(ids[:, 600:601], cache=cache)
    np.testing.assert_allclose(np.asarray(out), ref[:, :600], atol=2e-5)
    np.testing.assert_allclose(np.asarray(step[:, 0]), ref[:, 600], atol=2e-5)
    rows = {**cache, "index": jax.numpy.array([299, 600])}  # row 0 back at 299: sees 0..299 only
    step, _ = model(jax.numpy.stack([ids[0, 299:300], ids[1, 600:601]]), cache=rows)
    np.testing.assert_allclose(np.asarray(step[:, 0]), ref[[0, 1], [299, 600]], atol=2e-5)


@pytest.mark.slow
def test_long_prompt_goes_in_chunks_while_its_program_compiles():
    """While the background warm-up has not compiled a long prompt's prefill, the prompt goes
    into the cache ENGINE_CHUNK tokens per step through the one chunk program (compiled with the
    step), the running row keeps decoding between chunks, and every row's tokens (greedy, and
    a seeded sampled one) equal those of an engine with every program compiled. A prompt with a
    logit bias (or a grammar) goes in chunks through its own chunk program, which warm-up
    compiles with the biased step: nothing compiles while they serve."""
    from collections import deque
    from jaxgpt.decode.engine import ENGINE_CHUNK
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=BLOCKWISE_FROM + 2 * ENGINE_CHUNK,
                    vocab_size=97, position="rope")
    model = GPT(cfg)
    rng = np.random.RandomState(0)
    long = [rng.randint(0, 97, 300).tolist(), rng.randint(0, 97, 2 * ENGINE_CHUNK).tolist()]
    def reqs():
        return [Request(long[0], 6, temperature=0.0), Request([5, 6, 7], 12, temperature=0.0),
                Request(long[1], 6, temperature=0.9, top_k=20, seed=3),
                Request([9, 8, 7, 6], 5, temperature=0.0, logit_bias={11: 4.0}, presence_penalty=0.5)]
    def run(engine):
        rs, seen = reqs(), []
        engine.add(rs[1])
        engine.step()
        engine.add(rs[3]), engine.add(rs[0]), engine.add(rs[2])
        while engine.busy:
            engine.step()
            seen.append((len(rs[0].tokens), len(rs[1].tokens)))
        return [r.tokens for r in rs], seen
    want, _ = run(Engine(model, slots=4))
    engine = Engine(model, slots=4)
    assert engine.capacities == [cfg.block_size] and ("chunk", cfg.block_size) in engine.shapes()
    first = [k for k in engine.shapes() if k[0] in ("step", "chunk") or (1, 16) in (k[1:], k[2:])]
    engine.warmup(shapes=first)
    engine._background = deque(k for k in engine.shapes() if k not in engine.compiled)  # (none compiles)
    with xla_compiles() as compiles:
        got, seen = run(engine)
    assert got == want and compiles == []
    # the biased prompt's one chunk, then the 300-token prompt's: its first token after its last
    # chunk; the short row decoded all the while
    n = 1 + -(-300 // ENGINE_CHUNK)
    assert [b for _, b in seen[:n]] == list(range(2, 2 + n)) and [a for a, _ in seen[n - 2:n]] == [0, 1]


@pytest.mark.slow
def test_prompts_go_through_the_step_until_the_chunk_program_is_compiled():
    """With only the decode step compiled (the server's warm-up) and the rest still compiling in
    the background, a prompt goes into its row's cache a token per step through the step itself
    (a biased one through its biased step), the running row decoding all the while, nothing
    compiles, and every row's tokens equal an engine compiled up front; once the chunk program
    is compiled, the rest of a long prompt goes in chunks (the last one ending within the cache)."""
    from collections import deque
    from jaxgpt.decode.engine import ENGINE_CHUNK
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=BLOCKWISE_FROM + 2 * ENGINE_CHUNK,
                    vocab_size=97, position="rope")
    model = GPT(cfg)
    rng = np.random.RandomState(1)
    long = rng.randint(0, 97, cfg.block_size - 10).tolist()  # (its last chunk would end past the cache)
    def reqs():
        return [Request([5, 6, 7], 30, temperature=0.0), Request(rng_prompt, 6, temperature=0.9, top_k=20, seed=3),
                Request([9, 8, 7, 6], 5, temperature=0.0, logit_bias={11: 4.0}, presence_penalty=0.5),
                Request(long, 4, temperature=0.0)]
    rng_prompt = rng.randint(0, 97, 21).tolist()
    want = reqs()
    ref = Engine(model, slots=4)
    for r in want:
        ref.add(r)
    ref.run()
    engine = Engine(model, slots=4)
    S = cfg.block_size
    engine.warmup(shapes=[("step", S), ("step", S, "bias")])
    engine._background = deque(k for k in engine.shapes() if k not in engine.compiled)  # (none compiles)
    got, lens = reqs(), []
    engine.add(got[0])
    with xla_compiles() as compiles:
        engine.step()
        engine.add(got[1]), engine.add(got[2])
        while got[1].finish_reason is None or got[2].finish_reason is None:
            engine.step()
            lens.append([len(r.tokens) for r in got[:3]])
    assert compiles == [] and [r.tokens for r in got[1:3]] == [r.tokens for r in want[1:3]]
    # a token per step: the 3-token prompt's first token at the 3rd step (then one per step,
    # while the others feed), the 21-token one's after 21 steps, the 4-token one's after 4
    assert [n[0] for n in lens] == [0] + list(range(1, len(lens)))
    assert [n[1] for n in lens[:22]] == [0] * 20 + [1, 2] and [n[2] for n in lens[:5]] == [0, 0, 0, 1, 2]
    engine.add(got[3])
    for _ in range(3):  # three of the long prompt's tokens by the step, then the chunk program is there
        engine.step()
    assert engine._feeding == {engine.requests.index(got[3]): 3}
    engine.compile(("chunk", S))
    engine.step()
    assert list(engine._chunking.values()) == [4]
    engine.run()
    assert got[3].tokens == want[3].tokens and got[0].tokens == want[0].tokens
    # the cache the step and the chunks left holds the prompt where it belongs
    H = cfg.kv_heads
    rows = lambda e, r: np.asarray(e.cache["k"][1][r.slot * H:(r.slot + 1) * H, :len(long)])
    np.testing.assert_allclose(rows(engine, got[3]), rows(ref, want[3]), atol=1e-4)


@pytest.mark.slow
def test_whole_context_cache_only_within_its_memory_budget(monkeypatch):
    """A long-context engine keeps one whole-length cache (one compiled step) while it fits in
    ENGINE_FIXED_CACHE_BYTES; with more slots it grows from 16 positions instead of taking
    slots x context at once (48 slots of SmolLM2's 8,192 would be 18 GB); the tokens are equal."""
    from jaxgpt.decode import engine as engine_mod
    cfg = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=BLOCKWISE_FROM + 100,
                    vocab_size=97, position="rope")
    model = GPT(cfg)
    one_slot = engine_mod._cache_bytes(cfg, 1, cfg.block_size)
    assert one_slot == 2 * 2 * 2 * 8 * cfg.block_size * 4 + 4  # layers x (k, v) x kv heads x head dim x positions x f32, + index
    monkeypatch.setattr(engine_mod, "ENGINE_FIXED_CACHE_BYTES", 2 * one_slot)
    fixed, grown = Engine(model, slots=2), Engine(model, slots=3)
    assert fixed.capacities == [cfg.block_size] and not fixed.grow
    assert grown.grow and grown.capacities[0] == 16 and grown.capacities[-1] == cfg.block_size
    assert Engine(model, slots=3, grow=False).capacities == [cfg.block_size]
    outs = []
    for engine in (fixed, grown):
        reqs = [Request(list(range(3, 3 + n)), 5, temperature=0.0) for n in (4, 11)]
        for r in reqs:
            engine.add(r)
        engine.run()
        outs.append([r.tokens for r in reqs])
    assert outs[0] == outs[1] and grown.cache["k"][0].shape[1] == 16


@pytest.mark.slow
def test_engine_serves_while_it_compiles_in_the_background(hf):
    """Shapes compile in a thread; meanwhile a prefill uses a compiled one that fits (a longer
    padding, fewer prompts per call) and the tokens are those of an engine compiled up front;
    once the thread is done nothing compiles."""
    _, lm = hf
    ps = [list(range(5, 5 + n)) for n in (3, 20, 9, 12)]
    def run_all(engine, reqs):  # (more requests than slots: each joins when one is free)
        todo = list(reqs)
        while todo or engine.busy:
            while todo and engine.free_slots:
                engine.add(todo.pop(0))
            engine.step()

    want = Engine(lm.model, slots=2, max_len=32)
    reqs = [Request(p, 6, temperature=0.0) for p in ps]
    run_all(want, reqs)
    engine = Engine(lm.model, slots=2, max_len=32)
    shapes = engine.shapes(first=16)
    first = [k for k in shapes if k[0] in ("step", "grow") or (1, 16) in (k[1:], k[2:])]
    engine.warmup(shapes=first)
    thread = engine.warmup_in_background([k for k in shapes if k not in first])
    got = [Request(p, 6, temperature=0.0) for p in ps]
    run_all(engine, got)
    assert [r.tokens for r in got] == [r.tokens for r in reqs]
    thread.join(600)
    assert not thread.is_alive() and set(shapes) <= engine.compiled
    fns = (_engine_step, _engine_prefill, _engine_insert)
    sizes = [f._cache_size() for f in fns]
    with xla_compiles() as compiles:
        again = [Request(p, 6, temperature=0.0) for p in ps]
        run_all(engine, again)
    assert [r.tokens for r in again] == [r.tokens for r in reqs]
    assert compiles == [] and [f._cache_size() for f in fns] == sizes


# ---- (slow) the server: ready, and a request at the model's full context ------------------------
@pytest.mark.slow
def test_server_is_ready_and_answers_at_full_context(tmp_path):
    """`python -m jaxgpt.serve` on a tiny GPT-2 with a 2,048-token context (a whole-context cache,
    blockwise): /health answers, /props shows the defaults, and a 2,040-token prompt + 8 greedy
    tokens (the full context) are HF's greedy tokens."""
    import httpx

    from test_serve import free_port

    torch.manual_seed(3)
    L = 2048
    hfm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32,
                                                               n_positions=L)).eval()
    hfm.save_pretrained(tmp_path / "hf")
    port = free_port()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", str(tmp_path / "hf"), "--port", str(port),
                             "--max-batch", "2", "--temperature", "0.5"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 300, "not ready in 300 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        props = httpx.get(url + "/props").json()
        assert props["n_ctx"] == L and props["default_generation_settings"]["temperature"] == 0.5
        assert props["source"]["temperature"] == "flag"
        ids = torch.randint(0, 50257, (1, L - 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = hfm.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, L - 8:].tolist()
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "prompt": ids[0].tolist(), "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"] == {"prompt_tokens": L - 8, "completion_tokens": 8, "total_tokens": L}
        assert body["choices"][0]["text"] == jaxgpt.load(tmp_path / "hf").tokenizer.decode(want)
    finally:
        proc.terminate()
        proc.wait(30)
