"""Sampling: greedy decoding vs transformers, cache vs no cache, filters, seeds, the CLI, the tokenizer."""

import json
import os
import subprocess
import sys
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.cli.sample import main  # noqa: E402
from jaxgpt.decode.sample import generate, sample_token, top_k_filter, top_p_filter  # noqa: E402

torch.set_num_threads(2)
EOT = 50256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, its folder, jaxgpt run dir converted from it): 2 layers, context 64."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64)).eval()
    model.save_pretrained(root / "hf")
    jaxgpt.load(root / "hf").save(root / "jx")
    return model, root / "hf", root / "jx"


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory, tiny):
    """A model whose argmax is always <|endoftext|>: ln_f maps every position to the same vector b
    (scale 0, bias b) and the tied head row of eot is 100 b."""
    model = transformers.GPT2LMHeadModel(tiny[0].config).eval()
    model.load_state_dict(tiny[0].state_dict())
    with torch.no_grad():
        b = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(b)
        model.transformer.wte.weight[EOT] = 100 * b
    folder = tmp_path_factory.mktemp("eot") / "hf"
    model.save_pretrained(folder)
    return folder


# ---- decoding ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_matches_transformers_with_and_without_cache(tiny):
    model, folder, _ = tiny
    lm = jaxgpt.load(folder)
    prompt = np.random.RandomState(0).randint(0, 50257, (2, 5))
    n = 40
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=EOT,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    cached = np.asarray(generate(lm.model, prompt, n, temperature=0.0))
    uncached = np.asarray(generate(lm.model, prompt, n, temperature=0.0, use_cache=False))
    assert ref.shape == cached.shape == (2, 5 + n)
    np.testing.assert_array_equal(cached, ref)
    np.testing.assert_array_equal(uncached, ref)


@pytest.mark.slow
def test_batch1_greedy_through_the_decode_copy_matches_transformers(tiny):
    """Batch-1 greedy decoding through the decode copy (transposed kernels + the int8 screen of the
    head, the CPU default) gives the same ids as HF, as the model's own weights and as no cache."""
    from jaxgpt.decode.fast import _DERIVED

    model, folder, _ = tiny
    lm = jaxgpt.load(folder)
    prompt = np.random.RandomState(3).randint(0, 50257, (1, 7))
    n = 40
    ref = hf_greedy(model, prompt, n)
    fast = np.asarray(generate(lm.model, prompt, n, temperature=0.0, fast_decode=True))
    assert ("screen", id(lm.model.wte.embedding[...])) in _DERIVED  # the screen was used
    plain = np.asarray(generate(lm.model, prompt, n, temperature=0.0, fast_decode=False))
    uncached = np.asarray(generate(lm.model, prompt, n, temperature=0.0, use_cache=False))
    for out in (fast, plain, uncached):
        np.testing.assert_array_equal(out, ref)


@pytest.mark.slow
def test_decode_copy_follows_the_weights(tiny):
    """The decode copy shares the untransposed arrays, reuses its cached kernels while the source
    arrays live, and never serves a stale copy after a weight changes (as training does)."""
    import gc

    from flax import nnx

    from jaxgpt.decode.fast import RowLinear
    from jaxgpt.decode.fast import _DERIVED, decode_copy

    lm = jaxgpt.load(tiny[1])
    a = decode_copy(lm.model)
    assert type(a.h[0].mlp.c_fc) is RowLinear and type(lm.model.h[0].mlp.c_fc) is nnx.Linear
    assert a.wte.embedding[...] is lm.model.wte.embedding[...]  # shared, not copied
    assert decode_copy(lm.model).h[1].attn.c_attn.kernel[...] is a.h[1].attn.c_attn.kernel[...]
    old_id = id(lm.model.h[0].mlp.c_fc.kernel[...])
    new = np.asarray(lm.model.h[0].mlp.c_fc.kernel[...]) * -2.0
    lm.model.h[0].mlp.c_fc.kernel[...] = jnp.asarray(new)  # an update replaces the array
    b = decode_copy(lm.model)
    np.testing.assert_array_equal(np.asarray(b.h[0].mlp.c_fc.kernel[...]), new.T)
    del a
    gc.collect()
    assert ("kernel.T", old_id) not in _DERIVED  # the copy of the replaced kernel was dropped
    prompt = np.random.RandomState(4).randint(0, 50257, (2, 5))
    np.testing.assert_array_equal(  # batch 2: transposed kernels, full head
        np.asarray(generate(lm.model, prompt, 33, temperature=0.0, fast_decode=True)),
        np.asarray(generate(lm.model, prompt, 33, temperature=0.0, fast_decode=False)))


