"""Supervised fine-tuning on instruction data: records -> masked batches -> full or LoRA training,
with a before/after evaluation report; `python -m jaxgpt.sft`.

    python -m jaxgpt.sft gpt2 --data instruction-data.json --out sft_out            # full fine-tune
    python -m jaxgpt.sft gpt2 --data data.jsonl --out lora_out --lora-rank 8        # LoRA adapters
    python -m jaxgpt.sft --merge lora_out --out merged                              # fold adapters in
    python -m jaxgpt.sft sft_out --data data.json --eval-only --json                # masked val loss

Each record (Alpaca, prompt/completion or chat; jaxgpt.templates) becomes prompt tokens (the
template applied) followed by reply tokens and `<|endoftext|>`. The loss is the mean
cross-entropy over reply tokens only (prompt, template and padding masked out) across the
whole batch: sum of per-token losses / number of unmasked tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import string
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import checkpoint, lora, parallel, templates
from jaxgpt.config import ConfigError, add_dataclass_flags
from jaxgpt.data import atomic_write
from jaxgpt.optim import make_optimizer
from jaxgpt.sample import bucket  # padded lengths: powers of two, so few shapes compile

IGNORE = 0  # mask value of positions that do not count in the loss


@dataclass(frozen=True)
class SFTConfig:
    """Every setting of an SFT run; `python -m jaxgpt.sft` flags map onto these 1:1."""

    ckpt: str | None = None  # base model: jaxgpt run dir, HF GPT-2 folder, hub name, nanoGPT ckpt.pt
    data: str | None = None  # JSON list or JSONL of records
    out: str | None = None
    template: str = templates.DEFAULT
    val_frac: float = 0.05
    test_frac: float = 0.10
    seed: int = 123
    mask_prompt: bool = True  # --no-mask-prompt: the loss counts prompt tokens too
    max_length: int | None = None  # longest training sequence in tokens (default: the context)
    # optimisation
    epochs: int = 2
    max_iters: int | None = None  # stop after this many steps (default: epochs over the train split)
    batch_size: int = 8
    lr: float | None = None  # default: 5e-5 full fine-tuning, 1e-3 LoRA
    min_lr: float | None = None  # default: lr/10 (cosine)
    warmup_iters: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    dtype: str = "float32"
    # LoRA
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "c_attn,c_proj,c_fc"
    # evaluation and output
    eval_interval: int = 50
    gen_tokens: int = 128  # token budget of each test-split generation
    max_test: int = 0  # generate for at most this many test records (0: all)
    eval_only: bool = False
    eval_split: str = "val"
    json: bool = False
    merge: str | None = None  # LoRA adapter dir to merge into its base (with --out)
    base: str | None = None  # with --merge: use this base instead of the one the adapter names
    force: bool = False
    progress: bool = True

    def __post_init__(self):
        templates.check_template(self.template)
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"--val-frac ({self.val_frac}) and --test-frac ({self.test_frac}) must "
                              "be in [0, 1) and sum to less than 1")
        for name in ("epochs", "batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2 tokens, got {self.max_length}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ConfigError(f"--max-iters must be >= 1, got {self.max_iters}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 (leave it out for full fine-tuning), got {self.lora_rank}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.gen_tokens < 1 or self.max_test < 0:
            raise ConfigError("--gen-tokens must be >= 1 and --max-test >= 0")
        if self.eval_split not in ("val", "all"):
            raise ConfigError(f"--eval-split must be val or all, got {self.eval_split!r}")

    def length_limit(self, context: int) -> int:
        """Longest training sequence: --max-length, never more than the model's context."""
        return min(self.max_length or context, context)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora_rank else 5e-5)


# ---- records ---------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """A JSON list of records, or JSONL (one record per line). ConfigError names the bad line."""
    if not path:
        raise ConfigError("--data FILE is required")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"--data {path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--data {path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--data {path}: malformed JSONL at line {n}: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"--data {path}: no records (expected a JSON list or JSON lines)")
    # validate every record now, so a bad one is reported before any training
    for i, r in enumerate(records):
        templates.to_messages(r, f"{p.name} record {i}")
    return records


