"""The decode engine: slots vs transformers' greedy generate, batched == per-row, per-row random
streams, per-row settings, streaming and slot bookkeeping, chat through it, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from conftest import random_adapter, xla_compiles  # noqa: E402
from jaxgpt.tokenizers import templates  # noqa: E402
from jaxgpt.decode.chat import ChatSession  # noqa: E402
from jaxgpt.config import ConfigError  # noqa: E402
from jaxgpt.decode.sampling import sample_rows, top_k_filter, top_p_filter  # noqa: E402
from jaxgpt.decode.engine import Engine, Request  # noqa: E402

torch.set_num_threads(2)
EOT = 50256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, jaxgpt.load of its saved folder): 2 layers, context 64, GPT-2's vocabulary."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()
    model.save_pretrained(root / "hf")
    return model, jaxgpt.load(root / "hf")


def hf_greedy(model, prompt, n):
    """HF's greedy continuation of one prompt: n new ids."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=EOT,
                             attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 50257, n).tolist() for n in lengths]


def run_schedule(engine, schedule):
    """Add each request at its step ({step: [request]}), step until all are done; the events."""
    events, step = [], 0
    while step <= max(schedule) or engine.busy:
        for r in schedule.get(step, []):
            engine.add(r)
        events.append(engine.step())
        step += 1
    return events


@pytest.mark.slow
def test_greedy_rows_started_at_different_steps_equal_transformers(tiny):
    """Rows with different prompt lengths, entering at different steps (some while others are
    mid-sequence, one into a slot freed by a finished row), each get HF's greedy tokens; so does
    a row alone in a one-slot engine (on a CPU: the decode copy with the int8 head screen)."""
    hf, lm = tiny
    ps = prompts(0, (5, 19, 3, 40, 11))
    news = (12, 6, 20, 9, 8)
    reqs = [Request(p, n, temperature=0.0) for p, n in zip(ps, news)]
    engine = Engine(lm.model, slots=3)
    # 0 and 1 together; 2 at step 2; 3 and 4 wait for free slots (1 ends after step 5)
    schedule = {0: reqs[:2], 2: [reqs[2]], 7: [reqs[3]], 13: [reqs[4]]}
    run_schedule(engine, schedule)
    for r, p, n in zip(reqs, ps, news):
        assert r.finish_reason == "length" and r.tokens == hf_greedy(hf, p, n)
    assert reqs[3].slot == 1 and not engine.busy and engine.free_slots == [0, 1, 2]
    alone = Engine(lm.model, slots=1)
    assert alone.screen is not None or jax.default_backend() != "cpu"
    r = Request(ps[3], 24, temperature=0.0)
    alone.add(r)
    alone.run()
    assert r.tokens == hf_greedy(hf, ps[3], 24)


@pytest.mark.slow
def test_per_row_cache_index_equals_each_row_alone(tiny):
    """The model's cache takes a position per row (cache["index"] int32 [B], as the engine's slots
    use it): rows at different positions give the logits and cache each gets with its own scalar
    index."""
    from jaxgpt.model.gpt import init_cache

    _, lm = tiny
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 50257, (3, 12)), jnp.int32)
    lens = [4, 9, 12]
    one = []
    for b, n in enumerate(lens):  # each row alone: prefill n tokens, then one more token
        _, c = lm.model(ids[b:b + 1, :n], cache=init_cache(lm.config, 1, 32))
        one.append(lm.model(ids[b:b + 1, n - 1:n] * 0 + 7, cache=c))
    cache = {**init_cache(lm.config, 3, 32), "index": jnp.zeros(3, jnp.int32)}
    for b, n in enumerate(lens):  # fill each row's part of a batched cache, then one step
        _, c = lm.model(ids[b:b + 1, :n], cache=init_cache(lm.config, 1, 32))
        H = lm.config.n_head
        cache = {"k": [k.at[b * H:(b + 1) * H].set(r) for k, r in zip(cache["k"], c["k"])],
                 "v": [v.at[b * H:(b + 1) * H].set(r) for v, r in zip(cache["v"], c["v"])],
                 "index": cache["index"].at[b].set(n)}
    logits, new = lm.model(jnp.full((3, 1), 7, jnp.int32), cache=cache)
    assert new["index"].tolist() == [n + 1 for n in lens]
    for b, (want, c) in enumerate(one):
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(want[0]), atol=1e-5)
        H = lm.config.n_head
        np.testing.assert_allclose(np.asarray(new["k"][1][b * H:(b + 1) * H]), np.asarray(c["k"][1]), atol=1e-5)


