"""Instruction tuning: templates, loss masking vs transformers, LoRA, the sft/chat CLIs, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxgpt  # noqa: E402
from jaxgpt.model import lora  # noqa: E402
from jaxgpt.data import records as sft_records
from jaxgpt.evaluate import answers
from jaxgpt.training import sft
from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError, GPTConfig  # noqa: E402
from jaxgpt.losses import masked_mean  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.training.trainer import make_step  # noqa: E402
from jaxgpt.tokenizers.tokenizer import get_tokenizer  # noqa: E402

from conftest import REPO, cli, run_cli  # noqa: E402

torch.set_num_threads(2)
DATA = REPO / "experiments" / "data" / "instruction-data.json"
TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def records():
    return json.loads(DATA.read_text())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random-init HF GPT-2 (GPT-2 vocabulary, tiny body, context 256) saved with save_pretrained."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=256)).eval()
    d = tmp_path_factory.mktemp("hf") / "base"
    hf.save_pretrained(d)
    return d


# ---- templates -----------------------------------------------------------------------------------
def test_alpaca_template_is_exact():
    header = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.")
    with_input = templates.to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "r")
    assert templates.render_prompt("alpaca", with_input[:-1]) == (
        header + "\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    no_input = templates.to_messages({"instruction": "Hi.", "input": "", "output": "Hello"}, "r")
    assert templates.render_prompt("alpaca", no_input[:-1]) == header + "\n\n### Instruction:\nHi.\n\n### Response:\n"
    # the three record shapes normalise to the same messages
    assert templates.to_messages({"prompt": "Hi.", "completion": "Hello"}, "r") == no_input
    chat = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello"}]}
    assert templates.to_messages(chat, "r") == no_input
    assert templates.render_prompt("chatml", no_input[:-1]) == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


def test_collate_masks_exactly_the_reply():
    enc, status = sft_records.encode(TOK, "alpaca", {"instruction": "Say hi.", "input": "", "output": "Hi there"}, 64)
    n_reply = len(TOK.encode_ordinary("Hi there")) + 1  # + eot
    x, y, m = sft_records.collate([enc], TOK.eot_token, 64)
    assert status == "" and m.sum() == n_reply
    assert y[0][m[0] == 1].tolist() == TOK.encode_ordinary("Hi there") + [TOK.eot_token]
    _, _, m_all = sft_records.collate([enc], TOK.eot_token, 64, mask_prompt=False)
    assert m_all.sum() == len(enc.ids) - 1
    # too long: the prompt loses tokens from the left, the reply survives whole; a reply that
    # alone does not fit is skipped
    enc2, status2 = sft_records.encode(TOK, "alpaca", {"instruction": "word " * 100, "output": "ok"}, 20)
    assert status2 == "truncated" and len(enc2.ids) == 21 and enc2.ids[-2:] == [TOK.encode_ordinary("ok")[0], TOK.eot_token]
    assert sft_records.encode(TOK, "alpaca", {"instruction": "a", "output": "word " * 50}, 20) == (None, "skipped")


@pytest.mark.slow
def test_masked_loss_matches_hf_labels(hf_dir, records):
    """jaxgpt's masked batch loss == GPT2LMHeadModel's loss with labels -100 on prompt and padding."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    lm = jaxgpt.load(hf_dir)
    recs = [records[i] for i in (0, 1, 2, 5, 20)]  # unequal lengths, with and without input
    enc = [sft_records.encode(TOK, "alpaca", r, 256)[0] for r in recs]
    lengths = {len(e.ids) for e in enc}
    assert len(lengths) >= 4  # a padded batch of unequal lengths
    T = max(lengths)
    x, y, m = sft_records.collate(enc, TOK.eot_token, T - 1)
    ours = float(masked_mean(lm.model(jnp.asarray(x))[0], jnp.asarray(y), jnp.asarray(m)))
    # HF: the full sequences, right-padded, labels = ids with -100 on prompt and padding
    ids = np.full((len(enc), T), TOK.eot_token)
    labels = np.full((len(enc), T), -100)
    attn = np.zeros((len(enc), T))
    for b, e in enumerate(enc):
        ids[b, :len(e.ids)] = e.ids
        labels[b, e.n_prompt:len(e.ids)] = e.ids[e.n_prompt:]
        attn[b, :len(e.ids)] = 1
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(attn), labels=torch.tensor(labels)).loss.item()
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    # and it is the mean over tokens, not a mean of per-example means
    per_row = [float(masked_mean(lm.model(jnp.asarray(x[b:b + 1]))[0], jnp.asarray(y[b:b + 1]), jnp.asarray(m[b:b + 1])))
               for b in range(len(enc))]
    assert abs(np.mean(per_row) - ours) > 1e-4


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_param_count_identity_and_bad_targets():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
    model = GPT(cfg)
    ids = jnp.arange(12)[None]
    base_logits, _ = model(ids)
    r = 4
    adapted = lora.apply_lora(model, r, 8.0, "c_attn,c_fc")
    assert adapted == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    n_lora, _ = lora.count(model)
    C = cfg.n_embd
    # A [in, r] and B [r, out]: r * (in + out) per adapted layer
    assert n_lora == cfg.n_layer * (r * (C + 3 * C) + r * (C + 4 * C))
    assert jnp.array_equal(model(ids)[0], base_logits)  # B = 0: the adapted model is the base
    with pytest.raises(ConfigError, match="matches no layer"):
        lora.apply_lora(GPT(cfg), 4, 8.0, "q_proj")
    with pytest.raises(ConfigError, match="larger than layer"):
        lora.apply_lora(GPT(cfg), 33, 8.0, "c_attn")
    with pytest.raises(ConfigError, match=">= 1"):
        lora.apply_lora(GPT(cfg), 0, 8.0, "c_attn")


