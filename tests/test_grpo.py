"""GRPO (jaxgpt.grpo): advantages and the loss against independent numpy (fast), seeded rollouts
through the Engine, reward-function errors; the loss and gradient and one optimizer step against
TRL's GRPOTrainer on a tiny HF GPT-2 (slow); the CLI end to end and its bad input (slow)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxgpt
from jaxgpt.training import grpo
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.tokenizers.tokenizer import get_tokenizer

from conftest import REPO, run_cli

torch.set_num_threads(2)
TOK = get_tokenizer("gpt2")


def np_advantages(rewards, weights, G, scale=True):
    total = (rewards * np.asarray(weights)[None]).sum(1)
    g = total.reshape(-1, G)
    adv = (g - g.mean(1, keepdims=True))
    if scale:
        adv = adv / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1), total


def test_advantages_match_numpy_and_skip_none():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(12, 2))
    adv, total = grpo.advantages(r, [1.0, 0.5], 4)
    want, want_total = np_advantages(r, [1.0, 0.5], 4)
    np.testing.assert_allclose(adv, want, rtol=1e-10)
    np.testing.assert_allclose(total, want_total)
    np.testing.assert_allclose(grpo.advantages(r, [1, 1], 4, "none")[0], np_advantages(r, [1, 1], 4, False)[0])
    r[0] = np.nan  # every function skipped row 0: reward NaN, advantage 0, out of its group's baseline
    adv, total = grpo.advantages(r, [1.0, 1.0], 4)
    assert adv[0] == 0 and np.isnan(total[0])
    g = r[1:4].sum(1)
    np.testing.assert_allclose(adv[1:4], (g - g.mean()) / (g.std(ddof=1) + 1e-4))


def np_grpo(logp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_new):
    ratio = np.exp(logp - old)
    A = adv[:, None]
    per = -np.minimum(ratio * A, np.clip(ratio, 1 - eps, 1 + eps_high) * A)
    if beta:
        per = per + beta * ratio * (np.exp(ref - logp) - (ref - logp) - 1)
    if loss_type == "grpo":
        return ((per * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == "dr_grpo":
        return (per * mask).sum() / (mask.shape[0] * max_new)
    return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_terms_match_numpy(loss_type, beta):
    rng = np.random.default_rng(1)
    logp, ref = -rng.uniform(0, 5, (6, 10)), -rng.uniform(0, 5, (6, 10))
    old = logp + rng.normal(0, 0.3, logp.shape)  # ratios past the clip range both ways
    adv = rng.normal(size=6)
    mask = (rng.uniform(size=(6, 10)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    total, count, extras = grpo.grpo_terms(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                           jnp.asarray(mask), epsilon=0.2, epsilon_high=0.28, beta=beta,
                                           loss_type=loss_type, max_new=12)
    want = np_grpo(logp, old, ref, adv, mask, 0.2, 0.28, beta, loss_type, 12)
    np.testing.assert_allclose(float(total / count), want, rtol=1e-5)
    ratio = np.exp(logp - old)
    region = ((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.28) & (adv[:, None] > 0))
    s, c = extras["clip_ratio/region_mean"]
    np.testing.assert_allclose(float(s / c), (region * mask).sum() / mask.sum(), rtol=1e-6)
    assert 0 < float(s / c) < 1
    if beta:
        kl = ratio * (np.exp(ref - logp) - (ref - logp) - 1)
        np.testing.assert_allclose(float(extras["kl"][0] / extras["kl"][1]), (kl * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.slow  # (compiles the engine for two slot counts)
def test_rollouts_are_seeded_per_row_through_the_engine():
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32), rngs=nnx.Rngs(0))
    cfg = grpo.GRPOConfig(group_size=3, max_new_tokens=6, temperature=1.0, seed=5)
    prompts = [grpo.Prompt(TOK.encode_ordinary("Hello there"), "Hello there", {}, False),
               grpo.Prompt(TOK.encode_ordinary("A longer prompt than that"), "x", {}, False)]
    a, _ = grpo.rollout(model, prompts, 3, cfg, step=7, eot=TOK.eot_token)
    b, _ = grpo.rollout(model, prompts[1:], 3, cfg, step=7, eot=TOK.eot_token)  # other slots, same rows?
    c, _ = grpo.rollout(model, prompts, 3, cfg, step=8, eot=TOK.eot_token)
    assert len(a) == 6 and all(len(t) == 6 for t in a)
    assert len({tuple(t) for t in a[:3]}) == 3  # the group's rows differ
    assert a != c  # another step, other draws
    # row r's stream is (seed, step, r): prompt 1 alone in rows 0-2 draws what rows 0-2 drew for prompt 0's seeds
    d, _ = grpo.rollout(model, [prompts[0]], 3, cfg, step=7, eot=TOK.eot_token)
    assert d == a[:3] and b != a[3:]


def reward_fixture_module(tmp_path):
    (tmp_path / "rw.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
        "def boom(prompts, completions, **kw):\n    raise ValueError('bad answer key')\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def answer(prompts, completions, answer, **kw):\n"
        "    return [float(a in c) for a, c in zip(answer, completions)]\n")
    return tmp_path / "rw.py"


def test_reward_functions_load_and_bad_ones_are_named(tmp_path):
    path = reward_fixture_module(tmp_path)
    fns = grpo.load_rewards(f"{path}:length,{path}:answer", "1,0.5")
    assert [f.name for f in fns] == ["length", "answer"] and [f.weight for f in fns] == [1.0, 0.5]
    r = grpo.score(fns, ["p", "p"], ["abc", "x42"], [[1], [2]], {"answer": ["42", "42"]})
    np.testing.assert_array_equal(r, [[3, 0], [3, 1]])
    for name, msg in [("boom", "raised ValueError: bad answer key"), ("nan", "returned nan for completion 0"),
                      ("short", "returned 1 values for 2 completions")]:
        with pytest.raises(ConfigError, match=f"reward function {path}:{name} {msg}"):
            grpo.score(grpo.load_rewards(f"{path}:{name}", None), ["p", "p"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(ConfigError, match="--reward no_such_mod:f: cannot import no_such_mod"):
        grpo.load_rewards("no_such_mod:f", None)
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        grpo.load_rewards(f"{path}:nope", None)


# ---- against TRL (slow) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    hf.save_pretrained(root / "policy")
    assets = REPO / "jaxgpt" / "assets" / "gpt2"
    (root / "policy" / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
    (root / "policy" / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
    return root / "policy"


def fixed_rollouts(G=3, P=5, C=7, n_prompts=2):
    """Fixed prompts (equal lengths: no left padding) and completions (some ended early), rewards."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 50000, (n_prompts, P)).repeat(G, 0)
    comp = rng.integers(0, 50000, (n_prompts * G, C))
    cmask = np.ones_like(comp)
    for r, n in enumerate([7, 3, 5, 1, 6, 2][:n_prompts * G]):
        cmask[r, n:] = 0
        comp[r, n:] = TOK.eot_token
    rewards = rng.normal(size=(n_prompts * G, 1))
    return prompt, comp, cmask, rewards