@pytest.mark.slow
def test_seeded_row_draws_the_same_alone_and_in_any_slot(tiny):
    """A sampled row's tokens depend on its seed and positions only: alone, or in a full batch
    (any slot, next to greedy and other sampled rows, entering late) it draws the same ids."""
    _, lm = tiny
    ps = prompts(1, (7, 4, 13, 9))
    want = Request(ps[0], 16, temperature=0.9, top_k=40, top_p=0.95, seed=123)
    solo = Engine(lm.model, slots=1)
    solo.add(want)
    solo.run()
    engine = Engine(lm.model, slots=4)
    for slot in (0, 3):
        others = [Request(ps[i], 10 + i, temperature=[0.0, 1.3, 0.7][i - 1], top_k=[None, 5, None][i - 1],
                          seed=i) for i in (1, 2, 3)]
        row = Request(ps[0], 16, temperature=0.9, top_k=40, top_p=0.95, seed=123)
        order = others[:slot] + [row] + others[slot:]
        run_schedule(engine, {0: order[:2], 3: order[2:]})  # row enters at step 0 or 3
        assert row.slot == slot and row.tokens == want.tokens, slot
    other_seed = Request(ps[0], 16, temperature=0.9, top_k=40, top_p=0.95, seed=124)
    solo.add(other_seed)
    solo.run()
    assert other_seed.tokens != want.tokens


@pytest.mark.slow
def test_per_row_settings_equal_the_shared_filters():
    """sample_rows with a setting per row draws what the shared (compiled-in) settings draw with
    the same keys: temperature, top-k and top-p per row, greedy rows exact argmax."""
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(6, 300).astype(np.float32) * 3)
    settings = [(0.0, None, None), (1.0, None, None), (0.7, 20, None), (1.5, None, 0.8),
                (1.0, 5, 0.5), (2.0, 300, 1.0)]
    for trial in range(3):
        keys = jax.random.split(jax.random.key(trial), 6)
        per_row = sample_rows(logits, keys, jnp.array([s[0] for s in settings]),
                              jnp.array([s[1] or 0 for s in settings]),
                              jnp.array([1.0 if s[2] is None else s[2] for s in settings]))
        for b, (t, k, p) in enumerate(settings):
            shared = sample_rows(logits[b:b + 1], keys[b:b + 1], t, k, p)
            assert int(per_row[b]) == int(shared[0]), (trial, b)
            if t == 0.0:
                assert int(per_row[b]) == int(jnp.argmax(logits[b]))
            allowed = logits[b] / (t or 1.0)
            allowed = top_k_filter(allowed, k) if k else allowed
            allowed = top_p_filter(allowed, p) if p else allowed
            assert bool(jnp.isfinite(allowed[per_row[b]]))  # drawn from the filtered set