@pytest.mark.slow
def test_lora_training_freezes_base_and_merges_exactly(records):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)
    model = GPT(cfg, seed=1)
    base_state = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    lora.apply_lora(model, 4, 16.0, "c_attn,c_proj,c_fc")
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    import optax
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)
    # the optimizer holds state for the adapters only (Adam: mu and nu, each adapter-shaped)
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == 2 * n_lora
    step = make_step(graphdef, tx, lambda s: 1e-2)
    ex = [sft_records.encode(TOK, "alpaca", r, 128)[0] for r in records[:16]]
    data = sft_records.RecordBatches(ex, 8, 0, 128, TOK.eot_token, True)
    state = {"params": trainable, "opt_state": opt_state, "step": jnp.array(0, jnp.int32)}
    for s in range(2 * data.steps_per_epoch):  # two epochs: each record once per epoch
        batch = {k: v[:, None] for k, v in data(range(s, s + 1), slice(None)).items()}  # [K, A, B, T]
        for _ in range(3):
            state, m = step(state, frozen, batch)
    trained = nnx.merge(graphdef, state["params"], frozen)
    # frozen base weights are bit-identical after training; the adapters moved
    after = nnx.state(trained, nnx.Param)
    for path, v in nnx.to_flat_state(after):
        if not isinstance(v, nnx.LoRAParam):
            base_path = tuple(p for p in path if p != "base")
            want = dict(nnx.to_flat_state(base_state))[base_path]
            assert np.array_equal(np.asarray(v[...]), np.asarray(want[...])), path
    assert any(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(nnx.state(trained, nnx.LoRAParam)))
    merged = lora.merge(trained)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))  # a plain GPT again
    ids = jnp.asarray([ex[0].ids[:100]])
    diff = float(jnp.abs(merged(ids)[0] - trained(ids)[0]).max())
    assert diff <= 1e-5, diff
    assert float(jnp.abs(merged(ids)[0] - GPT(cfg, seed=1)(ids)[0]).max()) > 1e-3  # training changed it