def split(records: list, val_frac: float, test_frac: float, seed: int) -> dict[str, list]:
    """Seeded shuffle, then test / val / train slices (test and val sizes rounded down)."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test, n_val = int(len(records) * test_frac), int(len(records) * val_frac)
    pick = lambda idx: [records[i] for i in idx]
    return {"test": pick(order[:n_test]), "val": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


# ---- tokens, masks, batches --------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[int]  # prompt + reply + eot
    n_prompt: int  # how many of ids are prompt (masked out unless mask_prompt is off)


def check_tokenizer(tok) -> None:
    if tok is None or getattr(tok, "eot_token", None) is None or not hasattr(tok, "encode_ordinary"):
        raise ConfigError("SFT needs a tokenizer with an <|endoftext|> token (GPT-2's BPE); "
                          "this model has a char vocabulary or none")


def prompt_ids(tok, template: str, messages: list[dict]) -> list[int]:
    """Token ids of the rendered prompt for `messages` (which exclude the reply)."""
    return tok.encode_ordinary(templates.render_prompt(template, messages))


def encode(tok, template: str, record, max_len: int, where: str = "record") -> tuple[Encoded | None, str]:
    """(Encoded, "") or (None, "skipped") / (Encoded, "truncated"): fits prompt+reply into
    max_len + 1 tokens (a sequence of n tokens gives n - 1 next-token predictions) by cutting the
    prompt from the left; a reply that alone does not fit is skipped."""
    messages = templates.to_messages(record, where)
    p = prompt_ids(tok, template, messages[:-1])
    r = tok.encode_ordinary(messages[-1]["content"]) + [tok.eot_token]
    if len(r) > max_len:
        return None, "skipped"
    status = ""
    if len(p) + len(r) > max_len + 1:
        p, status = p[len(p) + len(r) - max_len - 1:], "truncated"
    return Encoded(p + r, len(p)), status


def encode_all(tok, template: str, records: list, max_len: int, log=None) -> list[Encoded]:
    out, counts = [], {"skipped": 0, "truncated": 0}
    for i, rec in enumerate(records):
        enc, status = encode(tok, template, rec, max_len, f"record {i}")
        if status:
            counts[status] += 1
        if enc is not None:
            out.append(enc)
    if log and (counts["skipped"] or counts["truncated"]):
        log(f"{counts['truncated']} examples longer than {max_len + 1} tokens had their prompt cut "
            f"from the left; {counts['skipped']} whose reply alone is longer were skipped")
    return out


def collate(examples: list[Encoded], pad_id: int, length: int, mask_prompt: bool = True,
            rows: int | None = None):
    """(x, y, mask), each int32 [rows, length]: inputs, next-token targets, and 1 where the
    target counts (a reply token or the closing eot; with mask_prompt off, every real token).
    Right padding with pad_id; padding (and extra empty rows up to `rows`) has mask 0."""
    rows = rows or len(examples)
    x = np.full((rows, length), pad_id, np.int32)
    y = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for b, ex in enumerate(examples):
        ids = np.asarray(ex.ids[:length + 1], np.int32)
        n = len(ids) - 1  # predictions in this row
        x[b, :n], y[b, :n] = ids[:-1], ids[1:]
        # target y[j] = ids[j + 1] is a reply token iff j + 1 >= n_prompt
        first = max(ex.n_prompt - 1, 0) if mask_prompt else 0
        mask[b, first:n] = 1
    return x, y, mask


def masked_loss_sum(logits, y, mask):
    """(sum of cross-entropy over unmasked targets, number of unmasked targets)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)  # [B, T]
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)


def masked_loss(logits, y, mask):
    """Mean cross-entropy over every unmasked token of the batch (not a mean of row means)."""
    total, n = masked_loss_sum(logits, y, mask)
    return total / jnp.maximum(n, 1.0)