def test_screened_argmax_is_the_float32_argmax():
    """screened_argmax == argmax of the float32 logits, including near-ties that the int8 copy
    alone gets wrong, rows with outliers, and the fallback when more than k rows are candidates."""
    from jaxgpt.decode.sample import greedy_screen, screened_argmax

    pick = jax.jit(screened_argmax, static_argnames="k")
    rng = np.random.RandomState(0)
    V, C = 2000, 64
    int8_wrong = 0
    for trial in range(40):
        table = rng.randn(V, C).astype(np.float32) * 0.02
        table[rng.randint(V, size=20), rng.randint(C, size=20)] = 0.5  # outlier weights
        x = rng.randn(3, C).astype(np.float32)
        x[:, rng.randint(C)] *= 30  # an outlier activation dimension, as in trained GPT-2s
        best = (table @ x.T).argmax(0)
        for b in range(3):  # near-ties: rows within ~1e-4 of each row's maximum logit
            for r in rng.randint(V, size=5):
                table[r] = table[best[b]] + rng.randn(C).astype(np.float32) * 1e-5
        exact = table.astype(np.float64) @ x.T.astype(np.float64)  # [V, 3]
        want = exact.argmax(0)
        # float32 rounding of a C-term dot, relative to sum |x_i w_i|: picks closer than this to
        # the maximum are ties that any float32 matmul order may resolve either way
        tol = 1e-6 * (np.abs(table) @ np.abs(x).T).max(0)  # [3]
        screen = greedy_screen(jnp.asarray(table))
        approx = (x @ np.asarray(screen.q, np.float32).T) * np.asarray(screen.scale)
        int8_wrong += int((exact.max(0) - exact[approx.argmax(1), range(3)] > tol).sum())
        for k in (256, 2):  # 2: more candidates than k -> the full float32 head decides
            got = np.asarray(pick(jnp.asarray(x), jnp.asarray(table), screen, k=k))
            short = exact.max(0) - exact[got, range(3)]  # how far below the maximum the pick is
            assert (short <= tol).all(), f"trial {trial}, k={k}: picked {got}, best {want}, {short}"
    assert int8_wrong > 0  # the screen alone would have been wrong: the recompute is tested


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(torch.tensor(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=EOT,
                              attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()


@pytest.mark.slow
def test_new_prompt_length_and_length_reuse_the_compiled_decoder(tiny):
    """Prompts are padded to power-of-two buckets and the buffer length too, and the real prompt
    length and max_new_tokens are traced: prompts of 3..16 tokens with up to 32 tokens in all
    share one compiled function per path (counted in jax.jit's cache), and still equal HF."""
    from jaxgpt.decode.steps import bucket
    from jaxgpt.decode.generate import _generate

    assert [bucket(n) for n in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 64]
    assert bucket(100, cap=64) == 64
    model, folder, _ = tiny
    lm = jaxgpt.load(folder)
    prompt = lambda T0: np.random.RandomState(T0).randint(0, 50257, (2, T0))
    for use_cache in (True, False):
        generate(lm.model, prompt(5), 20, temperature=0.0, use_cache=use_cache)  # compiles
        before = _generate._cache_size()
        for T0, n in [(3, 20), (9, 15), (16, 16), (12, 7)]:
            out = np.asarray(generate(lm.model, prompt(T0), n, temperature=0.0, use_cache=use_cache))
            np.testing.assert_array_equal(out, hf_greedy(model, prompt(T0), n))
        assert _generate._cache_size() == before, f"recompiled (use_cache={use_cache})"
    generate(lm.model, prompt(17), 5, temperature=0.0)  # a new prompt bucket (32) compiles once
    assert _generate._cache_size() == before + 1


def test_rows_that_stop_are_padded_with_eot(eot_model):
    lm = jaxgpt.load(eot_model)
    for use_cache in (True, False):  # every row stops at once: the loop ends, the rest is eot
        out = np.asarray(generate(lm.model, np.zeros((3, 4), np.int32), 6, temperature=0.0,
                                  eot=EOT, use_cache=use_cache))
        assert out.shape == (3, 10) and (out[:, 4:] == EOT).all()


def test_generate_past_the_context_slides_a_window(tiny):
    lm = jaxgpt.load(tiny[1])
    out = np.asarray(generate(lm.model, np.arange(60)[None], 10, temperature=0.0))
    assert out.shape == (1, 70) and (out[0, :60] == np.arange(60)).all()
    # the last token is the greedy choice given the 64 tokens before it
    assert out[0, -1] == lm.logits(out[:, -65:-1])[0, -1].argmax()


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(tiny):
    lm = jaxgpt.load(tiny[1])
    prompt = np.zeros((4, 3), np.int32)
    run = lambda seed, **kw: np.asarray(generate(lm.model, prompt, 20, key=jax.random.key(seed), **kw))
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({tuple(r) for r in a[:, 3:]}) == 4  # the rows of a batch are independent samples
    np.testing.assert_array_equal(run(3, top_k=5, top_p=0.9), run(3, top_k=5, top_p=0.9))
    assert (run(5, use_cache=False) == run(5)).all()  # same key schedule on both paths


# ---- filters on hand-made logits ---------------------------------------------------------------
def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered))).tolist())