# ---- CLIs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_cli_full_then_chat(hf_dir, tmp_path):
    """A short full SFT on the reference data lowers masked val loss and raises the fraction of
    test answers that end with <|endoftext|>; chat then answers with the saved template."""
    data = tmp_path / "data.jsonl"
    recs = json.loads(DATA.read_text())[:300]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))  # JSONL this time
    out = tmp_path / "sft"
    r = run_cli("jaxgpt.sft", hf_dir, "--data", data, "--out", out, "--max-iters", "60",
                "--lr", "2e-3", "--batch-size", "8", "--max-test", "6", "--gen-tokens", "24",
                "--eval-interval", "30", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["val_loss"] < s["before"]["val_loss"] - 0.5
    assert s["after"]["ends_with_eos"] > s["before"]["ends_with_eos"]
    for f in ("report.md", "test_generations.jsonl", "loss.png", "metrics.jsonl"):
        assert (out / f).is_file(), f
    rows = [json.loads(l) for l in (out / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"before", "after", "reference", "after_rouge_l"} <= set(rows[0])
    assert "| masked val loss" in (out / "report.md").read_text()
    lm = jaxgpt.load(out)
    assert lm.meta["template"] == "alpaca"
    # --eval-only --json on the fine-tuned model equals the report's after-loss on the same split
    r = run_cli("jaxgpt.sft", out, "--data", data, "--eval-only", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout)
    assert abs(ev["loss"] - s["after"]["val_loss"]) < 1e-5 and ev["tokens"] == s["after"]["val_tokens"]
    # chat: greedy streamed reply == greedy generation of the rendered prompt
    prompt = "Name a primary color."
    r = run_cli("jaxgpt.chat", out, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    want = answers.generate_answers(lm.model, lm.tokenizer, "alpaca",
                                [{"instruction": prompt, "output": ""}], 24)[0]["text"]
    assert r.stdout == want + "\n"
    # chat takes int8 weights (quantized on load) like sample and eval do
    r = run_cli("jaxgpt.chat", out, "--int8", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    # sample reuses the saved template (prompt + continuation on stdout), --raw does not
    r = run_cli("jaxgpt.sample", out, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == templates.render_prompt("alpaca", [{"role": "user", "content": prompt}]) + want + "\n"
    r = run_cli("jaxgpt.sample", out, "--prompt", prompt, "--raw", "--max-new-tokens", "2")
    assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr[-2000:]
    r = run_cli("jaxgpt.chat", out, "--temperature", "0", "--max-new-tokens", "8",
                input="Hi.\n/reset\nHi.\n/exit\n")
    assert r.returncode == 0 and r.stdout.count("bot> ") == 2, r.stdout + r.stderr[-1000:]
    a, b = [line.split("bot> ")[1] for line in r.stdout.split("you> ") if "bot> " in line]
    assert a == b  # /reset: the second turn saw no history


@pytest.mark.slow
def test_sft_cli_lora_adapter_and_merge(hf_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(DATA.read_text())[:120]))
    out = tmp_path / "lora"
    r = run_cli("jaxgpt.sft", hf_dir, "--data", data, "--out", out, "--lora-rank", "4",
                "--lora-targets", "c_attn,mlp.c_proj", "--max-iters", "10", "--max-test", "2",
                "--gen-tokens", "8", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable params: 4,608 of" in r.stderr  # 2 layers x (4*(64+192) + 4*(256+64))
    adapter_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    base_bytes = sum(f.stat().st_size for f in Path(hf_dir).rglob("*") if f.is_file())
    assert adapter_bytes < base_bytes / 20  # only A and B are saved
    merged = tmp_path / "merged"
    r = run_cli("jaxgpt.sft", "--merge", out, "--out", merged)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = [[50256, 464, 3290, 318, 257]]
    a, b = jaxgpt.load(out).logits(ids), jaxgpt.load(merged).logits(ids)  # adapter on base vs merged
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(a - jaxgpt.load(hf_dir).logits(ids)).max() > 1e-4  # the adapter changed the model
    # merging into a base of another shape is refused
    other = tmp_path / "other"
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32)).save_pretrained(other)
    r = run_cli("jaxgpt.sft", "--merge", out, "--base", other, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "trained on a base with" in r.stderr and not (tmp_path / "bad").exists()


ONE = '[{"instruction": "a", "output": "b"}]'
BAD = [
    ('[{"instruction": "a", "input": ""}]', [], "record 0: field 'output' is missing"),
    ("[]", [], "no records"),
    ('[{"instruction": "a", "output": "b"},\n  {"instruction": }]', [], "malformed JSON at line 2"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion"}\n', [], "malformed JSONL at line 2"),
    (ONE, ["--template", "vicuna"], "unknown template 'vicuna'"),
    (ONE, ["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (ONE, ["--lora-rank", "999"], "larger than layer"),
    (ONE, ["--lora-rank", "4", "--lora-targets", "q_proj"], "matches no layer"),
]


@pytest.mark.slow
@pytest.mark.parametrize("content,flags,message", BAD, ids=[m for _, _, m in BAD])
def test_sft_bad_input(hf_dir, tmp_path, content, flags, message):
    data = tmp_path / "d.json"
    data.write_text(content if content != ONE else json.dumps([{"instruction": "a", "output": "b"}] * 20))
    r = cli("jaxgpt.sft", hf_dir, "--data", data, "--out", tmp_path / "o", *flags)
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_rouge_and_normalize():
    assert answers.normalize("  Hello, World! ") == "hello world"
    assert answers.rouge_l("the cat sat", "the cat sat") == 1.0
    assert answers.rouge_l("a b c d", "a c") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert answers.rouge_l("x y", "a b") == 0.0


# ---- SFT on the one trainer: accumulation, devices, exact resume -------------------------------
@pytest.mark.slow
def test_accumulation_is_the_token_weighted_mean_of_the_whole_batch():
    """make_step with 2 micro-batches of unequal token counts == 1 batch of both (the gradient of
    sum / count over the global batch), and != the mean of the two micro-batch means."""
    import optax

    cfg = GPTConfig(vocab_size=61, n_layer=1, n_head=2, n_embd=16, block_size=16)
    graphdef, params, frozen = nnx.split(GPT(cfg, seed=3), nnx.Param, ...)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 61, (2, 4, 16)), rng.integers(0, 61, (2, 4, 16))
    mask = np.zeros((2, 4, 16), np.int32)
    mask[0, :, :3] = 1  # micro-batch 0: 12 counted targets
    mask[1, :, 2:] = 1  # micro-batch 1: 56
    tx = optax.sgd(1.0)
    step = make_step(graphdef, tx, lambda s: 1.0)

    def run(batch):
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                 "step": jnp.array(0, jnp.int32)}
        state, m = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(m["loss"][0]), state["params"]

    accum, p_accum = run({"x": x[None], "y": y[None], "mask": mask[None]})  # [K=1, A=2, 4, T]
    whole, p_whole = run({k: v.reshape(1, 1, 8, 16) for k, v in (("x", x), ("y", y), ("mask", mask))})
    assert abs(accum - whole) <= 1e-6
    for a, b in zip(jax.tree.leaves(p_accum), jax.tree.leaves(p_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    means = [run({k: v[i][None, None] for k, v in (("x", x), ("y", y), ("mask", mask))})[0] for i in (0, 1)]
    assert abs(np.mean(means) - whole) > 1e-4  # a mean of micro-batch means would differ (6.5e-4)


SFT_RUN = ["--max-iters", "20", "--batch-size", "4", "--lr", "2e-3", "--max-test", "2",
           "--gen-tokens", "4", "--eval-interval", "10", "--ckpt-interval", "10", "--log-interval", "2",
           "--val-frac", "0.1", "--max-length", "64", "--no-progress"]


def sft_losses(out) -> dict:
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in rows for k in ("train_loss", "val_loss") if k in r}


def final_arrays(out) -> list[np.ndarray]:
    """The fine-tuned weights (full) or adapter arrays (LoRA) a run left in `out`."""
    from jaxgpt.model import lora as lora_mod
    if lora_mod.is_adapter(out):
        import orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as c:
            return [np.asarray(a) for a in jax.tree.leaves(c.restore(Path(out).resolve() / "lora"))]
    return [np.asarray(a) for a in jax.tree.leaves(nnx.state(jaxgpt.load(out).model, nnx.Param))]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata") / "data.json"
    d.write_text(json.dumps(json.loads(DATA.read_text())[:200]))
    return d


@pytest.fixture(scope="module")
def sft_reference(hf_dir, sft_data, tmp_path_factory):
    """Uninterrupted runs, full and LoRA: {kind: out dir}."""
    outs = {}
    for kind, extra in (("full", []), ("lora", ["--lora-rank", "4"])):
        out = tmp_path_factory.mktemp(f"ref_{kind}")
        r = run_cli("jaxgpt.sft", hf_dir, "--data", sft_data, "--out", out, "--force", *SFT_RUN, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[kind] = out
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("kind,sig", [("full", signal.SIGTERM), ("full", signal.SIGKILL),
                                      ("lora", signal.SIGTERM), ("lora", signal.SIGKILL)])
def test_sft_interrupted_then_resumed_equals_uninterrupted(hf_dir, sft_data, sft_reference, tmp_path,
                                                           kind, sig):
    out = tmp_path / "run"
    extra = ["--lora-rank", "4"] if kind == "lora" else []
    cmd = [sys.executable, "-m", "jaxgpt.sft", str(hf_dir), "--data", str(sft_data), "--out", str(out),
           *SFT_RUN, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "10").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    stopped = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert stopped < 20, "the run finished before the signal; nothing was tested"
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and "--resume" in err, err[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    r = run_cli("jaxgpt.sft", *cmd[3:], "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    want, got = sft_losses(sft_reference[kind]), sft_losses(out)
    assert got.keys() == want.keys() and len(got) > 10
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-6
    for a, b in zip(final_arrays(out), final_arrays(sft_reference[kind]), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_sft_one_device_equals_four_and_fsdp(hf_dir, sft_data, sft_reference, tmp_path):
    four = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    want = sft_losses(sft_reference["full"])
    for name, flags in (("dp", []), ("fsdp", ["--mesh", "data=2,fsdp=2"])):
        out = tmp_path / name
        r = run_cli("jaxgpt.sft", hf_dir, "--data", sft_data, "--out", out, *SFT_RUN, *flags, env=four)
        assert r.returncode == 0, r.stderr[-2000:]
        got = sft_losses(out)
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) <= 1e-5, name
    # the batch must split over the 4 devices
    r = run_cli("jaxgpt.sft", hf_dir, "--data", sft_data, "--out", tmp_path / "bad", *SFT_RUN,
                "--batch-size", "6", env=four)
    assert r.returncode == 2 and "does not split over 4 devices" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_sft_grad_accum_equals_the_whole_batch(hf_dir, sft_data, sft_reference, tmp_path):
    r = run_cli("jaxgpt.sft", hf_dir, "--data", sft_data, "--out", tmp_path / "acc", *SFT_RUN,
                "--grad-accum", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    want, got = sft_losses(sft_reference["full"]), sft_losses(tmp_path / "acc")
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-5


@pytest.mark.slow
def test_sft_bad_resumes(hf_dir, sft_data, sft_reference, tmp_path, corpus):
    ref = sft_reference["full"]
    def bad(*args, msg):
        r = cli("jaxgpt.sft", *args)
        lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr[-1500:]
        assert "Traceback" not in r.stderr
    base = [hf_dir, "--data", sft_data, *SFT_RUN]
    bad(*base, "--out", tmp_path / "none", "--resume", msg="no checkpoint found")
    bad(*base, "--out", ref, msg="already exists")  # the same command again, no --resume
    bad(*base, "--out", ref, "--resume", "--lr", "0.1", msg="disagrees")
    bad(*base, "--out", ref, "--resume", "--mesh", "data=3", msg="--mesh")
    # a pretraining run is not an SFT run, and the other way round
    run = tmp_path / "pre"
    assert run_cli("jaxgpt.train", "--data", corpus, "--out", run, "--max-iters", "10",
                   "--ckpt-interval", "10", "--eval-interval", "10", "--n-layer", "1", "--n-head", "2",
                   "--n-embd", "16", "--block-size", "16", "--sample-tokens", "0",
                   "--no-progress").returncode == 0
    bad(*base, "--out", run, "--resume", msg="is a pretrain run")
    r = cli("jaxgpt.train", "--data", corpus, "--out", ref, "--resume")
    assert r.returncode == 2 and "is a sft run" in r.stderr, r.stderr[-1000:]
    # a run folder moved elsewhere resumes where it now is
    moved = tmp_path / "moved"
    shutil.copytree(ref, moved)
    r = run_cli("jaxgpt.sft", *base, "--out", moved, "--resume")
    assert r.returncode == 0, r.stderr[-1500:]