def test_eager_per_row_sampling_compiles_once():
    """sample_rows with per-row settings, and _filter_rows, called eagerly (as a user or a test
    would) compile their programs once: an un-jitted lax.cond compiled afresh on every call (new
    branch closures each time: ~1 s per call)."""
    from jaxgpt.decode.sampling import _filter_rows

    rng = np.random.RandomState(4)
    logits = [jnp.asarray(rng.randn(3, 400).astype(np.float32)) for _ in range(3)]
    keys = [jax.random.split(jax.random.key(i), 3) for i in range(3)]
    settings = (jnp.array([1.0, 0.0, 0.7]), jnp.array([5, 0, 0], jnp.int32), jnp.array([1.0, 1.0, 0.9]))
    sample_rows(logits[0], keys[0], *settings)
    _filter_rows(logits[0], *settings[1:])
    with xla_compiles() as compiles:
        drawn = [sample_rows(x, k, *settings) for x, k in zip(logits[1:], keys[1:])]
        kept = [_filter_rows(x, *settings[1:]) for x in logits[1:]]
    assert compiles == []
    assert all(int(d[1]) == int(jnp.argmax(x[1])) for d, x in zip(drawn, logits[1:]))  # the greedy row
    assert all(int(jnp.isfinite(f[0]).sum()) == 5 for f in kept)  # top-k 5


def test_streaming_stop_release_and_full_slots(tiny):
    """on_token sees each token as it is made; a stop id ends the row (emitted last); release
    frees a slot early; adding to a full engine fails; bad settings are ConfigErrors."""
    hf, lm = tiny
    p = prompts(2, (6,))[0]
    greedy = hf_greedy(hf, p, 10)
    seen = []
    engine = Engine(lm.model, slots=2)
    stop_at = greedy[4]
    r = Request(p, 10, temperature=0.0, stop=(stop_at,), on_token=seen.append)
    engine.add(r)
    long = Request(p, 50, temperature=0.0)
    engine.add(long)
    with pytest.raises(RuntimeError):
        engine.add(Request(p, 3))
    first = engine.step()
    assert sorted(first) == [(0, greedy[0]), (1, greedy[0])] and seen == greedy[:1]
    while not r.done:
        engine.step()
    cut = greedy.index(stop_at) + 1
    assert r.finish_reason == "stop" and r.tokens == seen == greedy[:cut]
    engine.release(long.slot)
    assert long.finish_reason == "released" and not engine.busy
    with pytest.raises(ConfigError):
        engine.add(Request(p, 5, top_p=0.0))
    with pytest.raises(ConfigError):
        engine.add(Request(list(range(64)), 5))  # no room left for a new token
    zero = Request(p, 0)
    engine.add(zero)
    assert zero.done and zero.tokens == [] and not engine.busy


@pytest.mark.slow
def test_no_recompilation_after_warmup(tiny):
    """After warmup(), prompts of any length, any number of requests per step and any sampling
    settings run without compiling anything (XLA compiles nothing), while the cache grows through its capacities (16, 32, 64) and starts small again."""
    from flax import nnx

    _, lm = tiny
    model = nnx.merge(*nnx.split(lm.model))  # its weights committed to a device, as a served
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))  # model's are
    engine = Engine(model, slots=4, max_len=64)
    engine.warmup()
    ps = prompts(3, (1, 16, 17, 33, 60, 5, 2))
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=3), dict(temperature=0.5, top_p=0.9),
                dict(temperature=2.0, seed=9)]
    reqs = [Request(p, 3 + i, **settings[i % 4]) for i, p in enumerate(ps)]
    with xla_compiles() as compiles:
        run_schedule(engine, {0: reqs[:3], 1: [reqs[3]], 4: reqs[4:6], 8: reqs[6:]})
        assert engine.cache["k"][0].shape[1] == 64  # grown for the 60-token prompt
        again = [Request(p, 20, **settings[i % 4]) for i, p in enumerate(ps[:2])]
        run_schedule(engine, {0: again[:1], 3: again[1:]})  # a new cache from 16 on, grown again
    assert all(r.done for r in reqs + again)
    assert compiles == []  # (warmup compiles ahead of time: a first call only fills jit's dispatch cache)