def batches(examples: list[Encoded], batch_size: int, cap: int, pad_id: int, mask_prompt: bool):
    """Consecutive fixed-size batches (the last one filled with empty rows), bucketed lengths."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        length = bucket(max(len(e.ids) - 1 for e in chunk), cap)
        yield collate(chunk, pad_id, length, mask_prompt, rows=batch_size)


# ---- evaluation --------------------------------------------------------------------------------
_EVAL_CACHE: dict = {}


def evaluate_loss(model, examples: list[Encoded], batch_size: int, pad_id: int,
                  mask_prompt: bool = True) -> tuple[float, int]:
    """(mean masked loss over all unmasked tokens of `examples`, number of those tokens)."""
    graphdef, state = nnx.split(model)
    fn = _EVAL_CACHE.get(graphdef)
    if fn is None:
        fn = _EVAL_CACHE[graphdef] = jax.jit(
            lambda s, x, y, m: masked_loss_sum(nnx.merge(graphdef, s)(x)[0], y, m))
    total, count = 0.0, 0.0
    cap = model.config.block_size
    for x, y, m in batches(examples, batch_size, cap, pad_id, mask_prompt):
        s, n = fn(state, x, y, m)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0), int(count)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (for exact match and ROUGE-L)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words of the normalized texts (longest common subsequence)."""
    c, r = normalize(candidate).split(), normalize(reference).split()
    if not c or not r:
        return float(c == r)
    prev = [0] * (len(r) + 1)
    for a in c:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generate_answers(model, tok, template: str, records: list, max_new: int, progress=None) -> list[dict]:
    """Greedy answers for each record's prompt: [{"text", "ended"}] (ended: eot within budget)."""
    from jaxgpt.sample import generate

    L = model.config.block_size
    out = []
    for rec in records:
        msgs = templates.to_messages(rec, "record")[:-1]
        ids = prompt_ids(tok, template, msgs)[-max(L - max_new, 1):]  # room for the answer
        new = min(max_new, L - len(ids))
        row = np.asarray(generate(model, np.asarray([ids], np.int32), new, temperature=0.0,
                                  eot=tok.eot_token))[0, len(ids):].tolist()
        ended = tok.eot_token in row
        if ended:
            row = row[:row.index(tok.eot_token)]
        out.append({"text": tok.decode(row), "ended": ended})
        if progress is not None:
            progress.update(1)
    return out


def score(answers: list[dict], records: list) -> dict:
    refs = [templates.to_messages(r, "record")[-1]["content"] for r in records]
    n = max(len(answers), 1)
    return {
        "exact_match": sum(normalize(a["text"]) == normalize(r) for a, r in zip(answers, refs)) / n,
        "rouge_l": sum(rouge_l(a["text"], r) for a, r in zip(answers, refs)) / n,
        "ends_with_eos": sum(a["ended"] for a in answers) / n,
        "n": len(answers),
    }


# ---- training ----------------------------------------------------------------------------------
def make_step(graphdef, tx):
    """`step(trainable, frozen, opt_state, x, y, mask) -> (trainable, opt_state, loss)`, jitted,
    trainable params and optimizer state donated; `frozen` (the base under LoRA) is read only."""

    def loss_fn(trainable, frozen, x, y, mask):
        return masked_loss(nnx.merge(graphdef, trainable, frozen)(x)[0], y, mask)

    def step(trainable, frozen, opt_state, x, y, mask):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y, mask)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def _log(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def load_base(cfg: SFTConfig):
    """The base model (float32 weights; int8 refused) with the compute dtype of the run."""
    from jaxgpt.api import load

    if not cfg.ckpt:
        raise ConfigError("name the base model: python -m jaxgpt.sft CKPT --data FILE --out DIR")
    lm = load(cfg.ckpt)
    check_tokenizer(lm.tokenizer)
    if lm.config.dtype != cfg.dtype:  # same weights, modules rebuilt with the new compute dtype
        from jaxgpt.model import GPT

        new_cfg = dataclasses.replace(lm.config, dtype=cfg.dtype)
        lm.model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: GPT(new_cfg))), nnx.state(lm.model))
    return lm


