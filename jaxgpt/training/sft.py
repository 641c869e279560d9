"""Supervised fine-tuning on instruction data: records -> masked batches -> full or LoRA training,
with a before/after evaluation report; `python -m jaxgpt.sft`.

    python -m jaxgpt.sft gpt2 --data instruction-data.json --out sft_out            # full fine-tune
    python -m jaxgpt.sft gpt2 --data data.jsonl --out lora_out --lora-rank 8        # LoRA adapters
    python -m jaxgpt.sft --merge lora_out --out merged                              # fold adapters in
    python -m jaxgpt.sft sft_out --data data.json --eval-only --json                # masked val loss

Each record (Alpaca, prompt/completion or chat; jaxgpt.templates) becomes prompt tokens (the
template applied) followed by reply tokens and the end token (`<|endoftext|>` for GPT-2, the
model's eos for others: SmolLM2's `<|im_end|>`). The loss is the mean
cross-entropy over reply tokens only (prompt, template and padding masked out) across the
whole batch: sum of per-token losses / number of unmasked tokens, exactly, under gradient
accumulation and data parallelism too (jaxgpt.losses, jaxgpt.trainer).

Training runs on the one trainer (jaxgpt.trainer): the same mesh, accumulation, K steps per
call, periodic checkpoints in OUT/checkpoints, SIGTERM save and exact `--resume` as pretraining.
The batch of step s is a pure function of (seed, s): epoch e's record order is a permutation
seeded by (seed, e). The CLI is jaxgpt/cli/sft.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxgpt import parallel
from jaxgpt.formats import checkpoint
from jaxgpt.model import lora
from jaxgpt.tokenizers import templates
from jaxgpt.config import ConfigError, OptimConfig, RunConfig
from jaxgpt import files
from jaxgpt.files import atomic_write
from jaxgpt.decode.sample import bucket  # padded lengths: powers of two, so few shapes compile
from jaxgpt.training.trainer import Eval, Trainer, log_stderr, read_rows, resume_point, setup_devices
from jaxgpt.files import writing

IGNORE = 0  # mask value of positions that do not count in the loss
KIND = "sft"  # saved in every checkpoint: `jaxgpt.train --resume` refuses such a run

@dataclass(frozen=True)
class SFTConfig(OptimConfig, RunConfig):
    """Every setting of an SFT run: the records, template and LoRA here, the optimization and
    the run (mesh, accumulation, checkpoints, resume) from OptimConfig / RunConfig, with
    fine-tuning defaults; `python -m jaxgpt.sft` flags map onto these 1:1."""

    ckpt: str | None = None  # base model: jaxgpt run dir, HF GPT-2 folder, hub name, nanoGPT ckpt.pt
    data: str | None = None  # JSON list or JSONL of records
    template: str | None = None  # None: the model's (templates.default_template), else alpaca
    val_frac: float = 0.05
    test_frac: float = 0.10
    mask_prompt: bool = True  # --no-mask-prompt: the loss counts prompt tokens too
    max_length: int | None = None  # longest training sequence in tokens (default: the context)
    epochs: int = 2
    # LoRA
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "c_attn,c_proj,c_fc"
    # evaluation and output
    gen_tokens: int = 128  # token budget of each test-split generation
    max_test: int = 0  # generate for at most this many test records (0: all)
    eval_only: bool = False
    eval_split: str = "val"
    json: bool = False
    merge: str | None = None  # LoRA adapter dir to merge into its base (with --out)
    base: str | None = None  # with --merge: use this base instead of the one the adapter names
    force: bool = False
    # fine-tuning defaults of the shared fields
    out: str | None = None
    seed: int = 123
    batch_size: int = 8
    max_iters: int | None = None  # default: --epochs over the train split
    lr: float | None = None  # default: 5e-5 full fine-tuning, 1e-3 LoRA
    warmup_iters: int = 10
    beta2: float = 0.999
    eval_interval: int = 50
    ckpt_interval: int = 100
    steps_per_call: int = 1

    RESUMABLE = RunConfig.RESUMABLE + ("gen_tokens", "max_test", "eval_only", "eval_split", "json",
                                       "merge", "base", "force")

    def __post_init__(self):
        super().__post_init__()
        if self.template is not None:
            templates.check_template(self.template)
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"--val-frac ({self.val_frac}) and --test-frac ({self.test_frac}) must "
                              "be in [0, 1) and sum to less than 1")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2 tokens, got {self.max_length}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 (leave it out for full fine-tuning), got {self.lora_rank}")
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
    """A JSON list of records, or JSONL (one record per line), each checked as an instruction
    record. ConfigError names the bad line or record."""
    records = load_json_records(path)
    # validate every record now, so a bad one is reported before any training
    for i, r in enumerate(records):
        templates.to_messages(r, f"{Path(path).name} record {i}")
    return records

def load_json_records(path: str | Path, flag: str = "--data") -> list:
    """The records of a JSON list or JSONL file, unchecked (SFT, DPO and GRPO check their own
    fields). ConfigError names the bad line."""
    if not path:
        raise ConfigError(f"{flag} FILE is required")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"{flag} {path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{flag} {path}: malformed JSONL at line {n}: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{flag} {path}: no records (expected a JSON list or JSON lines)")
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
        raise ConfigError("SFT needs a tokenizer with an end-of-text token (GPT-2's BPE, a GGUF / "
                          "tokenizer.json BPE with an eos); "
                          "this model has a char vocabulary or none")

prompt_ids = templates.prompt_ids  # token ids of the rendered prompt (messages exclude the reply)

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

def stacked(examples: list[Encoded], batch_size: int, cap: int, pad_id: int, mask_prompt: bool,
            rows=slice(None)) -> dict:
    """Consecutive batches of `examples` stacked to {"x", "y", "mask"} [N, len(rows), L], all
    padded to one bucketed length L (one compiled evaluation), only the batch rows `rows`."""
    length = bucket(max(len(e.ids) - 1 for e in examples), cap)
    parts = [collate(examples[i:i + batch_size], pad_id, length, mask_prompt, rows=batch_size)
             for i in range(0, len(examples), batch_size)]
    return {k: np.stack([p[j][rows] for p in parts]) for j, k in enumerate(("x", "y", "mask"))}


class RecordBatches:
    """The SFT data order: the global batch of step s is a pure function of (seed, s).

    Epoch e = s // steps_per_epoch takes the train examples in a permutation seeded by
    (seed, e); step s takes the next `batch_size` of them (the epoch's last batch is filled with
    empty rows, mask 0). `__call__(steps, rows)` collates the given rows of those steps' batches,
    all padded to one bucketed length (the longest of the steps' global batches, so every
    process pads alike), as {"x", "y", "mask"} [len(steps), len(rows), L].
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, cap: int, pad_id: int,
                 mask_prompt: bool):
        self.examples, self.B, self.seed, self.cap = examples, batch_size, seed, cap
        self.pad_id, self.mask_prompt = pad_id, mask_prompt
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self._order = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def batch(self, step: int) -> list[Encoded]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return [self.examples[j] for j in self.order(epoch)[i * self.B:(i + 1) * self.B]]

    def __call__(self, steps: range, rows) -> dict:
        chunks = [self.batch(s) for s in steps]
        length = bucket(max(len(e.ids) - 1 for c in chunks for e in c), self.cap)
        cols = [collate(c, self.pad_id, length, self.mask_prompt, rows=self.B) for c in chunks]
        return {k: np.stack([c[j][rows] for c in cols]) for j, k in enumerate(("x", "y", "mask"))}