@pytest.mark.slow
def test_cache_grows_with_the_longest_row_and_starts_small_again(tiny):
    """The engine's cache holds ~2x its longest live row, not max_len: it doubles (rows copied)
    as a row outgrows it, a row alongside is not disturbed, both still get HF's greedy tokens,
    and once no row runs the next request starts in the smallest cache again."""
    hf, lm = tiny
    engine = Engine(lm.model, slots=2)
    assert engine.capacities == [16, 32, 64]
    (p1, p2), seen = prompts(5, (5, 9)), []
    long, short = Request(p1, 45, temperature=0.0), Request(p2, 20, temperature=0.0)
    engine.add(long)
    for step in range(45):
        if step == 3:
            engine.add(short)
        engine.step()
        seen.append(engine.cache["k"][0].shape[1])
    assert long.tokens == hf_greedy(hf, p1, 45) and short.tokens == hf_greedy(hf, p2, 20)
    assert seen[0] == 16 and seen[-1] == 64 and seen == sorted(seen) and 32 in seen
    # the first step that writes position 16: the 9-token row (prefilled at step 3, one token
    # per step after) writes position 9 + (step - 3) - 1; the 5-token row only at step 12
    assert seen.index(32) == 16 - 9 + 3 + 1 and seen.index(64) == 32 - 5 + 1
    again = Request(p2, 2, temperature=0.0)
    engine.add(again)
    engine.step()
    assert engine.cache["k"][0].shape[1] == 16 and again.tokens == hf_greedy(hf, p2, 2)[:1]


def test_chat_greedy_reply_equals_transformers(tiny):
    """ChatSession decodes through the engine: its greedy reply is HF's greedy continuation of
    the rendered conversation (cut at <|endoftext|>), streamed as the same text."""
    hf, lm = tiny
    chat = ChatSession(lm, "alpaca", temperature=0.0, max_new_tokens=12, log=lambda s: None)
    pieces = []
    answer = chat.reply("Name a primary color.", pieces.append)
    ids = lm.tokenizer.encode_ordinary(templates.render_prompt(
        "alpaca", [{"role": "user", "content": "Name a primary color."}]))
    want = hf_greedy(hf, ids, 12)
    want = want[:want.index(EOT)] if EOT in want else want
    assert answer == lm.tokenizer.decode(want) == "".join(pieces)
    assert chat.messages[-1] == {"role": "assistant", "content": answer}
    chat.reset()
    assert chat.reply("Name a primary color.") == answer  # reset: the same first turn again


@pytest.mark.slow
def test_per_row_adapters_and_logprobs(tiny, tmp_path):
    """Rows of one batch with different LoRA adapters (and the base) each decode what their merged
    model decodes alone; logprobs are the model's log-softmax at each position, the alternatives
    its most likely tokens."""
    from jaxgpt.model import lora
    from jaxgpt.decode.generate import generate
    hf, lm = tiny
    base_dir = lm.meta["source"]
    paths = [random_adapter(base_dir, tmp_path / "a", 4, ["c_attn", "mlp.c_proj"], 1),
             random_adapter(base_dir, tmp_path / "b", 2, ["c_fc", "attn.c_proj"], 2)]
    engine = Engine(lm.model, slots=4, adapters=[lora.adapter_weights(p, lm.model) for p in paths])
    ps = prompts(5, (6, 9, 4, 12))
    reqs = [Request(ps[0], 8, temperature=0.0, adapter=1, logprobs=3),
            Request(ps[1], 6, temperature=0.0, logprobs=0),
            Request(ps[2], 7, temperature=0.0, adapter=2),
            Request(ps[3], 5, temperature=0.0, adapter=1)]
    run_schedule(engine, {0: reqs[:2], 2: reqs[2:]})
    models = {0: lm.model, 1: jaxgpt.load(paths[0]).model, 2: jaxgpt.load(paths[1]).model}
    for r in reqs:
        want = np.asarray(generate(models[r.adapter], np.array([r.prompt]), len(r.tokens), temperature=0.0))
        assert r.tokens == want[0, len(r.prompt):].tolist(), r.adapter
    base0 = np.asarray(generate(lm.model, np.array([ps[0]]), 8, temperature=0.0))[0, 6:].tolist()
    assert reqs[0].tokens != base0  # the adapter changes the model
    for r in reqs[:2]:
        logits = jaxgpt.load(paths[0]).logits(r.prompt + r.tokens) if r.adapter else lm.logits(r.prompt + r.tokens)
        assert len(r.token_logprobs) == len(r.tokens)
        for i, (lp, top) in enumerate(r.token_logprobs):
            ref = np.asarray(jax.nn.log_softmax(logits[len(r.prompt) - 1 + i]))
            assert abs(lp - ref[r.tokens[i]]) < 1e-4 and len(top) == r.logprobs
            assert [t for t, _ in top] == np.argsort(-ref)[:r.logprobs].tolist()
            assert np.allclose([v for _, v in top], np.sort(ref)[::-1][:r.logprobs], atol=1e-4)
    assert reqs[2].token_logprobs == []
    with pytest.raises(ConfigError):
        engine.add(Request(ps[0], 2, adapter=3))
    with pytest.raises(ConfigError):
        engine.add(Request(ps[0], 2, logprobs=21))