def test_top_k_keeps_exactly_k():
    logits = jnp.array([0.3, 2.0, -1.0, 1.5, 0.9, -0.2])
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 3)) == {1, 3, 4}
    assert kept(top_k_filter(logits, 100)) == set(range(6))
    np.testing.assert_array_equal(top_k_filter(logits, 3)[jnp.array([1, 3, 4])], logits[jnp.array([1, 3, 4])])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = jnp.array([0.05, 0.4, 0.1, 0.25, 0.2])  # sorted: 0.4, 0.25, 0.2, 0.1, 0.05
    logits = jnp.log(probs)
    assert kept(top_p_filter(logits, 0.3)) == {1}  # 0.4 alone reaches 0.3
    assert kept(top_p_filter(logits, 0.5)) == {1, 3}  # 0.65
    assert kept(top_p_filter(logits, 0.7)) == {1, 3, 4}  # 0.85
    assert kept(top_p_filter(logits, 0.9)) == {1, 2, 3, 4}  # 0.95
    assert kept(top_p_filter(logits, 1e-9)) == {1}  # always at least one token
    assert kept(top_p_filter(logits, 1.0)) == set(range(5))
    batch = jnp.stack([logits, logits[::-1]])  # row-wise
    assert kept(top_p_filter(batch, 0.5)[1]) == {3, 1}


@pytest.mark.slow
def test_sample_token_greedy_and_filters():
    logits = jnp.array([[0.0, 5.0, 4.9, -3.0]])
    assert sample_token(logits, jax.random.key(0), temperature=0.0)[0] == 1
    draws = {int(sample_token(logits, jax.random.key(s), temperature=5.0, top_k=2)[0]) for s in range(50)}
    assert draws == {1, 2}