def run_sft(cfg: SFTConfig, log=_log) -> dict:
    """Fine-tune as `cfg` says; writes cfg.out (atomically, at the end). Returns a summary dict."""
    from tqdm import tqdm

    if not cfg.out:
        raise ConfigError("--out DIR is required (where the model and report go)")
    checkpoint.check_writable(cfg.out, cfg.force)
    records = read_records(cfg.data)
    lm = load_base(cfg)
    tok, template = lm.tokenizer, cfg.template
    max_len = cfg.length_limit(lm.config.block_size)
    parts = split(records, cfg.val_frac, cfg.test_frac, cfg.seed)
    if not parts["train"]:
        raise ConfigError("the train split is empty; use a bigger dataset or smaller --val-frac/--test-frac")
    log(f"{len(records)} records: {len(parts['train'])} train, {len(parts['val'])} val, "
        f"{len(parts['test'])} test; template {template}")
    train_ex = encode_all(tok, template, parts["train"], max_len, log)
    val_ex = encode_all(tok, template, parts["val"], max_len)
    test_recs = parts["test"][:cfg.max_test] if cfg.max_test else parts["test"]
    if not train_ex:
        raise ConfigError("no training example fits the context; raise --max-length or shorten replies")
    pad = tok.eot_token
    base_model = lm.model

    # ---- model to train ----
    model = nnx.clone(base_model)
    adapted = []
    if cfg.lora_rank:
        adapted = lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
        wrt = nnx.LoRAParam
    else:
        wrt = nnx.Param
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)"
        + (f"; LoRA rank {cfg.lora_rank} on {len(adapted)} layers" if adapted else ""))

    # ---- before ----
    t0 = time.time()
    gen_bar = tqdm(total=2 * len(test_recs), desc="test generations", disable=not cfg.progress,
                   file=sys.stderr, leave=False)
    before = {"val_loss": None, "val_tokens": 0}
    if val_ex:
        before["val_loss"], before["val_tokens"] = evaluate_loss(base_model, val_ex, cfg.batch_size, pad)
    before_answers = generate_answers(base_model, tok, template, test_recs, cfg.gen_tokens, gen_bar)
    before.update(score(before_answers, test_recs))
    log(f"before: val loss {_fmt(before['val_loss'])}, test ROUGE-L {before['rouge_l']:.3f}, "
        f"ends with EOS {before['ends_with_eos']:.2f} ({time.time() - t0:.0f} s)")

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
    opt_cfg = types.SimpleNamespace(lr=cfg.peak_lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
                                    lr_decay_iters=total_steps, max_iters=total_steps,
                                    weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                                    grad_clip=cfg.grad_clip)
    tx = make_optimizer(opt_cfg)
    trainable = jax.tree.map(jnp.copy, trainable)  # own buffers: the step donates them, the base keeps its
    opt_state = tx.init(trainable)
    step_fn = make_step(graphdef, tx)
    rng = np.random.default_rng(cfg.seed)
    rows, step, t_train = [], 0, time.time()
    bar = tqdm(total=total_steps, desc="sft", disable=not cfg.progress, file=sys.stderr)
    while step < total_steps:
        order = rng.permutation(len(train_ex))
        for x, y, m in batches([train_ex[i] for i in order], cfg.batch_size, max_len, pad, cfg.mask_prompt):
            trainable, opt_state, loss = step_fn(trainable, frozen, opt_state, x, y, m)
            step += 1
            row = {"step": step, "train_loss": float(loss)}
            if val_ex and (step % cfg.eval_interval == 0 or step == total_steps):
                row["val_loss"], _ = evaluate_loss(nnx.merge(graphdef, trainable, frozen), val_ex,
                                                   cfg.batch_size, pad)
                log(f"step {step}: train {row['train_loss']:.4f}, val {row['val_loss']:.4f}")
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}")
            if not math.isfinite(row["train_loss"]):
                raise ConfigError(f"the loss became {row['train_loss']} at step {step}; lower --lr")
            if step >= total_steps:
                break
    bar.close()
    train_s = time.time() - t_train
    model = nnx.merge(graphdef, trainable, frozen)

    # ---- after ----
    plain = lora.merge(model) if cfg.lora_rank else model
    after = {"val_loss": None, "val_tokens": 0}
    if val_ex:
        after["val_loss"], after["val_tokens"] = evaluate_loss(plain, val_ex, cfg.batch_size, pad)
    after_answers = generate_answers(plain, tok, template, test_recs, cfg.gen_tokens, gen_bar)
    gen_bar.close()
    after.update(score(after_answers, test_recs))
    log(f"after:  val loss {_fmt(after['val_loss'])}, test ROUGE-L {after['rouge_l']:.3f}, "
        f"ends with EOS {after['ends_with_eos']:.2f}")

    # ---- write everything (atomically: a temporary folder renamed to --out at the end) ----
    summary = {"before": before, "after": after, "steps": step, "train_seconds": train_s,
               "trainable_params": n_train, "total_params": n_total, "lora_layers": adapted,
               "records": {k: len(v) for k, v in parts.items()}, "config": dataclasses.asdict(cfg)}
    sft_meta = {"template": template, "sft": {"base": str(cfg.ckpt), "data": str(cfg.data),
                                              "steps": step, "lora_rank": cfg.lora_rank}}
    with checkpoint.atomic_dir(cfg.out, cfg.force) as tmp:
        if cfg.lora_rank:
            lora.save_adapter(tmp, model, {**sft_meta, "base": _portable(cfg.ckpt), "rank": cfg.lora_rank,
                                           "alpha": cfg.lora_alpha, "targets": lora.parse_targets(cfg.lora_targets),
                                           "model_config": lm.config.to_dict()}, force=True)
        else:
            tok_dict = tok.to_dict()
            checkpoint.save_model(tmp, plain, tok_dict, {**sft_meta, "source": f"sft of {cfg.ckpt}"},
                                  force=True)
        _write_report(Path(tmp), cfg, summary, test_recs, before_answers, after_answers, rows)
    summary["out"] = cfg.out
    return summary


