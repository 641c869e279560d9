"""Pretraining: token windows of a text corpus -> the trainer (jaxgpt.trainer) -> a run folder.

`train(TrainConfig(...))` validates the config, tokenizes the corpus (cached in OUT/data),
builds the model (from scratch, from --init-from, or the saved run for --resume), and hands the
trainer its batches (random windows, a pure function of (seed, step)), its evaluation (a fixed
set of val batches) and its samples. `python -m jaxgpt.train` is the CLI (jaxgpt/cli/train.py).
"""


import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import files, parallel
from jaxgpt.formats import checkpoint
from jaxgpt.config import ConfigError, GPTConfig, TrainConfig
from jaxgpt.data.textfile import get_batch, prepare, step_rng
from jaxgpt.model.gpt import GPT, count_params
from jaxgpt.tokenizers.tokenizer import tokenizer_from_dict
from jaxgpt.training.trainer import Eval, Sample, Trainer, read_rows, resume_point, setup_devices
from jaxgpt.files import atomic_write, writing

EVAL_SEED_OFFSET = 10_000_019  # eval batches come from their own fixed RNG stream
KIND = "pretrain"  # saved in every checkpoint: `jaxgpt.sft --resume` refuses such a run


def _init_from(cfg: TrainConfig):
    """(model config, tokenizer, params) of the model named by --init-from, for fine-tuning.

    The architecture comes from the loaded model; --dropout and --dtype apply, and a smaller
    --block-size crops the learned positions (as nanoGPT's crop_block_size).
    """
    from jaxgpt.formats.load import load

    lm = load(cfg.init_from)
    base = lm.config
    for name in ("n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(base, name):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} disagrees with "
                              f"--init-from {cfg.init_from} ({name}={getattr(base, name)}); drop the flag")
    block = cfg.block_size or base.block_size
    if block > base.block_size:
        raise ConfigError(f"--block-size {block} exceeds the context of {cfg.init_from} ({base.block_size})")
    if lm.tokenizer is None:
        raise ConfigError(f"{cfg.init_from} has no known tokenizer to tokenize --data with")
    if lm.tokenizer.name in ("char", "gpt2") and lm.tokenizer.name != cfg.tokenizer:  # a model's
        # own BPE (GGUF, tokenizer.json) tokenizes --data as it is, whatever --tokenizer says
        raise ConfigError(f"{cfg.init_from} uses the {lm.tokenizer.name} tokenizer; "
                          f"pass --tokenizer {lm.tokenizer.name}")
    model_cfg = dataclasses.replace(base.for_run(cfg), block_size=block)
    params = nnx.state(lm.model, nnx.Param)
    if "wpe" in params:  # learned positions (rotary ones need no cropping)
        params["wpe"]["embedding"] = nnx.Param(params["wpe"]["embedding"][...][:block])
    return model_cfg, lm.tokenizer, params