def trl_grpo(policy, tmp, G, rows, C, **kw):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(policy)
    tok.pad_token = tok.eos_token
    args = GRPOConfig(output_dir=str(tmp), num_generations=G, per_device_train_batch_size=rows,
                      max_completion_length=C, report_to=[], use_cpu=True, save_strategy="no", bf16=False, **kw)
    ds = Dataset.from_list([{"prompt": f"p{i}"} for i in range(rows)])
    return GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(policy),
                       reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                       args=args, train_dataset=ds, processing_class=tok)


def trl_inputs(prompt, comp, cmask, adv, old=None, ref=None):
    d = {"prompt_ids": torch.tensor(prompt), "prompt_mask": torch.ones(prompt.shape, dtype=torch.long),
         "completion_ids": torch.tensor(comp), "completion_mask": torch.tensor(cmask),
         "advantages": torch.tensor(adv, dtype=torch.float32),
         "num_items_in_batch": torch.tensor(float(cmask.sum()))}
    if old is not None:
        d["old_per_token_logps"] = torch.tensor(old, dtype=torch.float32)
    if ref is not None:
        d["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float32)
    return d


def jax_batch(prompt, comp, cmask, adv, old=None, ref=None):
    """The same rollouts as jaxgpt.grpo's arrays: targets of completion token j at P - 1 + j."""
    ids = np.concatenate([prompt, comp], 1)
    P, C = prompt.shape[1], comp.shape[1]
    T = ids.shape[1] - 1
    mask = np.zeros((len(ids), T), np.float32)
    mask[:, P - 1:] = cmask
    b = {"x": ids[:, :-1].astype(np.int32), "y": ids[:, 1:].astype(np.int32), "mask": mask,
         "adv": np.asarray(adv, np.float32)}
    for k, v in (("old_logp", old), ("ref_logp", ref)):
        if v is not None:
            full = np.zeros((len(ids), T), np.float32)
            full[:, P - 1:] = v
            b[k] = full
    return b


def hf_grads_as_jaxgpt(hf_model, cfg):
    from jaxgpt.formats.hf import model_from_tensors
    tensors = {n: p.grad.detach().numpy().copy() for n, p in hf_model.named_parameters()}
    return nnx.state(model_from_tensors(cfg, tensors, "grads"), nnx.Param)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta,clip", [("dapo", 0.0, False), ("grpo", 0.04, True), ("dr_grpo", 0.04, True)])
def test_grpo_loss_and_gradient_match_trl(hf_policy, tmp_path, loss_type, beta, clip):
    G, C = 3, 7
    prompt, comp, cmask, rewards = fixed_rollouts(G, C=C)
    adv, _ = grpo.advantages(rewards, [1.0], G)
    rng = np.random.default_rng(4)
    old = (-rng.uniform(5, 15, comp.shape)) if clip else None  # far from the policy: clipping happens
    ref = (-rng.uniform(5, 15, comp.shape)) if beta else None
    trl = trl_grpo(hf_policy, tmp_path, G, len(comp), C, loss_type=loss_type, beta=beta, temperature=0.7)
    trl.model.eval()
    loss_t = trl._compute_loss(trl.model, trl_inputs(prompt, comp, cmask, adv, old, ref))
    loss_t.backward()

    lm = jaxgpt.load(hf_policy)
    cfg = grpo.GRPOConfig(loss_type=loss_type, beta=beta, temperature=0.7, max_new_tokens=C, group_size=G)
    loss_fn = grpo.make_loss(cfg)
    graphdef, params, rest = nnx.split(lm.model, nnx.Param, ...)
    batch = jax_batch(prompt, comp, cmask, adv, old, ref)

    def mean_loss(p):
        total, count, _ = loss_fn(nnx.merge(graphdef, p, rest), batch)
        return total / count

    loss_j, grads = jax.value_and_grad(mean_loss)(params)
    assert abs(float(loss_j) - float(loss_t)) <= 1e-4, (float(loss_j), float(loss_t))
    want = hf_grads_as_jaxgpt(trl.model, lm.config)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, want))
    scale = max(jax.tree.leaves(jax.tree.map(lambda b: float(jnp.max(jnp.abs(b))), want)))
    assert scale > 0 and max(diffs) <= 1e-4 and max(diffs) <= 1e-2 * scale, (max(diffs), scale)


