"""DPO (jaxgpt.dpo): the losses and metrics against an independent numpy implementation (fast),
and against TRL's DPOTrainer on the same tiny HF GPT-2, reference and data (slow): evaluation
metrics for sigmoid / ipo / hinge and one optimizer step."""

import json

import numpy as np
import pytest
import torch
import transformers

import jaxgpt
from jaxgpt.training import dpo
from jaxgpt.config import ConfigError
from jaxgpt.tokenizers.tokenizer import get_tokenizer

from conftest import REPO, run_cli

torch.set_num_threads(2)
TOK = get_tokenizer("gpt2")
RECORDS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin, I think."},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Name a colour:", "chosen": " blue", "rejected": " the number seven"},
    {"prompt": "Say hello.", "chosen": " Hello!", "rejected": " Goodbye forever."},
    {"prompt": "Water freezes at", "chosen": " 0 degrees Celsius.", "rejected": " 50 degrees."},
    {"prompt": "The opposite of hot is", "chosen": " cold", "rejected": " purple"},
    {"prompt": "A cat says", "chosen": " meow", "rejected": " woof woof"},
    {"prompt": "The sun rises in the", "chosen": " east", "rejected": " west, usually"},
]


def np_log_sigmoid(x):
    return -np.logaddexp(0, -x)


def np_dpo(pol, ref, lengths, beta, loss):
    """Independent reference: per-pair losses and TRL's metrics, in numpy."""
    rc, rr = pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1]
    if loss == "sigmoid":
        per = -np_log_sigmoid(beta * (rc - rr))
    elif loss == "hinge":
        per = np.maximum(0, 1 - beta * (rc - rr))
    else:
        per = (rc / lengths[:, 0] - rr / lengths[:, 1] - 1 / (2 * beta)) ** 2
    return per, {"rewards/chosen": beta * rc, "rewards/rejected": beta * rr,
                 "rewards/accuracies": (beta * rc > beta * rr).astype(float),
                 "rewards/margins": beta * (rc - rr), "logps/chosen": pol[:, 0], "logps/rejected": pol[:, 1]}


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_dpo_terms_match_numpy(loss):
    rng = np.random.default_rng(0)
    pol, ref = -rng.uniform(1, 30, (16, 2)), -rng.uniform(1, 30, (16, 2))
    lengths = rng.integers(1, 20, (16, 2)).astype(float)
    per, metrics = dpo.dpo_terms(pol, ref, lengths, 0.3, loss)
    want, want_m = np_dpo(pol, ref, lengths, 0.3, loss)
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-5, atol=1e-6)
    for k in dpo.METRICS:
        np.testing.assert_allclose(np.asarray(metrics[k]), want_m[k], rtol=1e-5, atol=1e-6)


def tiny_model(seed):
    from flax import nnx
    from jaxgpt.config import GPTConfig
    from jaxgpt.model.gpt import GPT
    return GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32),
               rngs=nnx.Rngs(seed))