# ---- evaluation --------------------------------------------------------------------------------
def evaluate_loss(model, examples: list[Encoded], batch_size: int, pad_id: int,
                  mask_prompt: bool = True) -> tuple[float, int]:
    """(mean masked loss over all unmasked tokens of `examples`, number of those tokens), with the
    trainer's own evaluation (jaxgpt.training.trainer.make_eval)."""
    from jaxgpt.training.trainer import make_eval

    arrays = stacked(examples, batch_size, model.config.block_size, pad_id, mask_prompt)
    graphdef, params = nnx.split(model)
    total, count = make_eval(graphdef)(params, nnx.State({}), arrays)
    return float(total) / max(float(count), 1.0), int(count)


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

def generate_answers(model, tok, template: str, records: list, max_new: int, progress=None,
                     slots: int = 8) -> list[dict]:
    """Greedy answers for each record's prompt, decoded by the one Engine `slots` rows at a time:
    [{"text", "ended"}] (ended: the end-of-text token came within the budget)."""
    from jaxgpt.decode.batch import run_requests
    from jaxgpt.decode.engine import Engine, Request

    L, eot = model.config.block_size, tok.eot_token
    requests = []
    for rec in records:
        msgs = templates.to_messages(rec, "record")[:-1]
        ids = prompt_ids(tok, template, msgs)[-max(L - max_new, 1):]  # room for the answer
        requests.append(Request(ids, min(max_new, L - len(ids)), temperature=0.0, stop=(eot,)))
    if not requests:
        return []
    engine = Engine(model, slots=min(slots, len(requests)))
    run_requests(engine, requests, on_done=(lambda i, r: progress.update(1)) if progress else None)
    out = []
    for r in requests:
        ended = eot in r.tokens
        row = r.tokens[:r.tokens.index(eot)] if ended else r.tokens
        out.append({"text": tok.decode(row), "ended": ended})
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
def load_base(cfg: SFTConfig):
    """The base model (float32 weights; int8 refused) with the compute dtype of the run."""
    from jaxgpt.formats.load import load

    if not cfg.ckpt:
        raise ConfigError("name the base model: python -m jaxgpt.sft CKPT --data FILE --out DIR")
    lm = load(cfg.ckpt)
    check_tokenizer(lm.tokenizer)
    from jaxgpt.model.gpt import rebuilt

    lm.model = rebuilt(lm.model, lm.config.for_run(cfg))  # the run's compute dtype / dropout / remat
    return lm


