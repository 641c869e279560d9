"""Group relative policy optimisation (RL with verifiable rewards) on the one trainer and the one
decode Engine; `python -m jaxgpt.grpo`.

    python -m jaxgpt.grpo smollm2 --prompts math.jsonl --reward rewards.py:exact --out grpo_out --lora-rank 8

Each optimizer step takes `--batch-size` prompts (records `{"prompt": text or chat messages, ...
other columns}`, TRL's formats), samples `--group-size` completions of each through
jaxgpt.decode.engine.Engine (all B x G rows in its slots at once, a seed per row that is a function of
(seed, step, row), so a resumed run draws the same completions), scores them with the reward
functions (TRL's signature: `f(prompts, completions, completion_ids, **columns) -> list[float |
None]`; several, weighted; None = not applicable), and turns the weighted sum into advantages
normalised within each group: A = (r - mean_group) / (std_group + 1e-4) (`--scale-rewards none`:
not divided). The loss is TRL's GRPOTrainer's, per completion token t (logits / temperature):

    ratio = exp(logp_t - old_t),  l_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A)
            + beta ratio (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)  (the KL term if --beta > 0;
                                   times the ratio: TRL's use_bias_correction_kl, --no-kl-correction)

with old = logp (detached: one update per batch of rollouts, TRL's num_iterations=1), aggregated
by --loss-type: `grpo` the mean over completions of each one's token mean, `dapo` (TRL's
default) the mean over all completion tokens of the batch, `dr_grpo` the token sum over
(completions x --max-new-tokens). Each is a (sum, count) of the trainer's, so accumulation and
data parallelism give the same mean. Rows carry TRL's names: loss, reward, reward_std,
rewards/<function>/mean and /std, completions/mean_length, completions/clipped_ratio,
frac_reward_zero_std, kl (with --beta), clip_ratio/low_mean, /high_mean, /region_mean, the
short names rewards/<function> and clip_ratio (the means, as TRL's older rows), and
rollout_tokens_per_s; `--eval-prompts` adds eval_reward rows (greedy completions) at step 0,
every --eval-interval and at the end. The CLI is jaxgpt/cli/grpo.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.model import lora
from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError, RunConfig
from jaxgpt.files import atomic_write
from jaxgpt.decode.sampling import check_sampling
from jaxgpt.decode.steps import bucket
from jaxgpt.decode.batch import run_requests
from jaxgpt.decode.engine import Engine, Request
from jaxgpt.data.records import load_json_records
from jaxgpt.training.tuning import TuningConfig, load_base, prepare_out, trainable_model
from jaxgpt.training.trainer import Eval, Trainer, log_stderr, read_rows, resume_point, setup_devices

KIND = "grpo"
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass(frozen=True)
class GRPOConfig(TuningConfig):
    """Every setting of a GRPO run; `python -m jaxgpt.grpo` flags map onto these 1:1."""

    prompts: str | None = None  # JSON list / JSONL of {"prompt", ...columns}
    reward: str | None = None  # MODULE:FUNCTION[,MODULE:FUNCTION...]
    reward_weights: str | None = None  # comma-separated, one per function (default: all 1)
    eval_prompts: str | None = None
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None  # default: --epsilon
    beta: float = 0.0
    kl_correction: bool = True  # TRL's use_bias_correction_kl
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    # GRPO defaults of the shared fields (lr None: 1e-6 full, 1e-5 LoRA)
    batch_size: int = 4  # prompts per step
    max_iters: int | None = 50
    eval_interval: int = 25
    ckpt_interval: int = 50

    RESUMABLE = RunConfig.RESUMABLE + ("force", "eval_prompts")
    USAGE = "python -m jaxgpt.grpo BASE --prompts FILE --reward MODULE:FUNCTION --out DIR"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.temperature == 0:
            raise ConfigError("--temperature must be > 0: a group of greedy completions has no spread")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "none"):
            raise ConfigError(f"--scale-rewards must be group or none, got {self.scale_rewards!r}")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ConfigError("--epsilon and --epsilon-high must be > 0")
        if self.beta < 0:
            raise ConfigError(f"--beta must be >= 0, got {self.beta}")
        if self.steps_per_call != 1 or self.grad_accum < 1:
            raise ConfigError("GRPO takes one optimizer step per call (each step samples with the current weights)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.lora_rank else 1e-6)

    @property
    def rows(self) -> int:
        return self.batch_size * self.group_size


# ---- reward functions ----------------------------------------------------------------------------
@dataclass
class RewardFn:
    name: str  # the function's __name__ (TRL's metric name)
    spec: str  # MODULE:FUNCTION as given
    fn: object
    weight: float


def load_rewards(spec: str | None, weights: str | None) -> list[RewardFn]:
    """The reward functions named MODULE:FUNCTION (a dotted module on sys.path or the current
    folder, or a path to a .py file), comma-separated; ConfigError naming the one that does not
    import."""
    if not spec:
        raise ConfigError("--reward MODULE:FUNCTION is required (e.g. rewards.py:exact_answer)")
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    ws = [1.0] * len(specs)
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(f"--reward-weights must be numbers, got {weights!r}") from None
        if len(ws) != len(specs):
            raise ConfigError(f"--reward-weights has {len(ws)} values for {len(specs)} reward functions")
    out = []
    for s, w in zip(specs, ws):
        module, _, name = s.rpartition(":")
        if not module or not name:
            raise ConfigError(f"--reward {s}: expected MODULE:FUNCTION")
        try:
            if module.endswith(".py"):
                path = Path(module)
                if not path.is_file():
                    raise ImportError(f"no such file {module}")
                loader = importlib.util.spec_from_file_location(f"_jaxgpt_reward_{path.stem}", path)
                mod = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(mod)
            else:
                if "" not in sys.path:
                    sys.path.insert(0, "")
                mod = importlib.import_module(module)
        except Exception as e:  # any failure to import is the user's module
            raise ConfigError(f"--reward {s}: cannot import {module}: {type(e).__name__}: {e}") from None
        fn = getattr(mod, name, None)
        if not callable(fn):
            raise ConfigError(f"--reward {s}: {module} has no function {name!r}")
        out.append(RewardFn(getattr(fn, "__name__", name), s, fn, w))
    return out


def score(rewards: list[RewardFn], prompts: list, completions: list, completion_ids: list,
          columns: dict[str, list]) -> np.ndarray:
    """[N, F] rewards (NaN where a function returned None), ConfigError naming a function that
    raises, returns something other than N numbers or None, or a NaN / infinite value."""
    n = len(completions)
    out = np.zeros((n, len(rewards)), np.float64)
    for j, r in enumerate(rewards):
        try:
            vals = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise ConfigError(f"reward function {r.spec} raised {type(e).__name__}: {e}") from None
        try:
            vals = list(vals)
        except TypeError:
            raise ConfigError(f"reward function {r.spec} returned {type(vals).__name__}, not a list") from None
        if len(vals) != n:
            raise ConfigError(f"reward function {r.spec} returned {len(vals)} values for {n} completions")
        for i, v in enumerate(vals):
            if v is None:
                out[i, j] = np.nan
                continue
            try:
                out[i, j] = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"reward function {r.spec} returned {v!r} for completion {i}, not a number") from None
            if not math.isfinite(out[i, j]):
                raise ConfigError(f"reward function {r.spec} returned {v} for completion {i}")
    return out


def _nanstd(x, axis=None):  # unbiased, NaN-aware (TRL's nanstd)
    x = np.asarray(x, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=axis is not None)) ** 2, axis=axis)
        return np.sqrt(var * n / (n - 1))


def advantages(per_func: np.ndarray, weights, group: int, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages [N], total rewards [N]) from per-function rewards [N, F]: TRL's
    sum_then_normalize. Rows every function skipped get reward NaN and advantage 0."""
    w = np.asarray(weights, np.float64)
    unscorable = np.isnan(per_func).all(1)
    total = np.nansum(per_func * w[None, :], axis=1)
    total[unscorable] = np.nan
    g = total.reshape(-1, group)
    with np.errstate(invalid="ignore"):
        mean = np.repeat(np.nanmean(g, 1), group)
    std = np.repeat(_nanstd(g, 1), group)
    adv = total - mean
    if scale == "group":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0), total