@pytest.mark.slow
def test_dpo_loss_on_a_model_matches_numpy_log_softmax():
    """make_loss on a tiny model: sums over completion tokens only, the mean over real pairs."""
    pol, ref = tiny_model(0), tiny_model(1)
    pairs = [dpo.encode_pair(TOK, "none", r, 63, f"record {i}") for i, r in enumerate(RECORDS[:3])]
    dpo.attach_ref(ref, pairs, 4, TOK.eot_token)
    b = dpo.collate_pairs(pairs, TOK.eot_token, 32, rows=4)  # one filler row
    total, n, extras = dpo.make_loss(0.5, "sigmoid")(pol, b)

    def np_logps(model, enc):  # full logits, numpy log-softmax, completion tokens only
        ids = np.asarray(enc.ids)
        logits = np.asarray(model(ids[None, :-1])[0][0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        return sum(logp[t, ids[t + 1]] for t in range(enc.n_prompt - 1, len(ids) - 1))

    P = np.array([[np_logps(pol, p.chosen), np_logps(pol, p.rejected)] for p in pairs])
    R = np.array([[np_logps(ref, p.chosen), np_logps(ref, p.rejected)] for p in pairs])
    np.testing.assert_allclose(np.array([p.ref for p in pairs]), R, rtol=1e-5)
    per, m = np_dpo(P, R, None, 0.5, "sigmoid")
    assert float(n) == 3
    np.testing.assert_allclose(float(total) / 3, per.mean(), rtol=1e-5)
    for k in dpo.METRICS:
        np.testing.assert_allclose(float(extras[k][0]) / float(extras[k][1]), m[k].mean(), rtol=1e-5, atol=1e-6)


def test_encode_pair_is_trls_and_bad_records_name_themselves():
    p = dpo.encode_pair(TOK, "none", RECORDS[0], 63, "r")
    assert p.chosen.ids == TOK.encode_ordinary(RECORDS[0]["prompt"] + RECORDS[0]["chosen"]) + [TOK.eot_token]
    assert p.chosen.n_prompt == len(TOK.encode_ordinary(RECORDS[0]["prompt"]))
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    c = dpo.encode_pair(TOK, "chatml", chat, 63, "r")
    assert TOK.decode(c.chosen.ids[:c.chosen.n_prompt]).endswith("<|im_start|>assistant\n")
    for bad, msg in [({"prompt": "a", "chosen": "b"}, "field 'rejected' is missing"),
                     ({"prompt": "a", "chosen": " ", "rejected": "c"}, "field 'chosen' is an empty completion"),
                     ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' must be text")]:
        with pytest.raises(ConfigError, match=f"data.jsonl record 7: {msg}"):
            dpo.encode_pair(TOK, "none", bad, 63, "data.jsonl record 7")


# ---- against TRL (slow) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Policy and a different reference: tiny random HF GPT-2s with the GPT-2 tokenizer files."""
    root = tmp_path_factory.mktemp("dpo")
    assets = REPO / "jaxgpt" / "assets" / "gpt2"
    dirs = []
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
        hf.save_pretrained(root / name)
        (root / name / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
        (root / name / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
        dirs.append(root / name)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return (*dirs, data)


def trl_trainer(policy, ref, data, loss, beta, out, **kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(policy)
    tok.pad_token = tok.eos_token
    ds = Dataset.from_list([json.loads(l) for l in data.read_text().splitlines()])
    args = DPOConfig(output_dir=str(out), beta=beta, loss_type=[loss], per_device_eval_batch_size=4,
                     per_device_train_batch_size=8, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                     dataset_num_proc=None, **kw)
    return DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(policy),
                      ref_model=transformers.AutoModelForCausalLM.from_pretrained(ref),
                      args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_eval_matches_trl(models, loss, tmp_path):
    policy, ref, data = models
    r = run_cli("jaxgpt.dpo", policy, "--ref", ref, "--data", data, "--out", tmp_path / "o",
                "--loss", loss, "--beta", "0.2", "--batch-size", "4", "--max-iters", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    want = trl_trainer(policy, ref, data, loss, 0.2, tmp_path / "trl").evaluate()
    for k in ("eval_loss", *("eval_" + m for m in dpo.METRICS)):
        assert abs(row[k] - want[k]) <= 1e-4, (k, row[k], want[k])


@pytest.mark.slow
def test_dpo_one_step_matches_trl(models, tmp_path):
    """One AdamW step (lr 1e-3, no warmup, decay or clipping) of full DPO: the same weights."""
    policy, ref, data = models
    r = run_cli("jaxgpt.dpo", policy, "--ref", ref, "--data", data, "--out", tmp_path / "o", "--lr", "1e-3",
                "--batch-size", "8", "--max-iters", "1", "--grad-clip", "0", "--beta", "0.2", "--no-progress")
    assert r.returncode == 0, r.stderr
    train = [x for x in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) if "train_loss" in x]
    assert "pairs_per_s" in train[-1] and "tokens_per_s" not in train[-1]  # (the loss is a mean over pairs)
    trl = trl_trainer(policy, ref, data, "sigmoid", 0.2, tmp_path / "trl", learning_rate=1e-3, max_steps=1,
                      lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, adam_beta2=0.999)
    trl.train()
    trl.model.save_pretrained(tmp_path / "trl_model")
    before = jaxgpt.load(policy).params
    mine, theirs = jaxgpt.load(tmp_path / "o").params, jaxgpt.load(tmp_path / "trl_model").params
    import jax
    d_mine = jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), mine, before))
    d_trl = jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), theirs, before))
    num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(d_mine, d_trl))
    den = sum(float(np.sum(b ** 2)) for b in d_trl)
    assert den > 0 and (num / den) ** 0.5 < 1e-3, (num / den) ** 0.5
    assert max(float(np.abs(a - b).max()) for a, b in zip(d_mine, d_trl)) < 1e-4


@pytest.mark.slow
def test_dpo_bad_input_one_line_nothing_written(models, tmp_path):
    policy, _, _ = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    r = run_cli("jaxgpt.dpo", policy, "--data", bad, "--out", tmp_path / "o", "--no-progress")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: bad.jsonl record 1: field 'rejected' is missing"], r.stderr
    assert not (tmp_path / "o").exists()