@pytest.mark.slow
def test_per_row_filters_read_the_top_logits_first():
    """_filter_rows keeps the tokens of the shared (sorting) filters whichever way it finds the
    thresholds: a batch of 4 by halving searches over the whole rows; each row alone among the
    FILTER_TOP largest logits when they suffice (small k, peaked rows) and by the 4-way search
    otherwise (k or the nucleus past FILTER_TOP)."""
    from jaxgpt.decode.sampling import FILTER_TOP, _filter_rows
    rng = np.random.RandomState(1)
    V = 2000
    peaked = rng.randn(4, V).astype(np.float32) * 4
    flat = rng.randn(4, V).astype(np.float32) * 0.1  # its 0.9-nucleus holds ~1800 tokens
    for logits, ks, ps in ((peaked, (0, 7, 40, 0), (0.9, 1.0, 0.5, 0.95)),  # fits
                           (flat, (0, 3, 0, 0), (1.0, 1.0, 0.9, 1.0)),  # nucleus past FILTER_TOP
                           (peaked, (FILTER_TOP + 5, 0, 2, 0), (1.0, 0.8, 1.0, 1.0))):  # k past it
        got = np.isfinite(np.asarray(_filter_rows(jnp.asarray(logits), jnp.array(ks), jnp.array(ps))))
        for b in range(4):
            want = jnp.asarray(logits[b])
            want = top_k_filter(want, ks[b]) if ks[b] else want
            want = np.isfinite(np.asarray(top_p_filter(want, ps[b]) if ps[b] < 1 else want))
            alone = _filter_rows(jnp.asarray(logits[b:b + 1]), jnp.array(ks[b:b + 1]), jnp.array(ps[b:b + 1]))
            assert (got[b] == want).all() and (np.isfinite(np.asarray(alone))[0] == want).all(), (ks, ps, b)


def test_draw_samples_the_softmax_distribution():
    """engine.draw (inverse CDF in two levels) against the exact probabilities: a chi-square
    test over 20,000 draws of a 600-id row whose mass spans blocks, with excluded (-inf) ids
    that must never be drawn; and one fixed key always gives the same id."""
    from jaxgpt.decode.sampling import DRAW_BLOCK, draw
    rng = np.random.RandomState(3)
    V = 600  # > 2 blocks, the last one partial
    logits = rng.randn(V).astype(np.float32) * 2
    logits[rng.rand(V) < 0.3] = -np.inf
    logits[DRAW_BLOCK:2 * DRAW_BLOCK] = -np.inf  # a whole block without mass
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    ids = np.asarray(jax.jit(draw)(keys, jnp.broadcast_to(jnp.asarray(logits), (n, V))))
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    assert np.isfinite(logits[ids]).all()
    counts = np.bincount(ids, minlength=V)
    big = p * n >= 5  # chi-square over the ids expected >= 5 times, the rest pooled
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # ~5 sigma
    again = np.asarray(jax.jit(draw)(keys[:50], jnp.broadcast_to(jnp.asarray(logits), (50, V))))
    np.testing.assert_array_equal(again, ids[:50])