# ---- prompts -------------------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]
    prompt: object  # as in the record (text or messages): what reward functions receive
    columns: dict
    chat: bool


def read_prompts(path, tok, template: str, max_prompt: int, flag: str = "--prompts") -> list[Prompt]:
    records = load_json_records(path, flag)
    name = Path(path).name
    out = []
    for i, r in enumerate(records):
        where = f"{name} record {i}"
        if not isinstance(r, dict) or "prompt" not in r:
            raise ConfigError(f"{where}: field 'prompt' is missing")
        p = r["prompt"]
        if isinstance(p, list):
            msgs = templates.to_messages({"messages": p + [{"role": "assistant", "content": ""}]}, where)[:-1]
            text = templates.render_prompt(template, msgs, getattr(tok, "chat_template", None))
        elif isinstance(p, str) and p:
            text = p
        else:
            raise ConfigError(f"{where}: field 'prompt' must be non-empty text or chat messages")
        ids = templates.encode_prompt(tok, text)
        if not 0 < len(ids) <= max_prompt:
            raise ConfigError(f"{where}: the prompt has {len(ids)} tokens; at most {max_prompt} fit "
                              f"before --max-new-tokens in the model's context")
        out.append(Prompt(ids, p, {k: v for k, v in r.items() if k != "prompt"}, isinstance(p, list)))
    return out