def _prepare_out(cfg: SFTConfig) -> None:
    """Refuse an --out that holds something (unless --resume, or --force replaces it)."""
    if not cfg.resume:
        ran = Path(cfg.out).is_dir() and checkpoint.latest_step(cfg.out) is not None
        files.check_writable(cfg.out, cfg.force, " (a training run: continue it with --resume)" if ran else "")


def _data(cfg: SFTConfig, lm, log):
    """(template, split records, train / val examples) of the run."""
    records = read_records(cfg.data)
    tok, template = lm.tokenizer, cfg.template or templates.default_template(lm)
    max_len = cfg.length_limit(lm.config.block_size)
    parts = split(records, cfg.val_frac, cfg.test_frac, cfg.seed)
    if not parts["train"]:
        raise ConfigError("the train split is empty; use a bigger dataset or smaller --val-frac/--test-frac")
    log(f"{len(records)} records: {len(parts['train'])} train, {len(parts['val'])} val, "
        f"{len(parts['test'])} test; template {template}")
    train_ex = encode_all(tok, template, parts["train"], max_len, log)
    val_ex = encode_all(tok, template, parts["val"], max_len)
    if not train_ex:
        raise ConfigError("no training example fits the context; raise --max-length or shorten replies")
    return template, parts, train_ex, val_ex


def _trainable_model(cfg: SFTConfig, base_model, log):
    """(model to train, the nnx filter of its trainable params, LoRA layer names)."""
    model = nnx.clone(base_model)
    adapted = []
    if cfg.lora_rank:
        adapted = lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    wrt = nnx.LoRAParam if cfg.lora_rank else nnx.Param
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    n_total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)"
        + (f"; LoRA rank {cfg.lora_rank} on {len(adapted)} layers" if adapted else ""))
    return model, wrt, adapted, n_train, n_total