def _portable(ckpt: str) -> str:
    """A local base path recorded absolute (so the adapter loads from anywhere); hub names as is."""
    p = Path(ckpt).expanduser()
    return str(p.resolve()) if p.exists() else ckpt


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _write_report(out: Path, cfg: SFTConfig, summary: dict, recs, before, after, rows) -> None:
    from jaxgpt.train import plot_losses

    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    plot_losses(rows, out / "loss.png")
    lines = []
    for i, (rec, b, a) in enumerate(zip(recs, before, after)):
        msgs = templates.to_messages(rec, "record")
        ref = msgs[-1]["content"]
        lines.append(json.dumps({
            "index": i, "prompt": templates.render_prompt(cfg.template, msgs[:-1]), "reference": ref,
            "before": b["text"], "before_ended_with_eos": b["ended"],
            "before_rouge_l": rouge_l(b["text"], ref), "after": a["text"],
            "after_ended_with_eos": a["ended"], "after_rouge_l": rouge_l(a["text"], ref),
        }, ensure_ascii=False))
    atomic_write(out / "test_generations.jsonl", ("\n".join(lines) + "\n").encode())
    atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write(out / "report.md", report_markdown(cfg, summary, recs, before, after).encode())


def report_markdown(cfg: SFTConfig, s: dict, recs, before, after, n_examples: int = 3) -> str:
    b, a = s["before"], s["after"]
    kind = (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, targets {cfg.lora_targets}"
            if cfg.lora_rank else "full fine-tuning")
    md = [f"# SFT report: {cfg.ckpt} on {cfg.data}", "",
          f"{kind}; template `{cfg.template}`; {s['steps']} steps of batch {cfg.batch_size}, "
          f"lr {cfg.peak_lr:g}, {s['train_seconds']:.0f} s of training; trainable params "
          f"{s['trainable_params']:,} of {s['total_params']:,}; prompt tokens "
          f"{'masked out of' if cfg.mask_prompt else 'included in'} the loss.",
          f"Records: {s['records']['train']} train, {s['records']['val']} val, "
          f"{s['records']['test']} test ({b['n']} generated, greedy, {cfg.gen_tokens} tokens max).", "",
          "| metric | before | after |", "|---|---|---|",
          f"| masked val loss (nats/token, {b['val_tokens']} tokens) | {_fmt(b['val_loss'])} | {_fmt(a['val_loss'])} |",
          f"| test exact match (normalized) | {b['exact_match']:.3f} | {a['exact_match']:.3f} |",
          f"| test ROUGE-L F1 | {b['rouge_l']:.3f} | {a['rouge_l']:.3f} |",
          f"| test answers ending with <\\|endoftext\\|> | {b['ends_with_eos']:.3f} | {a['ends_with_eos']:.3f} |",
          "", "![loss](loss.png)", "", "## Examples (test split)", ""]
    for rec, bb, aa in list(zip(recs, before, after))[:n_examples]:
        msgs = templates.to_messages(rec, "record")
        user = msgs[-2]["content"] + (f"\n\n{msgs[-2]['input']}" if msgs[-2].get("input") else "")
        md += [f"**Instruction:** {user}", "", f"- reference: {msgs[-1]['content']}",
               f"- before: {bb['text'].strip() or '(empty)'}", f"- after: {aa['text'].strip() or '(empty)'}", ""]
    md += ["All generations with scores: `test_generations.jsonl`."]
    return "\n".join(md) + "\n"