# ---- rollouts through the Engine -----------------------------------------------------------------
def row_seed(seed: int, step: int, row: int) -> int:
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0])


def rollout(model, prompts: list[Prompt], group: int, cfg: GRPOConfig, step: int, eot,
            greedy: bool = False) -> tuple[list[list[int]], float]:
    """`group` completions of each prompt (rows p*group .. p*group+group-1), all decoded at once in
    one Engine's slots, row r seeded by (seed, step, r). Returns (token lists, seconds)."""
    engine = Engine(model, slots=len(prompts) * group)
    reqs = []
    for p_i, p in enumerate(prompts):
        for g in range(group):
            row = p_i * group + g
            reqs.append(Request(p.ids, cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
                                top_k=None if greedy else cfg.top_k, top_p=None if greedy else cfg.top_p,
                                seed=row_seed(cfg.seed, step, row), stop=() if eot is None else (eot,)))
    t0 = time.perf_counter()
    run_requests(engine, reqs)
    return [list(r.tokens) for r in reqs], time.perf_counter() - t0


def completion_text(tok, tokens: list[int], eot) -> str:
    return tok.decode([t for t in tokens if t != eot] if eot is not None else tokens)


def scored(tok, rewards, prompts: list[Prompt], group: int, tokens, eot):
    """Per-function rewards [N, F] of the completions, called TRL's way (prompts repeated per
    completion; chat prompts get chat completions)."""
    texts = [completion_text(tok, t, eot) for t in tokens]
    rep = [p for p in prompts for _ in range(group)]
    comps = [[{"role": "assistant", "content": c}] if p.chat else c for p, c in zip(rep, texts)]
    keys = sorted({k for p in prompts for k in p.columns})
    columns = {k: [p.columns.get(k) for p in rep] for k in keys}
    return score(rewards, [p.prompt for p in rep], comps, tokens, columns), texts