# ---- CLI (in-process: stdout is text only) -------------------------------------------------------
@pytest.mark.slow
def test_cli_text_and_json(tiny, capsys):
    jx = str(tiny[2])
    assert main([jx, "--prompt", "Hello world", "--max-new-tokens", "6", "--num-samples", "3",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    texts = out.rstrip("\n").split("\n---\n")
    assert len(texts) == 3 and all(t.startswith("Hello world") for t in texts)
    assert main([jx, "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0",
                 "--json", "--no-stop"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    tok = jaxgpt.get_tokenizer("gpt2")
    assert sample["tokens"][:2] == tok.encode("Hello world") and len(sample["tokens"]) == 8
    assert sample["text"] == tok.decode(sample["tokens"])
    lm = jaxgpt.load(jx)  # the API agrees with the CLI
    assert lm.generate("Hello world", 6, temperature=0, stop_at_eot=False) == sample["text"]
    assert lm.generate("Hello world", 6, temperature=0, stop_at_eot=False,
                       fast_decode=False) == sample["text"]
    assert main([jx, "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0",
                 "--json", "--no-stop", "--no-decode-copy"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0] == sample


@pytest.mark.slow
def test_cli_stops_at_endoftext(eot_model, capsys):
    assert main([str(eot_model), "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "0",
                 "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]
    assert sample == {"text": "Hi", "tokens": jaxgpt.get_tokenizer("gpt2").encode("Hi")}
    assert main([str(eot_model), "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0",
                 "--no-stop"]) == 0
    assert capsys.readouterr().out == "Hi" + "<|endoftext|>" * 3 + "\n"


@pytest.mark.slow
def test_cli_truncates_long_prompt_with_warning(tiny, capsys):
    assert main([str(tiny[2]), "--prompt", " a" * 100, "--max-new-tokens", "2", "--json"]) == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "keeping its last 64" in cap.err
    assert len(json.loads(cap.out)["samples"][0]["tokens"]) == 66


@pytest.mark.slow
def test_cli_bad_settings_exit_2(tiny, tmp_path):
    """Each bad setting: exit 2, one line on stderr, nothing on stdout (real subprocesses)."""
    bad = [["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "0"], ["--temperature", "-1"],
           ["--max-new-tokens", "-1"]]
    # one interpreter per case would cost ~3 s each; the CLIs run sequentially in one subprocess
    script = ("import sys, contextlib, io; from jaxgpt.cli.sample import main\n"
              "for argv in %r:\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err): rc = main([%r, *argv])\n"
              "    print(rc, repr(err.getvalue()))\n") % (bad, str(tiny[2]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(bad), p.stderr
    for argv, line in zip(bad, lines):
        rc, err = line.split(" ", 1)
        err = eval(err)
        assert rc == "2" and err.count("\n") == 1 and err.startswith("error: " + argv[0]), (argv, err)
    # and one genuinely separate process, as a user would run it
    p = subprocess.run([sys.executable, "-m", "jaxgpt.sample", str(tiny[2]), "--top-k", "0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1


# ---- tokenizer vs transformers' independent BPE implementation ----------------------------------
def test_tokenizer_matches_transformers():
    """transformers' GPT2Tokenizer (Rust `tokenizers` BPE) built from the same vocab/merges files."""
    assets = resources.files("jaxgpt") / "assets" / "gpt2"
    vocab = json.loads((assets / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in
              (assets / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    ref = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    tok = jaxgpt.get_tokenizer("gpt2")
    texts = ["Hello, world!", "naïve café — Ünïcödé ½ ß 東京 Привет", "tabs\tand   spaces  \n\n\n  end ",
             "emoji 🤖🎉👩‍👩‍👧 flags 🇫🇷", "<|endoftext|>start<|endoftext|> middle <|endoftext|>",
             "it's we'll they've I'M", "1234567 3.14159 $100", "   ", "\u200b zero-width", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") == [EOT]