def run_sft(cfg: SFTConfig, log=log_stderr) -> dict:
    """Fine-tune as `cfg` says on the trainer; writes cfg.out (checkpoints as it goes, the model
    or adapter and the report at the end). Returns a summary dict."""
    from tqdm import tqdm

    if not cfg.out:
        raise ConfigError("--out DIR is required (where the model and report go)")
    _prepare_out(cfg)
    resume_step = resume_point(cfg, KIND, "sft_config")[0] if cfg.resume else 0
    mesh = setup_devices(cfg)  # before anything starts JAX's backends (multi-process runs)
    lm = load_base(cfg)
    tok = lm.tokenizer
    template, parts, train_ex, val_ex = _data(cfg, lm, log)
    test_recs = parts["test"][:cfg.max_test] if cfg.max_test else parts["test"]
    pad, out = tok.eot_token, Path(cfg.out)
    model, wrt, adapted, n_train, n_total = _trainable_model(cfg, lm.model, log)
    parallel.check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    data = RecordBatches(train_ex, cfg.batch_size, cfg.seed, lm.config.block_size, pad, cfg.mask_prompt)
    total_steps = cfg.max_iters or cfg.epochs * data.steps_per_epoch
    sft_meta = {"template": template, "sft": {"base": str(cfg.ckpt), "data": str(cfg.data),
                                              "steps": total_steps, "lora_rank": cfg.lora_rank}}
    meta = {"kind": KIND, "sft_config": cfg.to_dict(), "model_config": lm.config.to_dict(),
            "tokenizer": tok.to_dict(), "source": f"sft of {cfg.ckpt}", **sft_meta}
    trainer = Trainer(model, optim=cfg, run=cfg, total_steps=total_steps, mesh=mesh, meta=meta,
                      wrt=wrt, log=log)
    if cfg.resume:
        resume_step = trainer.restore(out, warn=trainer.log)
    elif cfg.force and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    # ---- before: greedy test generations of the base (kept in the run folder for --resume) ----
    gen_bar = tqdm(total=2 * len(test_recs), desc="test generations", disable=not cfg.progress,
                   file=sys.stderr, leave=False)
    before_path = out / "before.json"
    if cfg.resume and before_path.is_file():
        before_answers = json.loads(before_path.read_text())
    else:
        t0 = time.time()
        before_answers = generate_answers(lm.model, tok, template, test_recs, cfg.gen_tokens, gen_bar)
        if trainer.main:
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
            atomic_write(before_path, json.dumps(before_answers).encode())
        trainer.timers["sample"] += time.time() - t0
    gen_bar.update(len(test_recs) - gen_bar.n)

    val = stacked(val_ex, cfg.batch_size, lm.config.block_size, pad, cfg.mask_prompt,
                  trainer.eval_rows) if val_ex else None
    val_tokens = int(stacked(val_ex, cfg.batch_size, lm.config.block_size, pad,
                             cfg.mask_prompt)["mask"].sum()) if val_ex else 0
    hooks = [Eval(cfg.eval_interval, lambda step: {"val_loss": trainer.evaluate(val)})] if val else []
    run = trainer.fit(lambda steps: data(steps, trainer.local_rows), hooks,
                      rows=read_rows(out, resume_step) if cfg.resume else None)
    if run["stopped_by"]:
        gen_bar.close()
        return {"steps": run["step"], "stopped_by": run["stopped_by"], "out": cfg.out}

    # ---- after ----
    trained = trainer.host_model()
    plain = lora.merge(trained) if cfg.lora_rank else trained
    t0 = time.time()
    after_answers = generate_answers(plain, tok, template, test_recs, cfg.gen_tokens, gen_bar)
    trainer.timers["sample"] += time.time() - t0
    gen_bar.close()
    vals = [r["val_loss"] for r in run["rows"] if "val_loss" in r]
    before = {"val_loss": vals[0] if vals else None, "val_tokens": val_tokens,
              **score(before_answers, test_recs)}
    after = {"val_loss": vals[-1] if vals else None, "val_tokens": val_tokens,
             **score(after_answers, test_recs)}
    log(f"before: val loss {_fmt(before['val_loss'])}, test ROUGE-L {before['rouge_l']:.3f}, "
        f"ends with EOS {before['ends_with_eos']:.2f}")
    log(f"after:  val loss {_fmt(after['val_loss'])}, test ROUGE-L {after['rouge_l']:.3f}, "
        f"ends with EOS {after['ends_with_eos']:.2f}")

    # ---- write the adapter (a full fine-tune's model is its last checkpoint) and the report ----
    summary = {"before": before, "after": after, "steps": run["step"],
               "train_seconds": run["timers"]["steps"], "timers": run["timers"],
               "trainable_params": n_train, "total_params": n_total, "lora_layers": adapted,
               "template": template,
               "records": {k: len(v) for k, v in parts.items()}, "config": dataclasses.asdict(cfg)}
    if trainer.main:
        if cfg.lora_rank:
            lora.write_adapter(out, trained, {
                **sft_meta, "base": _portable(cfg.ckpt), "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                "targets": lora.parse_targets(cfg.lora_targets), "model_config": lm.config.to_dict()})
        _write_report(out, cfg, summary, test_recs, before_answers, after_answers,
                      getattr(tok, "chat_template", None))
    summary.update(out=cfg.out, stopped_by=None)
    return summary


def _portable(ckpt: str) -> str:
    """A local base path recorded absolute (so the adapter loads from anywhere); hub names as is."""
    p = Path(ckpt).expanduser()
    return str(p.resolve()) if p.exists() else ckpt

def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"

def _write_report(out: Path, cfg: SFTConfig, summary: dict, recs, before, after,
                  chat_template: str | None = None) -> None:
    """test_generations.jsonl, summary.json and report.md (metrics.jsonl and loss.png are the
    trainer's)."""
    lines = []
    for i, (rec, b, a) in enumerate(zip(recs, before, after)):
        msgs = templates.to_messages(rec, "record")
        ref = msgs[-1]["content"]
        lines.append(json.dumps({
            "index": i, "prompt": templates.render_prompt(summary["template"], msgs[:-1], chat_template),
            "reference": ref,
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
          f"{kind}; template `{s.get('template', cfg.template)}`; {s['steps']} steps of batch {cfg.batch_size}, "
          f"lr {cfg.peak_lr:g}, {s['train_seconds']:.0f} s of training; trainable params "
          f"{s['trainable_params']:,} of {s['total_params']:,}; prompt tokens "
          f"{'masked out of' if cfg.mask_prompt else 'included in'} the loss.",
          f"Records: {s['records']['train']} train, {s['records']['val']} val, "
          f"{s['records']['test']} test ({b['n']} generated, greedy, {cfg.gen_tokens} tokens max).", "",
          "| metric | before | after |", "|---|---|---|",
          f"| masked val loss (nats/token, {b['val_tokens']} tokens) | {_fmt(b['val_loss'])} | {_fmt(a['val_loss'])} |",
          f"| test exact match (normalized) | {b['exact_match']:.3f} | {a['exact_match']:.3f} |",
          f"| test ROUGE-L F1 | {b['rouge_l']:.3f} | {a['rouge_l']:.3f} |",
          f"| test answers ending with the end-of-text token | {b['ends_with_eos']:.3f} | {a['ends_with_eos']:.3f} |",
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
    template = cfg.template or templates.default_template(lm)
    max_len = cfg.length_limit(lm.config.block_size)
    ex = encode_all(lm.tokenizer, template, recs, max_len, log_stderr)
    loss, tokens = evaluate_loss(lm.model, ex, cfg.batch_size, lm.tokenizer.eot_token, cfg.mask_prompt)
    return {"loss": loss, "tokens": tokens}

def merge_adapter(adapter: str, out: str, base: str | None = None, force: bool = False) -> Path:
    """Fold a LoRA adapter into its base and save a plain jaxgpt checkpoint at `out`."""
    from jaxgpt.formats.load import load

    meta = lora.read_adapter_meta(adapter)
    files.check_writable(out, force)
    lm = load(base or meta["base"])
    lora.load_adapter(adapter, lm.model)
    merged = lora.merge(lm.model)
    extra = {"template": meta.get("template") or templates.default_template(lm), "source": f"{adapter} merged into {base or meta['base']}",
             "sft": meta.get("sft", {})}
    tok = lm.tokenizer.to_dict() if lm.tokenizer is not None else None
    return checkpoint.save_model(out, merged, tok, extra, force=force)