def summary_table(runs: dict[str, dict]) -> str:
    """A markdown table comparing SFT runs (name -> run_sft summary): the base row once, then
    each run's after-metrics, with its trainable params and training time."""
    head = ("| model | masked val loss | test ROUGE-L F1 | test exact match | ends with EOS | "
            "trainable params | train time |\n|---|---|---|---|---|---|---|\n")
    first = next(iter(runs.values()))["before"]
    rows = [f"| base (before SFT) | {_fmt(first['val_loss'])} | {first['rouge_l']:.3f} | "
            f"{first['exact_match']:.3f} | {first['ends_with_eos']:.2f} | - | - |"]
    for name, s in runs.items():
        a = s["after"]
        rows.append(f"| {name} | {_fmt(a['val_loss'])} | {a['rouge_l']:.3f} | {a['exact_match']:.3f} | "
                    f"{a['ends_with_eos']:.2f} | {s['trainable_params']:,} | {s['train_seconds']:.0f} s |")
    return head + "\n".join(rows) + "\n"


# ---- other modes -------------------------------------------------------------------------------
def eval_only(cfg: SFTConfig) -> dict:
    """{"loss", "tokens"}: masked loss of the base on the val split (or every record, unshuffled)."""
    records = read_records(cfg.data)
    lm = load_base(cfg)
    recs = records if cfg.eval_split == "all" else split(records, cfg.val_frac, cfg.test_frac, cfg.seed)["val"]
    if not recs:
        raise ConfigError("the val split is empty; use --eval-split all or a larger --val-frac")
    template = lm.meta.get("template", cfg.template) if cfg.template == templates.DEFAULT else cfg.template
    max_len = cfg.length_limit(lm.config.block_size)
    ex = encode_all(lm.tokenizer, template, recs, max_len, _log)
    loss, tokens = evaluate_loss(lm.model, ex, cfg.batch_size, lm.tokenizer.eot_token, cfg.mask_prompt)
    return {"loss": loss, "tokens": tokens}


def merge_adapter(adapter: str, out: str, base: str | None = None, force: bool = False) -> Path:
    """Fold a LoRA adapter into its base and save a plain jaxgpt checkpoint at `out`."""
    from jaxgpt.api import load

    meta = lora.read_adapter_meta(adapter)
    checkpoint.check_writable(out, force)
    lm = load(base or meta["base"])
    lora.load_adapter(adapter, lm.model)
    merged = lora.merge(lm.model)
    extra = {"template": meta.get("template", templates.DEFAULT), "source": f"{adapter} merged into {base or meta['base']}",
             "sft": meta.get("sft", {})}
    tok = lm.tokenizer.to_dict() if lm.tokenizer is not None else None
    return checkpoint.save_model(out, merged, tok, extra, force=force)


