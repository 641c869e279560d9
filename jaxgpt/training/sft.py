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
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flax import nnx

from jaxgpt import parallel
from jaxgpt.config import ConfigError, RunConfig
from jaxgpt.data.records import Encoded, RecordBatches, encode_all, read_records, split, stacked
from jaxgpt.evaluate.answers import fmt, generate_answers, score, write_report
from jaxgpt.files import atomic_write, writing
from jaxgpt.model import lora
from jaxgpt.tokenizers import templates
from jaxgpt.training.trainer import Eval, Trainer, log_stderr, read_rows, resume_point, setup_devices
from jaxgpt.training.tuning import TuningConfig, load_base, prepare_out, trainable_model

KIND = "sft"  # saved in every checkpoint: `jaxgpt.train --resume` refuses such a run

@dataclass(frozen=True)
class SFTConfig(TuningConfig):
    """Every setting of an SFT run: the records and the report here, the base, template and LoRA
    from TuningConfig, the optimization and the run (mesh, accumulation, checkpoints, resume) from
    OptimConfig / RunConfig, with fine-tuning defaults; `python -m jaxgpt.sft` flags map onto
    these 1:1."""

    data: str | None = None  # JSON list or JSONL of records
    val_frac: float = 0.05
    test_frac: float = 0.10
    mask_prompt: bool = True  # --no-mask-prompt: the loss counts prompt tokens too
    max_length: int | None = None  # longest training sequence in tokens (default: the context)
    epochs: int = 2
    # evaluation and output
    gen_tokens: int = 128  # token budget of each test-split generation
    max_test: int = 0  # generate for at most this many test records (0: all)
    eval_only: bool = False
    eval_split: str = "val"
    json: bool = False
    merge: str | None = None  # LoRA adapter dir to merge into its base (with --out)
    base: str | None = None  # with --merge: use this base instead of the one the adapter names
    # SFT defaults of the shared fields (max_iters None: --epochs over the train split; lr None:
    # 5e-5 full fine-tuning, 1e-3 LoRA)
    batch_size: int = 8
    warmup_iters: int = 10
    weight_decay: float = 0.1
    eval_interval: int = 50
    log_interval: int = 10
    ckpt_interval: int = 100

    RESUMABLE = RunConfig.RESUMABLE + ("gen_tokens", "max_test", "eval_only", "eval_split", "json",
                                       "merge", "base", "force")
    USAGE = "python -m jaxgpt.sft CKPT --data FILE --out DIR"

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ConfigError(f"--val-frac ({self.val_frac}) and --test-frac ({self.test_frac}) must "
                              "be in [0, 1) and sum to less than 1")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2 tokens, got {self.max_length}")
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


# ---- training ----------------------------------------------------------------------------------
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


def run_sft(cfg: SFTConfig, log=log_stderr) -> dict:
    """Fine-tune as `cfg` says on the trainer; writes cfg.out (checkpoints as it goes, the model
    or adapter and the report at the end). Returns a summary dict."""
    from tqdm import tqdm

    if not cfg.out:
        raise ConfigError("--out DIR is required (where the model and report go)")
    prepare_out(cfg)
    resume_step = resume_point(cfg, KIND, "sft_config")[0] if cfg.resume else 0
    mesh = setup_devices(cfg)  # before anything starts JAX's backends (multi-process runs)
    lm = load_base(cfg)
    tok = lm.tokenizer
    template, parts, train_ex, val_ex = _data(cfg, lm, log)
    test_recs = parts["test"][:cfg.max_test] if cfg.max_test else parts["test"]
    pad, out = tok.eot_token, Path(cfg.out)
    model, wrt, adapted, n_train, n_total = trainable_model(cfg, lm.model, log)
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
    log(f"before: val loss {fmt(before['val_loss'])}, test ROUGE-L {before['rouge_l']:.3f}, "
        f"ends with EOS {before['ends_with_eos']:.2f}")
    log(f"after:  val loss {fmt(after['val_loss'])}, test ROUGE-L {after['rouge_l']:.3f}, "
        f"ends with EOS {after['ends_with_eos']:.2f}")

    # ---- write the adapter (a full fine-tune's model is its last checkpoint) and the report ----
    summary = {"before": before, "after": after, "steps": run["step"],
               "train_seconds": run["timers"]["steps"], "timers": run["timers"],
               "trainable_params": n_train, "total_params": n_total, "lora_layers": adapted,
               "template": template,
               "records": {k: len(v) for k, v in parts.items()}, "config": dataclasses.asdict(cfg)}
    if trainer.main:
        if cfg.lora_rank:
            lora.write_adapter(out, trained, cfg.adapter_meta(lm.config.to_dict(), **sft_meta))
        write_report(out, cfg, summary, test_recs, before_answers, after_answers,
                      getattr(tok, "chat_template", None))
    summary.update(out=cfg.out, stopped_by=None)
    return summary


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

