"""Direct preference optimisation on the one trainer: preference pairs -> sequence log-probs ->
TRL's DPO losses and metrics; `python -m jaxgpt.dpo`.

    python -m jaxgpt.dpo gpt2 --data pairs.jsonl --out dpo_out                       # full
    python -m jaxgpt.dpo smollm2 --data pairs.jsonl --out dpo_lora --lora-rank 8     # LoRA
    python -m jaxgpt.dpo dpo_out --data pairs.jsonl --eval-data held.jsonl --out ev --max-iters 0

Records are TRL's two explicit-prompt formats: `{"prompt", "chosen", "rejected"}` as plain text
(prompt + completion, the end token appended, as TRL does), or as chat messages (`prompt` a list
of messages, `chosen` / `rejected` one assistant message each; the prompt rendered with the
model's template, the reply followed by its end token, as jaxgpt.sft does). As in TRL, the
completion starts where the tokens of prompt and of prompt + completion first differ.

Loss (TRL's DPOTrainer, `loss_type`): with s = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),
sums over completion tokens, `sigmoid` is -log sigmoid(beta s), `hinge` relu(1 - beta s), `ipo`
(s_c / |c| - s_r / |r| - 1 / (2 beta))^2 with each log-ratio averaged over its tokens. The metrics
are TRL's: rewards/chosen = beta (log pi(c) - log ref(c)), rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (sums), each a mean over pairs.

The reference log-probs are computed once, before training, by the reference model (`--ref`, by
default the base itself; under LoRA the base with no adapter, i.e. the model before the
adapters are attached), as TRL's `precompute_ref_log_probs` does: the reference's weights are not
kept while training. Training is jaxgpt.trainer's (mesh, accumulation, checkpoints, SIGTERM,
exact --resume); the loss is a sum over pairs and a count, so accumulation and data parallelism
give the mean of the global batch. The CLI is jaxgpt/cli/dpo.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
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
from jaxgpt.decode.sample import bucket
from jaxgpt.data.records import Encoded, RecordBatches, collate, load_json_records
from jaxgpt.training.tuning import TuningConfig, load_base, prepare_out, trainable_model
from jaxgpt.training.trainer import Eval, Trainer, log_stderr, read_rows, resume_point, setup_devices

KIND = "dpo"
LOSSES = ("sigmoid", "ipo", "hinge")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class DPOConfig(TuningConfig):
    """Every setting of a DPO run; `python -m jaxgpt.dpo` flags map onto these 1:1."""

    data: str | None = None  # preference records, JSON list or JSONL
    eval_data: str | None = None  # held-out preference records: eval_ rows
    ref: str | None = None  # reference model (default: ckpt, frozen)
    beta: float = 0.1
    loss: str = "sigmoid"
    max_length: int | None = None  # longest prompt + completion in tokens (default: the context)
    epochs: int = 1
    # DPO defaults of the shared fields (max_iters None: --epochs over --data, 0: only evaluate;
    # lr None: 1e-6 full, 5e-5 LoRA)
    batch_size: int = 8
    eval_interval: int = 50
    ckpt_interval: int = 100

    MIN_ITERS = 0
    RESUMABLE = RunConfig.RESUMABLE + ("force", "eval_data")
    USAGE = "python -m jaxgpt.dpo BASE --data FILE --out DIR"

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2 tokens, got {self.max_length}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-5 if self.lora_rank else 1e-6)


# ---- records -> token pairs ------------------------------------------------------------------------
@dataclass
class Pair:
    """One preference pair as token ids: chosen and rejected each prompt + completion."""

    chosen: Encoded
    rejected: Encoded
    ref: tuple[float, float] = (0.0, 0.0)  # the reference's log-probs of the two completions

    @property
    def ids(self):  # (for the batch length: RecordBatches reads len(e.ids))
        return max(self.chosen.ids, self.rejected.ids, key=len)


def _text(record: dict, field: str, where: str):
    if field not in record:
        raise ConfigError(f"{where}: field {field!r} is missing")
    value = record[field]
    if isinstance(value, list):  # chat: [{"role": "assistant", "content": ...}]
        if field == "prompt":
            return templates.to_messages({"messages": value + [{"role": "assistant", "content": ""}]},
                                         where)[:-1]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ConfigError(f"{where}: field {field!r} must be one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {field!r} must be text or chat messages")
    if field != "prompt" and not value.strip():
        raise ConfigError(f"{where}: field {field!r} is an empty completion")
    return value


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tok, template: str, record, max_len: int, where: str) -> Pair:
    """A record's pair as tokens, TRL's way: ids(prompt) vs ids(prompt + completion) + [eot], the
    completion starting where they first differ. Longer than max_len + 1 tokens: the prompt loses
    tokens from the left (down to half the budget), then the completions their ends."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = _text(record, "prompt", where)
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    text = prompt if isinstance(prompt, str) else templates.render_prompt(
        template, prompt, getattr(tok, "chat_template", None))
    p = templates.encode_prompt(tok, text)
    full = [templates.encode_prompt(tok, text + c) + [tok.eot_token] for c in (chosen, rejected)]
    n = min(_common(p, f) for f in full)
    p, comps = p[:n], [f[n:] for f in full]
    budget = max_len + 1
    if len(p) + max(map(len, comps)) > budget:
        p = p[max(0, len(p) - max(budget // 2, budget - max(map(len, comps)))):]
        comps = [c[:budget - len(p)] for c in comps]
    if not p:
        raise ConfigError(f"{where}: the prompt is empty")
    return Pair(*(Encoded(p + c, len(p)) for c in comps))


def read_pairs(path, tok, template: str, max_len: int, flag: str = "--data") -> list[Pair]:
    records = load_json_records(path, flag)
    name = Path(path).name
    return [encode_pair(tok, template, r, max_len, f"{name} record {i}") for i, r in enumerate(records)]


# ---- batches ---------------------------------------------------------------------------------------
def collate_pairs(pairs: list[Pair], pad_id: int, length: int, rows: int) -> dict:
    """{"x", "y", "mask"} int32 [rows, 2, length] (row b: chosen then rejected), "ref" float32
    [rows, 2] and "valid" [rows] (0 for filler rows past the pairs)."""
    flat = [e for p in pairs for e in (p.chosen, p.rejected)]
    x, y, mask = collate(flat, pad_id, length, True, rows=2 * rows)
    ref = np.zeros((rows, 2), np.float32)
    valid = np.zeros((rows,), np.float32)
    for b, p in enumerate(pairs):
        ref[b], valid[b] = p.ref, 1.0
    shape = lambda a: a.reshape(rows, 2, length)
    return {"x": shape(x), "y": shape(y), "mask": shape(mask), "ref": ref, "valid": valid}


class PairBatches(RecordBatches):
    """The DPO data order (RecordBatches': step s's pairs a pure function of (seed, s))."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int, cap: int, pad_id: int):
        super().__init__(pairs, batch_size, seed, cap, pad_id, True)

    def __call__(self, steps: range, rows) -> dict:
        chunks = [self.batch(s) for s in steps]
        length = bucket(max(len(e.ids) - 1 for c in chunks for e in c), self.cap)
        cols = [collate_pairs(c, self.pad_id, length, self.B) for c in chunks]
        return {k: np.stack([c[k][rows] for c in cols]) for k in cols[0]}


def stacked_pairs(pairs: list[Pair], batch_size: int, cap: int, pad_id: int, rows=slice(None)) -> dict:
    """All of `pairs` as consecutive batches [N, len(rows), ...], one padded length."""
    length = bucket(max(len(p.ids) - 1 for p in pairs), cap)
    parts = [collate_pairs(pairs[i:i + batch_size], pad_id, length, batch_size)
             for i in range(0, len(pairs), batch_size)]
    return {k: np.stack([p[k][rows] for p in parts]) for k in parts[0]}


# ---- the loss --------------------------------------------------------------------------------------
def sequence_logps(model, x, y, mask, key=None):
    """(sum of log p(y_t) over mask, mask count) per row: x, y, mask [..., T] -> two [...] arrays."""
    lead, T = x.shape[:-1], x.shape[-1]
    h, _ = model(x.reshape(-1, T), key=key, hidden=True)  # [N*T, C]
    logp = -optax.softmax_cross_entropy_with_integer_labels(model.head(h), y.reshape(-1))
    m = mask.reshape(-1).astype(jnp.float32)
    return (logp * m).reshape(*lead, T).sum(-1), m.reshape(*lead, T).sum(-1)


def dpo_terms(policy, ref, lengths, beta: float, loss: str):
    """Per-pair (loss, metrics) from log-prob sums policy, ref [B, 2] (chosen, rejected) and
    completion lengths [B, 2]: TRL's DPOTrainer formulas."""
    ratios = policy - ref  # [B, 2] log-ratios
    if loss == "ipo":
        avg = ratios / jnp.maximum(lengths, 1.0)
        per = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    else:
        delta = ratios[:, 0] - ratios[:, 1]
        per = -jax.nn.log_sigmoid(beta * delta) if loss == "sigmoid" else jax.nn.relu(1 - beta * delta)
    rewards = beta * jax.lax.stop_gradient(ratios)
    metrics = {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
               "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
               "rewards/margins": rewards[:, 0] - rewards[:, 1],
               "logps/chosen": jax.lax.stop_gradient(policy[:, 0]),
               "logps/rejected": jax.lax.stop_gradient(policy[:, 1])}
    return per, metrics


def make_loss(beta: float, loss: str):
    """The trainer's loss_fn: (sum of per-pair losses, number of pairs, TRL's metrics as sums)."""

    def dpo_loss(model, batch, key=None):
        policy, lengths = sequence_logps(model, batch["x"], batch["y"], batch["mask"], key)
        per, metrics = dpo_terms(policy, batch["ref"], lengths, beta, loss)
        v = batch["valid"]
        n = v.sum()
        total = (per * v).sum()
        return total, n, {"loss": (jax.lax.stop_gradient(total), n),
                          **{k: ((m * v).sum(), n) for k, m in metrics.items()}}

    dpo_loss.counts = "pairs"  # the loss is a mean over pairs: the trainer logs pairs_per_s
    return dpo_loss


@nnx.jit
def _ref_logps(model, x, y, mask):
    return sequence_logps(model, x, y, mask)[0]


def attach_ref(model, pairs: list[Pair], batch_size: int, pad_id: int, progress=None) -> None:
    """Set each pair's `ref` to `model`'s log-probs of its two completions."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        length = bucket(max(len(p.ids) - 1 for p in chunk), model.config.block_size)
        b = collate_pairs(chunk, pad_id, length, batch_size)
        lp = np.asarray(_ref_logps(model, b["x"], b["y"], b["mask"]))
        for p, row in zip(chunk, lp):
            p.ref = (float(row[0]), float(row[1]))
        if progress is not None:
            progress.update(len(chunk))


# ---- the run ---------------------------------------------------------------------------------------
def _reference(cfg: DPOConfig, lm):
    """The reference model: --ref loaded (same vocabulary required), or the base itself."""
    if not cfg.ref:
        return lm.model
    from jaxgpt.formats.load import load

    ref = load(cfg.ref)
    if ref.config.vocab_size != lm.config.vocab_size:
        raise ConfigError(f"--ref {cfg.ref} has a vocabulary of {ref.config.vocab_size}, the policy "
                          f"{lm.config.vocab_size}: they must share a tokenizer")
    return ref.model


def run_dpo(cfg: DPOConfig, log=log_stderr) -> dict:
    """Train (or, with --max-iters 0, only evaluate) as `cfg` says; writes cfg.out."""
    from tqdm import tqdm

    if not cfg.out:
        raise ConfigError("--out DIR is required (where checkpoints, metrics and the model go)")
    cfg.check_base()
    prepare_out(cfg)
    resume_step = resume_point(cfg, KIND, "dpo_config")[0] if cfg.resume else 0
    mesh = setup_devices(cfg)
    lm = load_base(cfg)
    tok = lm.tokenizer
    template = cfg.template or templates.default_template(lm)
    max_len = min(cfg.max_length or lm.config.block_size, lm.config.block_size)
    train = read_pairs(cfg.data, tok, template, max_len)
    held = read_pairs(cfg.eval_data, tok, template, max_len, "--eval-data") if cfg.eval_data else []
    log(f"{len(train)} training pairs" + (f", {len(held)} held-out" if held else "")
        + f"; loss {cfg.loss}, beta {cfg.beta}")
    bar = tqdm(total=len(train) + len(held), desc="reference log-probs", disable=not cfg.progress,
               leave=False)
    attach_ref(_reference(cfg, lm), train + held, cfg.batch_size, tok.eot_token, bar)
    bar.close()

    model, wrt, adapted, n_train, n_total = trainable_model(cfg, lm.model, log)
    data = PairBatches(train, cfg.batch_size, cfg.seed, lm.config.block_size, tok.eot_token)
    total = cfg.epochs * data.steps_per_epoch if cfg.max_iters is None else cfg.max_iters
    meta = {"kind": KIND, "dpo_config": cfg.to_dict(), "model_config": lm.config.to_dict(),
            "tokenizer": tok.to_dict(), "source": f"dpo of {cfg.ckpt}", "template": template}
    trainer = Trainer(model, optim=cfg, run=cfg,
                      total_steps=max(total, 1), mesh=mesh, meta=meta, wrt=wrt,
                      loss_fn=make_loss(cfg.beta, cfg.loss), log=log)
    trainer.total_steps = total  # (0: the loop only evaluates)
    out = Path(cfg.out)
    if cfg.resume:
        resume_step = trainer.restore(out, warn=trainer.log)
    elif cfg.force and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    eval_pairs = held or (train if total == 0 else [])
    evaluate = None
    if eval_pairs:
        arrays = stacked_pairs(eval_pairs, cfg.batch_size, lm.config.block_size, tok.eot_token,
                               trainer.eval_rows)
        evaluate = lambda step: {"eval_" + k: v for k, v in trainer.evaluate_metrics(arrays).items()}
    run = trainer.fit(lambda steps: data(steps, trainer.local_rows),
                      [Eval(cfg.eval_interval, evaluate)] if evaluate is not None else [],
                      rows=read_rows(out, resume_step) if cfg.resume else None)
    evals = [r for r in run["rows"] if "eval_loss" in r]
    summary = {"steps": run["step"], "stopped_by": run["stopped_by"], "out": cfg.out,
               "before": evals[0] if evals else None, "after": evals[-1] if evals else None,
               "timers": run["timers"], "trainable_params": n_train, "total_params": n_total}
    if run["stopped_by"] or total == 0 or not trainer.main:
        return summary
    if cfg.lora_rank:
        lora.write_adapter(out, trainer.host_model(), cfg.adapter_meta(
            lm.config.to_dict(), template, dpo={"data": str(cfg.data), "steps": total}))
    atomic_write(out / "summary.json", json.dumps({**summary, "config": dataclasses.asdict(cfg)},
                                                  indent=2).encode())
    return summary