@pytest.mark.slow
def test_grpo_one_step_matches_trl(hf_policy, tmp_path):
    """One AdamW step (lr 1e-3, constant, no clipping or decay) on the same rollouts: the same weights."""
    from jaxgpt.training.trainer import Trainer
    from jaxgpt import parallel
    G, C = 3, 7
    prompt, comp, cmask, rewards = fixed_rollouts(G, C=C)
    adv, _ = grpo.advantages(rewards, [1.0], G)
    trl = trl_grpo(hf_policy, tmp_path, G, len(comp), C, loss_type="dapo", beta=0.0, learning_rate=1e-3,
                   max_steps=1, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                   adam_beta2=0.999, temperature=1.0)
    trl._generate_and_score_completions = lambda batch: trl_inputs(prompt, comp, cmask, adv)
    trl.train()

    lm = jaxgpt.load(hf_policy)
    before = nnx.state(lm.model, nnx.Param)
    cfg = grpo.GRPOConfig(out=str(tmp_path / "o"), lr=1e-3, grad_clip=0.0, max_iters=1, group_size=G,
                          batch_size=2, max_new_tokens=C, progress=False)
    trainer = Trainer(nnx.clone(lm.model), optim=cfg.__class__(**{**cfg.__dict__, "batch_size": cfg.rows}),
                      run=cfg, total_steps=1, mesh=parallel.make_mesh(""), meta={"kind": "grpo"},
                      loss_fn=grpo.make_loss(cfg))
    trainer._call({k: v[None] for k, v in jax_batch(prompt, comp, cmask, adv).items()}, 1)
    mine = nnx.state(trainer.model(), nnx.Param)
    from jaxgpt.formats.hf import model_from_tensors
    theirs = nnx.state(model_from_tensors(lm.config, {n: p.detach().numpy() for n, p in trl.model.named_parameters()},
                                          "trl"), nnx.Param)
    d_mine = jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), mine, before))
    d_trl = jax.tree.leaves(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), theirs, before))
    num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(d_mine, d_trl))
    den = sum(float(np.sum(b ** 2)) for b in d_trl)
    assert den > 0 and (num / den) ** 0.5 < 1e-3, (num / den) ** 0.5


