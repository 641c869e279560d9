"""jaxgpt.harness against the lm-evaluation-harness itself (lm_eval 0.4.13): on a tiny random
GPT-2 folder, the `jaxgpt` model's per-request loglikelihoods, rolling loglikelihoods, greedy
generations and metrics on the shipped local tasks equal those of the harness's own `hf` model on
the same weights; the server's /v1/completions (echo + logprobs) and vLLM tokenizer routes, read
by the harness's `local-completions` model, give the same; int8 and LoRA-adapter models through
the harness model equal jaxgpt's own logits; bad model args and task names are one line."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api], for local-completions
httpx = pytest.importorskip("httpx")

import jaxgpt  # noqa: E402
import jaxgpt.harness as harness  # noqa: E402  (registers the jaxgpt model)
from jaxgpt.evaluate import scoring as ev  # noqa: E402
from jaxgpt.evaluate import hellaswag
from jaxgpt.formats.load import load_for_inference  # noqa: E402
from jaxgpt.cli import harness as harness_cli  # noqa: E402
from jaxgpt.config import ConfigError  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import REPO, random_adapter, xla_compiles  # noqa: E402

# the tests that build models, servers or processes are marked slow one by one; the three
# that only read the registry, the imports and the local task are the quick tier's harness tests

torch.set_num_threads(2)
CTX = 64
TASKS = ["jaxgpt_hellaswag", "jaxgpt_shakespeare", "jaxgpt_shakespeare_next"]
LIMIT = 6  # documents per task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 (GPT-2's vocabulary, context 64) as an HF folder with tokenizer files, and a
    random LoRA adapter on it."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=CTX)).eval()
    hf.save_pretrained(root / "hf")
    assets = REPO / "jaxgpt" / "assets" / "gpt2"  # so AutoTokenizer (the hf model) loads it offline
    (root / "hf" / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
    (root / "hf" / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
    adapter = random_adapter(root / "hf", root / "adapter", 4, ["c_attn", "mlp.c_proj"], 1)
    return root / "hf", adapter


@pytest.fixture(scope="module")
def lms(tiny):
    folder, _ = tiny
    return (get_model("hf")(pretrained=str(folder), device="cpu", batch_size=8),
            get_model("jaxgpt")(path=str(folder)))


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(harness.tasks_dir()), include_defaults=False)


def evaluate(lm, task_manager, limit=LIMIT):
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, limit=limit,
                                   log_samples=True)


def responses(result, task):
    """[(doc_id, [response of each of the doc's requests])] of one task's samples."""
    return [(s["doc_id"], [r[0] for r in s["resps"]]) for s in result["samples"][task]]


# ---- registration, imports ---------------------------------------------------------------------
def test_registered_beside_the_harness_models():
    from jaxgpt.harness.model import JaxGPTLM
    assert get_model("jaxgpt") is JaxGPTLM
    assert get_model("hf").__name__ == "HFLM"  # registering first did not hide lm_eval's own models
    harness.register()  # again: a no-op
    # `import jaxgpt` (and the server, the evaluators) never import lm_eval
    code = ("import sys, jaxgpt, jaxgpt.evaluate.scoring, jaxgpt.evaluate.hellaswag, jaxgpt.serve.app; "
            "assert not [m for m in sys.modules if m.startswith('lm_eval')]")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert p.returncode == 0, p.stderr


def test_only_the_harness_package_imports_lm_eval():
    import ast
    pkg = REPO / "jaxgpt"
    for path in pkg.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        uses = any(n.split(".")[0] == "lm_eval" for n in names)
        rel = path.relative_to(pkg).as_posix()
        assert not uses or rel in ("harness/__init__.py", "harness/model.py", "cli/harness.py"), rel


def test_local_hellaswag_docs_are_the_harness_preprocessing():
    """jaxgpt_hellaswag's docs == lm_eval's own hellaswag process_docs on the same records."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs
    sys.path.insert(0, str(harness.tasks_dir()))
    try:
        import loaders
    finally:
        sys.path.pop(0)
    ours = loaders.hellaswag_docs()["validation"]
    raw = [json.loads(line) for line in (harness.tasks_dir() / "hellaswag_sample.jsonl").read_text().splitlines()]
    theirs = process_docs(datasets.Dataset.from_list(raw))
    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert (a["query"], a["choices"], a["gold"]) == (b["query"], b["choices"], b["gold"])
    assert len(loaders.shakespeare_docs()["validation"]) == loaders.DOCS


# ---- parity with the harness's hf model -----------------------------------------------------------
@pytest.mark.slow
def test_tasks_equal_the_hf_model(lms, task_manager, tiny):
    """simple_evaluate on the local tasks: every request's response and every metric equal."""
    hf, jx = lms
    want, got = evaluate(hf, task_manager), evaluate(jx, task_manager)
    diffs = []
    for (i, a), (j, b) in zip(responses(want, "jaxgpt_hellaswag"), responses(got, "jaxgpt_hellaswag")):
        assert i == j and len(a) == len(b) == 4
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(a, b):
            diffs.append(abs(lp_a - lp_b))
            assert greedy_a == greedy_b
    assert len(diffs) == 4 * LIMIT and max(diffs) <= 1e-4, max(diffs)
    for (_, a), (_, b) in zip(responses(want, "jaxgpt_shakespeare"), responses(got, "jaxgpt_shakespeare")):
        assert abs(a[0] - b[0]) <= 1e-6 * abs(a[0]), (a, b)  # (sums over ~5 windows: see below)
    gens = list(zip(responses(want, "jaxgpt_shakespeare_next"), responses(got, "jaxgpt_shakespeare_next")))
    assert len(gens) == LIMIT and all(a[1] == b[1] for a, b in gens), gens
    for task in TASKS:
        for k, v in want["results"][task].items():
            if isinstance(v, float) and "stderr" not in k:
                assert math.isclose(got["results"][task][k], v, rel_tol=1e-5), (task, k)
    # jaxgpt's own HellaSwag rule for the harness's acc_norm (jaxgpt.hellaswag) agrees per example
    lm = jaxgpt.load(tiny[0])
    ex = hellaswag.read_examples(harness.tasks_dir() / "hellaswag_sample.jsonl", limit=LIMIT)
    ours = hellaswag.score(lm.model, lm.tokenizer, ex, progress=False)["per_example"]
    assert [int(e["pred_norm_harness"] == e["label"]) for e in ours] == \
        [int(s["acc_norm"]) for s in got["samples"]["jaxgpt_hellaswag"]]


@pytest.mark.slow
def test_rolling_windows_equal_the_hf_model(lms):
    """Each rolling window's loglikelihood: == hf's within 1e-4 (hf sums its float32 logprobs in
    float32), and within 2e-5 of hf's logits reduced in float64 (jaxgpt sums in float64)."""
    hf, jx = lms
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    text = (harness.tasks_dir().parents[1] / "assets" / "tinyshakespeare.txt").read_text()[:3000]
    toks = hf.tok_encode(text)
    assert toks == jx.tok_encode(text) and hf.prefix_token_id == jx.prefix_token_id == 50256
    wins = [(None, c, t) for c, t in map(make_disjoint_window, get_rolling_token_windows(
        toks, hf.prefix_token_id, CTX, 1))]
    assert len(wins) > 10
    a = np.array([x[0] for x in hf._loglikelihood_tokens(wins, disable_tqdm=True)])
    b = np.array([x[0] for x in jx._loglikelihood_tokens(wins, disable_tqdm=True)])
    ref = []
    with torch.no_grad():
        for _, c, t in wins:
            inp = (c + t)[-(CTX + 1):][:-1]
            lp = torch.log_softmax(hf.model(torch.tensor([inp])).logits[0].double(), -1)
            ref.append(float(lp[torch.arange(len(inp))[-len(t):], torch.tensor(t)].sum()))
    assert np.abs(a - b).max() <= 1e-4 and np.abs(b - np.array(ref)).max() <= 2e-5
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert abs(jx.loglikelihood_rolling(req, disable_tqdm=True)[0] - b.sum()) < 1e-9


@pytest.mark.slow
def test_requests_directly_and_compile_once(lms):
    """Empty contexts (the prefix token), a context longer than max_length, stop strings,
    max_gen_toks; scoring the same requests again compiles nothing."""
    hf, jx = lms
    long = "The king is dead, long live the king. " * 12
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(
        [("", "Hello world"), ("Hello", " world"), ("Hello ", "world"), (long, " Amen."), ("A", "\n\nB")])]
    a, b = hf.loglikelihood(reqs, disable_tqdm=True), jx.loglikelihood(reqs, disable_tqdm=True)
    assert all(abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1] for x, y in zip(a, b)), (a, b)
    with xla_compiles() as compiles:
        assert jx.loglikelihood(reqs, disable_tqdm=True) == b
    assert compiles == []
    gen = [Instance("generate_until", {}, (c, kw), i) for i, (c, kw) in enumerate([
        ("ROMEO:", {"until": ["\n"], "max_gen_toks": 12}),
        ("Once upon a time", {"until": [" the", "."], "max_gen_toks": 30, "do_sample": False}),
        (long, {"max_gen_toks": 9}),  # the context is cut to max_length - max_gen_toks
        ("Hi", {"until": "x", "max_gen_toks": 5, "temperature": 0})])]
    assert jx.generate_until(gen, disable_tqdm=True) == [hf.generate_until([g])[0] for g in gen]
    bad = Instance("generate_until", {}, ("Hi", {"num_beams": 4}), 0)
    with pytest.raises(ConfigError, match="num_beams"):
        jx.generate_until([bad])


@pytest.mark.slow
def test_sampled_generation_is_seeded(lms):
    _, jx = lms
    g = [Instance("generate_until", {}, ("Hi", {"do_sample": True, "temperature": 1.0, "top_k": 50,
                                                 "max_gen_toks": 8, "until": []}), i) for i in range(3)]
    a, b = jx.generate_until(g, disable_tqdm=True), jx.generate_until(g, disable_tqdm=True)
    assert a == b and len(set(a)) > 1  # the same per request, different between requests


# ---- another family: a Llama whose tokenizer prepends BOS ---------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random tiny Llama (GQA, rotary) HF folder with a byte-level BPE tokenizer.json whose
    post-processor prepends BOS `<s>` (id 50257; end-of-text 50256), as Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from llama_helpers import hf_llama

    out = tmp_path_factory.mktemp("llama")
    assets = REPO / "jaxgpt" / "assets" / "gpt2"
    tk = Tokenizer(models.BPE.from_file(str(assets / "encoder.json"), str(assets / "vocab.bpe")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "<s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 50257)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>")
    hf_llama(vocab_size=len(fast), max_position_embeddings=CTX, bos_token_id=50257,
             eos_token_id=50256).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.mark.slow
def test_llama_family_with_bos(llama):
    """BOS prepended as the tokenizer does (not to a continuation, not twice), BOS as the prefix
    token, the end-of-text token ending generations: == the hf model. (hf runs with
    logits_cache=False: its one-token-continuation cache scores ("Hello", " world") at the wrong
    position when another request's context + continuation[:-1] is the same ids, here
    ("", "Hello world") once both start with BOS.)"""
    hf = get_model("hf")(pretrained=str(llama), device="cpu", batch_size=8, logits_cache=False)
    jx = get_model("jaxgpt")(path=str(llama))
    assert hf.prefix_token_id == jx.prefix_token_id == 50257 and jx.add_bos_token
    for text in ("Hello world", "<s>Hello", "a <|endoftext|> b"):
        assert jx.tok_encode(text) == hf.tok_encode(text)
        assert jx.tok_encode(text, add_special_tokens=False) == hf.tok_encode(text, add_special_tokens=False)
    assert jx.tok_encode("Hello")[0] == 50257 and jx.tok_encode("<s>Hello").count(50257) == 1
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(
        [("", "Hello world"), ("Hello", " world"), ("The cat sat", " on the mat."), ("A " * 40, "B")])]
    a, b = hf.loglikelihood(reqs, disable_tqdm=True), jx.loglikelihood(reqs, disable_tqdm=True)
    assert all(abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1] for x, y in zip(a, b)), (a, b)
    text = (REPO / "jaxgpt" / "assets" / "tinyshakespeare.txt").read_text()[:1200]
    r = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert abs(hf.loglikelihood_rolling(r, disable_tqdm=True)[0] - jx.loglikelihood_rolling(r, disable_tqdm=True)[0]) <= 1e-3
    gen = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 10}), i)
           for i, c in enumerate(["ROMEO:", "Once upon a time"])]
    assert jx.generate_until(gen, disable_tqdm=True) == [hf.generate_until([g])[0] for g in gen]
    # the server's /tokenize follows the same rule
    from jaxgpt.serve.schemas import Context, parse_tokenize
    tok = jx.tokenizer
    ctx = Context({"m": 0}, "m", CTX, jx.lm.config.vocab_size, tok, {"m": "alpaca"}, tok.eot_token)
    assert parse_tokenize({"prompt": "Hello world"}, ctx)[0] == hf.tok_encode("Hello world")
    assert parse_tokenize({"prompt": "Hello world", "add_special_tokens": False}, ctx)[0] == \
        hf.tok_encode("Hello world", add_special_tokens=False)