# ---- CLI ---------------------------------------------------------------------------------------
HELP = {
    "ckpt": "base model: jaxgpt run dir, Hugging Face GPT-2 folder, hub name (gpt2, ...) or nanoGPT ckpt.pt",
    "data": "instruction records: a JSON list or JSONL of {instruction, input, output}, "
            "{prompt, completion} or {messages: [{role, content}, ...]}",
    "out": "output folder: the fine-tuned checkpoint (or LoRA adapter), report.md, "
           "test_generations.jsonl, metrics.jsonl, loss.png, summary.json",
    "template": f"prompt template: {', '.join(templates.TEMPLATES)} (saved with the checkpoint)",
    "val_frac": "fraction of records held out for the validation loss",
    "test_frac": "fraction of records held out for test generations",
    "seed": "seed of the split, the data order and the LoRA init",
    "mask_prompt": "count only reply tokens in the loss (--no-mask-prompt: every real token)",
    "max_length": "longest training sequence in tokens (default: the model's context); longer "
                  "examples lose prompt tokens from the left, or are skipped if the reply alone is longer",
    "epochs": "passes over the train split",
    "max_iters": "stop after this many optimizer steps (overrides --epochs)",
    "batch_size": "examples per optimizer step (padded to the longest, bucketed)",
    "lr": "peak learning rate (default: 5e-5 full fine-tuning, 1e-3 LoRA)",
    "min_lr": "final learning rate of the cosine decay (default: lr/10)",
    "warmup_iters": "linear warmup steps",
    "weight_decay": "AdamW weight decay on 2-D weights",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip gradients to this global norm (0 disables)",
    "dtype": "compute dtype: float32, bfloat16 or float16 (weights stay float32)",
    "lora_rank": "train LoRA adapters of rank r (A [in, r], B [r, out]) instead of every weight",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / r) A B",
    "lora_targets": "comma-separated layers to adapt: c_attn, c_proj (both), attn.c_proj, mlp.c_proj, c_fc",
    "eval_interval": "evaluate the val loss every N steps",
    "gen_tokens": "token budget of each greedy test generation",
    "max_test": "generate answers for at most this many test records (0: all)",
    "eval_only": "only print the masked loss of CKPT (no training, nothing written)",
    "eval_split": "with --eval-only: val (the split) or all (every record, in file order)",
    "json": "with --eval-only: print one JSON object {loss, tokens}",
    "merge": "merge this LoRA adapter folder into its base and write a plain checkpoint to --out",
    "base": "with --merge: the base model to merge into (default: the one the adapter records)",
    "force": "replace a non-empty --out",
    "progress": "show progress bars (--no-progress to hide them)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.sft", description=__doc__.split("\n\n")[0],
        epilog="Full fine-tuning writes a jaxgpt checkpoint to --out; LoRA writes only the adapter "
               "(A, B and adapter.json), which sample/chat/eval load on top of its base, and which "
               "--merge folds into a plain checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(p, SFTConfig, HELP, positional=("ckpt",))
    return p


def main(argv=None) -> int:
    parallel.deterministic_gpu_ops()
    args = build_parser().parse_args(argv)
    try:
        cfg = SFTConfig(**vars(args))
        if cfg.merge:
            if not cfg.out:
                raise ConfigError("--merge needs --out MERGED_DIR")
            path = merge_adapter(cfg.merge, cfg.out, cfg.base or cfg.ckpt, cfg.force)
            print(f"merged {cfg.merge} into a plain checkpoint at {path}", file=sys.stderr)
            return 0
        if cfg.eval_only:
            res = eval_only(cfg)
            print(json.dumps(res) if cfg.json else f"masked loss {res['loss']:.4f} over {res['tokens']} tokens")
            return 0
        s = run_sft(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {s['steps']} steps; val loss {_fmt(s['before']['val_loss'])} -> "
          f"{_fmt(s['after']['val_loss'])}; ends with EOS {s['before']['ends_with_eos']:.2f} -> "
          f"{s['after']['ends_with_eos']:.2f}; report in {cfg.out}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