# ---- batches and the loss ------------------------------------------------------------------------
def collate_rollouts(prompts: list[Prompt], group: int, tokens, adv, length: int, pad: int) -> dict:
    """{"x", "y", "mask"} int32 [N, length] (prompt + completion, the mask on completion
    targets) and "adv" float32 [N]."""
    N = len(tokens)
    x = np.full((N, length), pad, np.int32)
    y = np.full((N, length), pad, np.int32)
    mask = np.zeros((N, length), np.float32)
    for r, toks in enumerate(tokens):
        ids = np.asarray(prompts[r // group].ids + toks, np.int32)[:length + 1]
        n, P = len(ids) - 1, len(prompts[r // group].ids)
        x[r, :n], y[r, :n] = ids[:-1], ids[1:]
        mask[r, P - 1:n] = 1
    return {"x": x, "y": y, "mask": mask, "adv": np.asarray(adv, np.float32)}


def token_logps(model, x, y, temperature: float, key=None):
    """log softmax(logits / temperature)[y] per position: x, y [N, T] -> [N, T] (TRL scales the
    logits by the sampling temperature before its log-probs)."""
    N, T = x.shape
    h, _ = model(x, key=key, hidden=True)
    logits = model.head(h) / temperature
    return -optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).reshape(N, T)


_ref_token_logps = nnx.jit(token_logps, static_argnames="temperature")


def grpo_terms(logp, old, ref, adv, mask, *, epsilon: float, epsilon_high: float, beta: float,
               loss_type: str, max_new: int, kl_correction: bool = True):
    """(loss sum, count, extras) of TRL's GRPO loss from per-token log-probs logp [N, T] (old: the
    sampling policy's, ref: the reference's or None), advantages [N] and the completion mask.
    kl_correction: the KL term times the (differentiable) ratio, TRL's use_bias_correction_kl."""
    m = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old)
    A = adv[:, None]
    per = -jnp.minimum(ratio * A, jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    extras = {}
    tokens = m.sum()
    if beta:
        kl = jnp.exp(ref - logp) - (ref - logp) - 1
        if kl_correction:
            kl = kl * ratio
        per = per + beta * kl
        extras["kl"] = ((jax.lax.stop_gradient(kl) * m).sum(), tokens)
    if loss_type == "grpo":
        total = ((per * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)).sum()
        count = jnp.asarray(m.shape[0], jnp.float32)
    elif loss_type == "dr_grpo":
        total, count = (per * m).sum(), jnp.asarray(m.shape[0] * max_new, jnp.float32)
    else:  # dapo
        total, count = (per * m).sum(), tokens
    low = ((ratio < 1 - epsilon) & (A < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (A > 0)).astype(jnp.float32)
    extras.update({"loss": (jax.lax.stop_gradient(total), count),
                   "clip_ratio/low_mean": ((low * m).sum(), tokens),
                   "clip_ratio/high_mean": ((high * m).sum(), tokens),
                   "clip_ratio/region_mean": ((jnp.maximum(low, high) * m).sum(), tokens)})
    extras["clip_ratio"] = extras["clip_ratio/region_mean"]  # (the short name, as in TRL before 0.20)
    return total, count, extras


def make_loss(cfg: GRPOConfig):
    """The trainer's loss_fn over a rollout batch {"x", "y", "mask", "adv", ["ref_logp"], ["old_logp"]}."""
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    def grpo_loss(model, batch, key=None):
        logp = token_logps(model, batch["x"], batch["y"], cfg.temperature, key)
        old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
        return grpo_terms(logp, old, batch.get("ref_logp"), batch["adv"], batch["mask"],
                          epsilon=cfg.epsilon, epsilon_high=eps_high, beta=cfg.beta,
                          loss_type=cfg.loss_type, max_new=cfg.max_new_tokens,
                          kl_correction=cfg.kl_correction)

    grpo_loss.counts = "completions" if cfg.loss_type == "grpo" else "tokens"  # (the loss's denominator)
    return grpo_loss


# ---- the run -------------------------------------------------------------------------------------
class Rollouts:
    """The batch_fn of GRPO: step s's prompts (a seeded permutation per epoch, as SFT's order),
    their completions from the trainer's current weights, rewards, advantages, arrays; and the
    step's metrics for its training row."""

    def __init__(self, cfg: GRPOConfig, trainer, lm, prompts, rewards, ref_model):
        self.cfg, self.trainer, self.tok, self.prompts = cfg, trainer, lm.tokenizer, prompts
        self.rewards, self.ref_model = rewards, ref_model
        self.eot = lm.tokenizer.eot_token
        self.pad = self.eot if self.eot is not None else 0
        self.cap = lm.config.block_size
        self.stats: dict[int, dict] = {}
        self.rollout_time, self.rollout_tokens = 0.0, 0

    def policy(self):
        model = self.trainer.host_model()
        return lora.merge(model) if self.cfg.lora_rank else model

    def step_prompts(self, step: int) -> list[Prompt]:
        B, n = self.cfg.batch_size, len(self.prompts)
        per_epoch = max(n // B, 1)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        return [self.prompts[order[(i * B + k) % n]] for k in range(B)]

    def __call__(self, steps: range) -> dict:
        (s,) = steps  # one step per call: each step samples with the weights the last one left
        cfg, G = self.cfg, self.cfg.group_size
        prompts = self.step_prompts(s)
        tokens, secs = rollout(self.policy(), prompts, G, cfg, s, self.eot)
        per_func, texts = scored(self.tok, self.rewards, prompts, G, tokens, self.eot)
        adv, total = advantages(per_func, [r.weight for r in self.rewards], G, cfg.scale_rewards)
        n_tok = sum(map(len, tokens))
        self.rollout_time += secs
        self.rollout_tokens += n_tok
        length = bucket(max(len(p.ids) for p in prompts) + max(map(len, tokens)) - 1, self.cap)
        batch = collate_rollouts(prompts, G, tokens, adv, length, self.pad)
        if cfg.beta:
            batch["ref_logp"] = np.asarray(_ref_token_logps(self.ref_model, batch["x"], batch["y"],
                                                            cfg.temperature))
        with np.errstate(invalid="ignore"):
            stats = {"reward": float(np.nanmean(total)), "reward_std": float(_nanstd(total)),
                     "frac_reward_zero_std": float(np.mean(np.isclose(_nanstd(total.reshape(-1, G), 1), 0))),
                     "completions/mean_length": n_tok / len(tokens),
                     "completions/clipped_ratio": float(np.mean([self.eot not in t for t in tokens])),
                     "rollout_tokens_per_s": round(n_tok / secs, 1)}
            for j, r in enumerate(self.rewards):
                stats[f"rewards/{r.name}/mean"] = float(np.nanmean(per_func[:, j]))
                stats[f"rewards/{r.name}/std"] = float(_nanstd(per_func[:, j]))
                stats[f"rewards/{r.name}"] = stats[f"rewards/{r.name}/mean"]  # (the short name)
        self.stats[s] = {**stats, "sample": texts[0]}
        rows = self.trainer.local_rows
        return {k: v[rows][None] for k, v in batch.items()}

    def row(self, step: int) -> dict:
        return {k: v for k, v in self.stats.get(step - 1, {}).items() if k != "sample"}

    def evaluate(self, held: list[Prompt], step: int) -> tuple[dict, list[str]]:
        """Greedy completions of the held-out prompts (one each) and their rewards."""
        tokens, _ = rollout(self.policy(), held, 1, self.cfg, step, self.eot, greedy=True)
        per_func, texts = scored(self.tok, self.rewards, held, 1, tokens, self.eot)
        total = np.nansum(per_func * np.asarray([r.weight for r in self.rewards])[None], axis=1)
        out = {"eval_reward": float(np.mean(total))}
        for j, r in enumerate(self.rewards):
            out[f"eval_rewards/{r.name}/mean"] = float(np.nanmean(per_func[:, j]))
        return out, texts


def run_grpo(cfg: GRPOConfig, log=log_stderr) -> dict:
    """Train as `cfg` says; writes cfg.out (checkpoints, metrics.jsonl, the adapter of a LoRA run,
    eval_completions.jsonl, summary.json)."""
    if not cfg.out:
        raise ConfigError("--out DIR is required (where checkpoints, metrics and the model go)")
    cfg.check_base()
    rewards = load_rewards(cfg.reward, cfg.reward_weights)
    prepare_out(cfg)
    resume_step = resume_point(cfg, KIND, "grpo_config")[0] if cfg.resume else 0
    mesh = setup_devices(cfg)
    lm = load_base(cfg)
    tok = lm.tokenizer
    template = cfg.template or templates.default_template(lm)
    max_prompt = lm.config.block_size - cfg.max_new_tokens - 1
    if max_prompt < 1:
        raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {lm.config.block_size}")
    prompts = read_prompts(cfg.prompts, tok, template, max_prompt)
    held = read_prompts(cfg.eval_prompts, tok, template, max_prompt, "--eval-prompts") if cfg.eval_prompts else []
    # the run's first lines wait for the first step's rewards: a bad reward function is then the only line
    early = [f"{len(prompts)} prompts, {cfg.batch_size} x {cfg.group_size} completions a step; rewards "
             + ", ".join(f"{r.name} (x{r.weight:g})" for r in rewards) + f"; loss {cfg.loss_type}, beta {cfg.beta}"]
    model, wrt, adapted, n_train, n_total = trainable_model(cfg, lm.model, early.append)
    meta = {"kind": KIND, "grpo_config": cfg.to_dict(), "model_config": lm.config.to_dict(),
            "tokenizer": tok.to_dict(), "source": f"grpo of {cfg.ckpt}", "template": template}
    trainer = Trainer(model, optim=dataclasses.replace(cfg, batch_size=cfg.rows), run=cfg,
                      total_steps=cfg.max_iters, mesh=mesh, meta=meta, wrt=wrt, loss_fn=make_loss(cfg), log=log)
    out = Path(cfg.out)
    if cfg.resume:
        resume_step = trainer.restore(out, warn=trainer.log)
    data = Rollouts(cfg, trainer, lm, prompts, rewards, lm.model if cfg.beta else None)
    # the first step's rollouts before anything is written: a bad reward function stops the run here
    first = {resume_step: data(range(resume_step, resume_step + 1))} if resume_step < cfg.max_iters else {}
    for line in early:
        log(line)
    if cfg.force and not cfg.resume and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    completions = {}

    def evaluate(step):
        res, texts = data.evaluate(held, step)
        completions[step] = texts
        return res

    run = trainer.fit(lambda steps: first.pop(steps[0], None) or data(steps),
                      [Eval(cfg.eval_interval, evaluate)] if held else [], row_extras=data.row,
                      rows=read_rows(out, resume_step) if cfg.resume else None)
    evals = [r for r in run["rows"] if "eval_reward" in r]
    summary = {"steps": run["step"], "stopped_by": run["stopped_by"], "out": cfg.out,
               "before": evals[0] if evals else None, "after": evals[-1] if evals else None,
               "rollout_tokens": data.rollout_tokens, "rollout_seconds": data.rollout_time,
               "timers": run["timers"], "trainable_params": n_train, "total_params": n_total}
    if run["stopped_by"] or not trainer.main:
        return summary
    if completions:
        first_s, last_s = min(completions), max(completions)
        lines = [json.dumps({"prompt": p.prompt, **p.columns, "before": completions[first_s][i],
                             "after": completions[last_s][i]}, ensure_ascii=False) for i, p in enumerate(held)]
        atomic_write(out / "eval_completions.jsonl", ("\n".join(lines) + "\n").encode())
    if cfg.lora_rank:
        lora.write_adapter(out, trainer.host_model(), cfg.adapter_meta(
            lm.config.to_dict(), template, grpo={"prompts": str(cfg.prompts), "steps": run["step"]}))
    atomic_write(out / "summary.json", json.dumps({**summary, "config": dataclasses.asdict(cfg)},
                                                  indent=2).encode())
    return summary