def sample_text(model, tok, n_tokens: int, seed: int) -> str:
    """A short sample from the model (temperature 0.8, top-k 200), starting from a newline (char)
    or <|endoftext|> (gpt2), cut at <|endoftext|>, decoded by the one Engine (one slot).

    Past the context, the sample continues from its last block_size/2 tokens as a new request
    (rather than re-running a full window for every token, as an exact sliding window would), so
    it costs about one decode step per token; the engine's programs are compiled once per run."""
    from jaxgpt.decode.batch import run_requests
    from jaxgpt.decode.engine import Engine, Request

    L, eot = model.config.block_size, tok.eot_token
    ids = [eot if eot is not None else tok.encode("\n")[0]]
    key = jax.random.key(seed)
    engine = Engine(model, slots=1)
    while len(ids) - 1 < n_tokens:
        context = ids if len(ids) < L else ids[-(L // 2):]
        new = min(n_tokens - (len(ids) - 1), L - len(context))
        request = Request(context, new, temperature=0.8, top_k=200, seed=jax.random.fold_in(key, len(ids)),
                          stop=(eot,) if eot is not None else ())
        row = list(run_requests(engine, [request])[0].tokens)
        if eot is not None and eot in row:
            ids += row[:row.index(eot)]
            break
        ids += row
    return tok.decode(ids[1:])


def eval_batches(cfg: TrainConfig, block: int) -> int:
    """Val batches per evaluation: --eval-iters (shards: --val-tokens), but at most one per training step between two
    evaluations, so an evaluation (a forward pass: about a third of a step) never costs more
    than the training it reports on (a 2-step smoke run of GPT-2 evaluates 2 batches, not 50)."""
    wanted = cfg.val_tokens // (cfg.batch_size * block) if is_shards(cfg.data) else cfg.eval_iters
    return max(1, min(wanted, cfg.eval_interval, cfg.max_iters))


def is_shards(data: str) -> bool:
    """--data names token shards (a folder, a glob or a .bin file), not a text file."""
    return Path(data).is_dir() or any(c in data for c in "*?[") or data.endswith(".bin")


class TextData:
    """A text file tokenized into OUT/data: random windows per step, fixed random val batches."""

    def __init__(self, cfg: TrainConfig, block: int, tok):
        self.cfg, self.block = cfg, block
        self.data = prepare(cfg.data, cfg.tokenizer, Path(cfg.out) / "data", block_size=block,
                            progress=cfg.progress, tok=tok)
        self.tokenizer, self.vocab_size = self.data.tokenizer, self.data.tokenizer.vocab_size

    def batch(self, step: int, rows) -> tuple[np.ndarray, np.ndarray]:
        return get_batch(self.data.train, self.block, self.cfg.batch_size,
                         step_rng(self.cfg.seed, step), rows)

    def val(self, n: int, rows) -> list:
        erng = np.random.default_rng([self.cfg.seed, EVAL_SEED_OFFSET])
        return [get_batch(self.data.val, self.block, self.cfg.batch_size, erng, rows) for _ in range(n)]


class ShardData:
    """Token shards (jaxgpt.shards): windows without replacement as f(seed, step), the fixed val
    prefix of --val-tokens."""

    def __init__(self, cfg: TrainConfig, block: int, tok):
        from jaxgpt.data.shards import ShardDataset

        self.cfg, self.block = cfg, block
        self.ds = ShardDataset(cfg.data)
        own = tokenizer_from_dict(self.ds.tokenizer)
        if tok is not None and tok.to_dict() != own.to_dict():
            raise ConfigError(f"--data {cfg.data} was tokenized with {_describe(own)}, but the model "
                              f"(--init-from / --resume) uses {_describe(tok)}")
        self.tokenizer = own
        self.vocab_size = self.ds.vocab_size  # a char preparation's EOT is one past its characters
        self.ds.num_val_batches(block, cfg.batch_size, cfg.val_tokens)  # no val shard: refused now

    def batch(self, step: int, rows) -> tuple[np.ndarray, np.ndarray]:
        return self.ds.batch(self.cfg.seed, step, self.cfg.batch_size, self.block, rows)

    def val(self, n: int, rows) -> list:
        n = min(n, self.ds.num_val_batches(self.block, self.cfg.batch_size, self.cfg.val_tokens))
        return list(self.ds.val_batches(self.block, self.cfg.batch_size,
                                        n * self.cfg.batch_size * self.block, rows))


def _hellaswag(cfg: TrainConfig, tok) -> list | None:
    """The --hellaswag examples, read (and checked) before anything is trained."""
    if not cfg.hellaswag:
        return None
    from jaxgpt.evaluate.hellaswag import read_examples

    if getattr(tok, "name", None) != "gpt2":
        raise ConfigError("--hellaswag needs a model with the GPT-2 tokenizer (--tokenizer gpt2)")
    return read_examples(cfg.hellaswag)


def _describe(tok) -> str:
    return f"the {tok.to_dict()['type']} tokenizer (vocab {tok.vocab_size})"


def _model_and_data(cfg: TrainConfig, resume_meta: dict | None):
    """(model config, data, init params or None) for a new, fine-tuning or resumed run."""
    shape_cfg = cfg.model_config(vocab_size=1, dtype="float32")  # preset / shape errors surface here
    init_params, tok, model_cfg = None, None, None
    if resume_meta is not None:  # the saved run fixes the model shape and the tokenizer
        model_cfg = dataclasses.replace(GPTConfig.from_dict(resume_meta["model_config"]),
                                        remat=cfg.remat)  # remat changes memory, not the math
        tok = tokenizer_from_dict(resume_meta["tokenizer"])
    elif cfg.init_from:
        model_cfg, tok, init_params = _init_from(cfg)
    block = model_cfg.block_size if model_cfg is not None else shape_cfg.block_size
    data = (ShardData if is_shards(cfg.data) else TextData)(cfg, block, tok)
    if model_cfg is None:  # from scratch: the vocabulary comes from the data
        model_cfg = cfg.model_config(vocab_size=data.vocab_size)
    elif model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(f"--data {cfg.data} has a vocabulary of {data.vocab_size}, more than the "
                          f"model's {model_cfg.vocab_size}")
    return model_cfg, data, init_params


def train(cfg: TrainConfig, log=None) -> dict:
    """Train a GPT as `cfg` says. Raises ConfigError on bad input.

    Returns a summary: step, val_loss, train_loss, params (count), compile_s, ms_per_iter,
    stopped_by (a signal name or None), timers (steps / eval / sample / save seconds), sample
    (the last one), state (params + optimizer state), and the trained `model` and its
    `tokenizer`, ready to sample from in a notebook. `log(str)` receives the run's messages.
    """
    out = Path(cfg.out)
    # 1. validate everything that can be validated before writing a byte
    files.check_permission(out)
    existing = None if cfg.resume else checkpoint.latest_step(out)
    if existing is not None:  # refused now, not by orbax's first save minutes later
        raise ConfigError(f"{out} already holds a training run (checkpoint at step {existing}): "
                          f"continue it with --resume, or pick another --out (or delete that one)")
    cfg.model_config(vocab_size=1, dtype="float32")  # shape errors, before any device work
    resume_step, resume_meta = resume_point(cfg, KIND, "train_config") if cfg.resume else (0, None)
    mesh = setup_devices(cfg)
    parallel.check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    model_cfg, data, init_params = _model_and_data(cfg, resume_meta)
    tok, block = data.tokenizer, model_cfg.block_size
    hellaswag = _hellaswag(cfg, tok)

    # 2. the model and the trainer (state on the mesh: replicated, or split over `fsdp`)
    model = GPT(model_cfg, rngs=nnx.Rngs(cfg.seed))
    if init_params is not None:  # fine-tuning: start from the loaded weights
        nnx.update(model, jax.tree.map(lambda new, old: jnp.asarray(old, new.dtype),
                                       nnx.state(model, nnx.Param), init_params))
    n_params = count_params(model)
    meta = {"kind": KIND, "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "tokenizer": tok.to_dict(), "data_seed": cfg.seed, "n_params": n_params}
    kw = {} if log is None else {"log": log}
    trainer = Trainer(model, optim=cfg, run=cfg, total_steps=cfg.max_iters, mesh=mesh, meta=meta, **kw)
    del model
    if cfg.resume:  # the newest intact checkpoint (a damaged newer one is skipped, with a warning)
        resume_step = trainer.restore(out, warn=trainer.log)
    if trainer.main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(meta, indent=2).encode())

    # 3. the hooks: batches as f(seed, step), fixed val batches, samples
    B = cfg.batch_size

    def batches(steps: range) -> dict:
        xs, ys = zip(*(data.batch(s, trainer.local_rows) for s in steps))
        return {"x": np.stack(xs), "y": np.stack(ys)}

    ev = data.val(eval_batches(cfg, block), trainer.eval_rows)
    val = {"x": np.stack([e[0] for e in ev]), "y": np.stack([e[1] for e in ev])}
    samples = cfg.sample_tokens if jax.process_count() == 1 else 0  # sampling is single-process

    trainer.log(f"jaxgpt: {n_params / 1e6:.2f}M params | {model_cfg.n_layer}L {model_cfg.n_head}H "
                f"{model_cfg.n_embd}C ctx {block} vocab {model_cfg.vocab_size} | {len(jax.devices())} device(s) "
                f"[{jax.devices()[0].platform}] | batch {B}x{block} | "
                + (f"resuming at step {resume_step}" if cfg.resume
                   else f"fine-tuning {cfg.init_from}" if cfg.init_from else "from scratch"))
    hooks = [Eval(cfg.eval_interval, lambda step: {"val_loss": trainer.evaluate(val)})]
    if hellaswag:
        def hellaswag_acc(step: int) -> dict:
            from jaxgpt.evaluate.hellaswag import score

            got = score(trainer.host_model(), tok, hellaswag, progress=False)
            return {"hellaswag_acc": got["acc"], "hellaswag_acc_norm": got["acc_norm"]}
        hooks.append(Eval(cfg.hellaswag_interval, hellaswag_acc))
    if samples:
        hooks.append(Sample(cfg.eval_interval, lambda step: sample_text(trainer.model(), tok, samples, cfg.seed)))
    summary = trainer.fit(batches, hooks, rows=read_rows(out, resume_step) if cfg.resume else None)
    summary.update(val_loss=summary["eval"].get("val_loss"), params=n_params, state=trainer.state,
                   model=trainer.model(), tokenizer=tok)
    return summary