# ---- int8 and LoRA: against jaxgpt's own logits ---------------------------------------------------
def padded_logits(lm, ids):
    """lm.logits of ids, run padded to the whole context (one compile: the model is causal)."""
    return np.asarray(lm.logits(list(ids) + [0] * (CTX - len(ids))), np.float64)[:len(ids)]


def reference_loglikelihood(lm, ctx_ids, cont_ids):
    logits = padded_logits(lm, ctx_ids + cont_ids)  # [T, V]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    pos = np.arange(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
    return float(logp[pos, cont_ids].sum()), bool((logp[pos].argmax(-1) == cont_ids).all())


def greedy_reference(lm, ids, n, eot=50256):
    out = []
    for _ in range(n):
        tok = int(np.argmax(padded_logits(lm, ids + out)[-1]))
        if tok == eot:
            break
        out.append(tok)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "lora"])
def test_int8_and_lora_models(tiny, kind):
    folder, adapter = tiny
    args = {"path": str(folder), "int8": True} if kind == "int8" else {"path": str(adapter)}
    jx = get_model("jaxgpt")(**args)
    lm = load_for_inference(folder, int8=True) if kind == "int8" else jaxgpt.load(adapter)
    assert lm.is_int8 == (kind == "int8") and jx.lm.is_int8 == lm.is_int8
    pairs = [("The quick brown", " fox jumps"), ("To be, or not", " to be"), ("Hello", " world!")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    for (ll, greedy), (c, x) in zip(jx.loglikelihood(reqs, disable_tqdm=True), pairs):
        ids = lm.encode(c + x)
        want = reference_loglikelihood(lm, ids[:len(lm.encode(c))], ids[len(lm.encode(c)):])
        assert abs(ll - want[0]) <= 1e-4 and greedy == want[1]
    gen = [Instance("generate_until", {}, (p, {"max_gen_toks": 6, "until": []}), 0) for p, _ in pairs[:2]]
    got = jx.generate_until(gen, disable_tqdm=True)
    assert got == [lm.tokenizer.decode(greedy_reference(lm, lm.encode(p), 6)) for p, _ in pairs[:2]]


# ---- the server route: local-completions ------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from jaxgpt.serve.app import build_service, create_app
    from test_serve import Server

    folder, adapter = tiny
    service = build_service(str(folder), [("a", str(adapter))], max_batch=2, warmup=False, log=lambda s: None)
    srv = Server(create_app(service))
    yield srv
    srv.close()
    service.scheduler.stop()


@pytest.mark.slow
def test_local_completions_equal_the_jaxgpt_and_hf_models(server, tiny, task_manager):
    """The harness's local-completions model on the server (its remote tokenizer auto-detected:
    nothing from the hub) == the jaxgpt and hf models with the same windows (the API model keeps
    max_length - 1 tokens for the prompt and one for the new token, so theirs is max_length - 2)."""
    folder, _ = tiny
    api = get_model("local-completions")(base_url=server.url + "/v1/completions", model="hf",
                                         max_length=CTX, batch_size=4, tokenizer_backend="auto")
    assert api.tokenizer_backend == "remote" and api.prefix_token_id == 50256
    got = evaluate(api, task_manager, limit=4)
    for ref in (get_model("jaxgpt")(path=str(folder), max_length=CTX - 2),
                get_model("hf")(pretrained=str(folder), device="cpu", batch_size=8, max_length=CTX - 2)):
        want = evaluate(ref, task_manager, limit=4)
        diffs = []
        for (_, a), (_, b) in zip(responses(want, "jaxgpt_hellaswag"), responses(got, "jaxgpt_hellaswag")):
            diffs += [abs(x[0] - y[0]) for x, y in zip(a, b)]
            assert [x[1] for x in a] == [y[1] for y in b]
        assert len(diffs) == 4 * 4 and max(diffs) <= 1e-4, (type(ref).__name__, max(diffs))
        for (_, a), (_, b) in zip(responses(want, "jaxgpt_shakespeare"), responses(got, "jaxgpt_shakespeare")):
            assert abs(a[0] - b[0]) <= 1e-6 * abs(a[0]), (a, b)
        assert [r for _, r in responses(want, "jaxgpt_shakespeare_next")] == \
            [r for _, r in responses(got, "jaxgpt_shakespeare_next")]


# ---- the server's endpoints ---------------------------------------------------------------------
@pytest.mark.slow
def test_echo_logprobs_are_the_models(server, tiny):
    """echo + logprobs + max_tokens 0: every prompt token's logprob (the first null) and top
    alternatives == log-softmax of jaxgpt's logits; text offsets; token-id prompts; max_tokens 1
    adds the new token; a streamed echo carries the same; an adapter's prompt is scored with it."""
    folder, adapter = tiny
    lm = jaxgpt.load(folder)
    text = "Hello there, my friend. How are you today?"
    ids = lm.encode(text)
    body = {"prompt": text, "echo": True, "logprobs": 3, "max_tokens": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    c = r["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == text and c["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len(lm.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    logits = padded_logits(lm, ids)
    ref = logits - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]]) <= 1e-4
        top = lp["top_logprobs"][i]
        assert len(top) == 3 and abs(max(top.values()) - ref[i - 1].max()) <= 1e-4
    # token ids, two prompts, one new token each (the harness's request), n = 2
    body = {"prompt": [ids, ids[:5]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "n": 2}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert [len(ch["logprobs"]["tokens"]) for ch in r["choices"]] == [len(ids) + 1] * 2 + [6] * 2
    assert r["choices"][0]["logprobs"]["token_logprobs"][:-1] == lp["token_logprobs"]
    new = r["choices"][0]["logprobs"]
    assert new["text_offset"][-1] == len(text) and new["tokens"][-1] == r["choices"][0]["text"][len(text):] \
        or new["tokens"][-1] == "<|endoftext|>"
    # streamed: the echo chunk carries the prompt's logprobs
    body = {"prompt": text, "echo": True, "logprobs": 3, "max_tokens": 2, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s:
        events = [json.loads(l[6:]) for l in s.iter_lines() if l.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"] == text and first["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    assert first["logprobs"]["text_offset"] == lp["text_offset"]
    # the adapter's model scores the prompt
    merged = jaxgpt.load(adapter)
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "model": "a", "max_tokens": 0}).json()
    la = padded_logits(merged, ids)
    la = la - la.max(-1, keepdims=True) - np.log(np.exp(la - la.max(-1, keepdims=True)).sum(-1, keepdims=True))
    got = r["choices"][0]["logprobs"]["token_logprobs"][1:]
    assert np.abs(np.array(got) - la[np.arange(len(ids) - 1), ids[1:]]).max() <= 1e-4
    assert np.abs(np.array(got) - ref[np.arange(len(ids) - 1), ids[1:]]).max() > 1e-3  # not the base


@pytest.mark.slow
def test_tokenizer_routes(server):
    url = server.url
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 50256
    assert info["bos_token"] is None and info["model_max_length"] == CTX
    tok = jaxgpt.get_tokenizer("gpt2")
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello <|endoftext|> world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("Hello <|endoftext|> world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CTX
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    from jaxgpt.tokenizers import templates
    assert chat["tokens"] == tok.encode_ordinary(templates.render_prompt("alpaca", [{"role": "user", "content": "hi"}]))
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello <|endoftext|> world"}
    assert httpx.post(url + "/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    bad = [("/tokenize", {}, 400, "prompt"), ("/tokenize", {"prompt": 3}, 400, "prompt"),
           ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
           ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
           ("/detokenize", {}, 400, "tokens"), ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
           ("/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens"),
           ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
           ("/v1/completions", {"prompt": "x " * 64, "echo": True, "max_tokens": 0}, 400, "prompt")]
    for path, body, status, param in bad:
        r = httpx.post(url + path, json=body)
        err = r.json()["error"]
        assert r.status_code == status and err["param"] == param and err["message"], (path, body, r.text)
    r = httpx.post(url + "/tokenize", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    # a prompt that fills the whole context may be scored (max_tokens 0), not continued
    full = {"prompt": [5] * CTX, "echo": True, "logprobs": 0, "max_tokens": 0}
    assert len(httpx.post(url + "/v1/completions", json=full, timeout=60).json()["choices"][0]["logprobs"]["tokens"]) == CTX


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_the_readme_command(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "jaxgpt.harness", "--model_args", f"path={folder}",
                        "--tasks", "jaxgpt_local", "--limit", "2", "--output_path", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "jaxgpt_hellaswag" in p.stdout and "bits_per_byte" in p.stdout and "exact_match" in p.stdout
    saved = json.loads(next(out.rglob("results_*.json")).read_text())
    assert set(TASKS) <= set(saved["results"]) and saved["config"]["model"] == "jaxgpt"


@pytest.mark.slow
def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    folder, _ = tiny
    cases = [(["--model_args", f"path={folder},colour=red", "--tasks", "jaxgpt_local"], "colour"),
             (["--model_args", f"path={tmp_path / 'nope'}", "--tasks", "jaxgpt_local"], "no such file"),
             (["--model_args", "int8=True", "--tasks", "jaxgpt_local"], "path=CKPT"),
             (["--model_args", f"path={folder}"], "--tasks"),
             (["--model_args", f"path={folder}", "--tasks", "no_such_task"], "no_such_task")]
    for argv, needle in cases:
        assert harness_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)
    for bad, needle in [({"path": str(folder), "max_length": CTX + 1}, "longer than the model's context"),
                        ({"path": str(folder), "batch_size": "many"}, "batch_size"),
                        ({"path": str(folder), "int8": "yes"}, "int8")]:
        with pytest.raises(ConfigError, match=needle):
            get_model("jaxgpt")(**bad)
    assert harness_cli.main(["--help"]) == 0 and "--model_args" in capsys.readouterr().out