# ---- the CLI (slow) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_grpo_cli_rows_and_bad_input(hf_policy, tmp_path):
    rw = reward_fixture_module(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}:", "answer": str(i)}) + "\n" for i in range(4)))
    out = tmp_path / "o"
    r = run_cli("jaxgpt.grpo", hf_policy, "--prompts", prompts, "--reward", f"{rw}:length,{rw}:answer",
                "--reward-weights", "0.1,1", "--out", out, "--max-iters", "2", "--batch-size", "2",
                "--group-size", "3", "--max-new-tokens", "5", "--eval-prompts", prompts, "--beta", "0.04",
                "--lr", "1e-3", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if "train_loss" in x and "reward" in x]
    assert len(train) == 2
    for k in ("loss", "reward", "reward_std", "kl", "clip_ratio/region_mean", "completions/mean_length",
              "rewards/length/mean", "rewards/answer/mean", "rollout_tokens_per_s", "clip_ratio",
              "rewards/length", "rewards/answer"):  # (TRL 1.16's names and the short ones)
        assert k in train[0], k
    assert train[0]["clip_ratio"] == train[0]["clip_ratio/region_mean"]
    assert train[0]["rewards/answer"] == train[0]["rewards/answer/mean"]
    assert train[0]["completions/mean_length"] <= 5 and train[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert [x["step"] for x in rows if "eval_reward" in x] == [0, 2]
    assert len((out / "eval_completions.jsonl").read_text().splitlines()) == 4
    for spec, msg in [(f"{rw}:boom", f"error: reward function {rw}:boom raised ValueError: bad answer key"),
                      (f"{rw}:nan", f"error: reward function {rw}:nan returned nan for completion 0"),
                      (f"{rw}:short", f"error: reward function {rw}:short returned 1 values for 6 completions"),
                      ("nosuchmodule:f", "error: --reward nosuchmodule:f: cannot import nosuchmodule: "
                                         "ModuleNotFoundError: No module named 'nosuchmodule'")]:
        bad_out = tmp_path / "bad"
        r = run_cli("jaxgpt.grpo", hf_policy, "--prompts", prompts, "--reward", spec, "--out", bad_out,
                    "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "4", "--no-progress")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [msg], r.stderr
        assert not bad_out.exists()
    prompts.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    r = run_cli("jaxgpt.grpo", hf_policy, "--prompts", prompts, "--reward", f"{rw}:length", "--out", tmp_path / "b2",
                "--max-new-tokens", "4", "--no-progress")
    assert r.returncode == 2 and r.stderr.strip() == "error: p.jsonl record 1: field 'prompt' is missing"
