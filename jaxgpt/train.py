"""Training: the pure jitted train step, the loop around it, and the `python -m jaxgpt.train` CLI."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import checkpoint, parallel
from jaxgpt.config import ConfigError, GPTConfig, TrainConfig, add_dataclass_flags
from jaxgpt.data import atomic_write, get_batch, prepare, step_rng
from jaxgpt.model import GPT, count_params
from jaxgpt.optim import lr_schedule, make_optimizer
from jaxgpt.sample import generate
from jaxgpt.tokenizer import tokenizer_from_dict

EVAL_SEED_OFFSET = 10_000_019  # eval batches come from their own fixed RNG stream

# glibc malloc settings the CLI re-executes itself with (experiments/PERF.md): XLA mallocs each
# step's temporaries (~3 GB for the 124M model at 4 x 256) afresh on every execution, from its
# worker threads. By default glibc serves such blocks from per-thread arenas or with mmap and
# returns them to the kernel on free, so every step faults in and zeroes gigabytes of new pages
# (~0.7 s of system CPU per 124M step). One arena (arena_max=1), no mmap for big blocks
# (mmap_max=0) and no trimming keep the freed memory in the process for the next step, 1 GiB of
# top padding grows the heap in few steps, and hugetlb=1 backs it with transparent huge pages.
# The process keeps its peak heap until it exits. GLIBC_TUNABLES the user set come after these
# and win; JAXGPT_MALLOC_TUNING=0 turns the re-execution off.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=1099511627776:glibc.malloc.top_pad=1073741824")


def reexec_with_malloc_tunables(args: list[str]) -> None:
    """Replace this process by `python *args` with MALLOC_TUNABLES in GLIBC_TUNABLES (glibc reads
    them only at process start), unless they are already there, JAXGPT_MALLOC_TUNING=0, or the
    C library is not glibc. Same pid, so signals and the parent's wait see no difference."""
    import platform

    env = os.environ
    if (env.get("JAXGPT_MALLOC_TUNING", "1") == "0" or MALLOC_TUNABLES in env.get("GLIBC_TUNABLES", "")
            or platform.libc_ver()[0] != "glibc"):
        return
    tunables = ":".join(filter(None, [MALLOC_TUNABLES, env.get("GLIBC_TUNABLES")]))
    sys.stdout.flush()
    sys.stderr.flush()
    import subprocess  # for the interpreter's own flags (-u, -X ..., -W ...), kept across the exec

    argv = [sys.executable, *subprocess._args_from_interpreter_flags(), *args]
    os.execve(sys.executable, argv, {**env, "GLIBC_TUNABLES": tunables})


# ---- the pure functions -------------------------------------------------------------------------
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of logits [B, T, V] against targets [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def head_loss(model: GPT, h: jax.Array, targets: jax.Array, chunk_rows: int = 1024,
              min_logits: int = 2 ** 27) -> jax.Array:
    """Mean cross-entropy of the tied head at final hidden states h [N, C] against targets [N].

    When the logits would be large (N * vocab >= min_logits: 0.5 GiB in float32; GPT-2 at
    8 x 1024 has 1.5 GiB, and the head's backward makes several such copies) they are computed
    `chunk_rows` rows at a time in a `lax.map`, with the chunk's forward recomputed in the
    backward pass (`jax.checkpoint`): only one chunk of logits is ever alive. Same value and
    gradients as `cross_entropy(model(x)[0], y)`; small runs (the baby model) use one chunk.
    """
    def chunk_sum(hc, yc):  # summed loss of one chunk of rows
        logits = model.wte.attend(hc).astype(jnp.float32)  # [rows, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yc).sum()

    N = h.shape[0]
    targets = targets.reshape(N)
    if N * model.config.vocab_size < min_logits or N % chunk_rows or N == chunk_rows:
        return chunk_sum(h, targets) / N
    sums = jax.lax.map(jax.checkpoint(lambda a: chunk_sum(*a)),
                       (h.reshape(N // chunk_rows, chunk_rows, -1), targets.reshape(-1, chunk_rows)))
    return sums.sum() / N


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig,
                    state_shardings=None):
    """`train_step(state, batch) -> (state, metrics)`, jitted, with the state donated.

    state = {"params", "opt_state", "step"}. batch = (x, y), each int32 [K, grad_accum, B/accum, T]:
    K optimizer steps run inside one compiled `lax.scan`, so the host dispatches once per K
    steps (on a 2-core CPU this is ~30% faster for the baby model than one call per step).
    Gradients of the micro-batches are averaged in an inner scan. metrics have a leading [K].
    `state_shardings` pins the output state to the input's layout (replicated or FSDP).
    """
    schedule = lr_schedule(cfg)
    base_key = jax.random.key(cfg.seed)

    def loss_fn(params, x, y, key):
        model = nnx.merge(graphdef, params)
        return head_loss(model, model(x, key=key if cfg.dropout > 0 else None, hidden=True)[0], y)

    grad_fn = jax.value_and_grad(loss_fn)

    def one_step(state, batch):
        x, y = batch  # [A, B/A, T]
        # dropout noise is a function of (seed, step), so a resumed run draws the same masks
        keys = jax.random.split(jax.random.fold_in(base_key, state["step"]), x.shape[0])
        if x.shape[0] == 1:
            loss, grads = grad_fn(state["params"], x[0], y[0], keys[0])
        else:
            def micro(acc, inputs):  # accumulate (loss, grads) over micro-batches
                return jax.tree.map(jnp.add, acc, grad_fn(state["params"], *inputs)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, grads), _ = jax.lax.scan(micro, zeros, (x, y, keys))
            loss, grads = jax.tree.map(lambda a: a / x.shape[0], (loss, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def train_step(state, batch):
        return jax.lax.scan(one_step, state, batch)

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=out_shardings)


def make_eval_fn(graphdef):
    """`eval_loss(params, xs, ys) -> mean loss` over stacked batches [N, B, T] (one call)."""

    @jax.jit
    def eval_loss(params, xs, ys):
        model = nnx.merge(graphdef, params)
        return jax.lax.map(lambda b: cross_entropy(model(b[0])[0], b[1]), (xs, ys)).mean()

    return eval_loss


# ---- the run --------------------------------------------------------------------------------
IGNORED_ON_RESUME = ("resume", "progress", "remat", "log_interval", "eval_interval", "eval_iters",
                     "mesh", "coordinator", "num_processes", "process_id", "init_timeout",
                     "sample_tokens", "ckpt_interval", "keep_checkpoints", "deterministic")


def _check_writable(out: Path) -> None:
    """Fail early (before anything is written) if `out` cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out} is not writable")


def _init_from(cfg: TrainConfig):
    """(model config, tokenizer, params) of the model named by --init-from, for fine-tuning.

    The architecture comes from the loaded model; --dropout and --dtype apply, and a smaller
    --block-size crops the learned positions (as nanoGPT's crop_block_size).
    """
    from jaxgpt.api import load

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
    if lm.tokenizer.name != cfg.tokenizer:
        raise ConfigError(f"{cfg.init_from} uses the {lm.tokenizer.name} tokenizer; "
                          f"pass --tokenizer {lm.tokenizer.name}")
    model_cfg = dataclasses.replace(base, block_size=block, dropout=cfg.dropout, dtype=cfg.dtype,
                                    remat=cfg.remat)
    params = nnx.state(lm.model, nnx.Param)
    params["wpe"]["embedding"] = nnx.Param(params["wpe"]["embedding"][...][:block])
    return model_cfg, lm.tokenizer, params


def _resume_check(cfg: TrainConfig) -> tuple[int, dict]:
    """The saved (step, meta) to resume from; refuses a config that disagrees with the saved one."""
    step, meta = checkpoint.read_meta(cfg.out)
    if meta.get("quant"):
        raise ConfigError(f"{cfg.out} is an int8-quantized model: it cannot be trained further "
                          f"(fine-tune the float model, then quantize)")
    if "train_config" not in meta:
        raise ConfigError(f"{cfg.out} holds weights only (a converted model), not a training run "
                          f"to resume; start a new run with --init-from {cfg.out}")
    saved, now = meta["train_config"], cfg.to_dict()
    diff = [k for k in now if k not in IGNORED_ON_RESUME and saved.get(k) != now[k]]
    if diff:
        pairs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (saved) vs {now[k]!r}" for k in diff)
        raise ConfigError(f"--resume config disagrees with the checkpoint in {cfg.out}: {pairs}")
    return step, meta


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def sample_text(model, tok, n_tokens: int, seed: int) -> str:
    """A short sample from the model, starting from a newline (char) or <|endoftext|> (gpt2)."""
    start = tok.eot_token if tok.eot_token is not None else tok.encode("\n")[0]
    ids = generate(model, np.array([[start]]), n_tokens, key=jax.random.key(seed), temperature=0.8,
                   top_k=200, eot=tok.eot_token)
    ids = np.asarray(ids[0, 1:])
    if tok.eot_token is not None and (ids == tok.eot_token).any():
        ids = ids[: int(np.argmax(ids == tok.eot_token))]
    return tok.decode(ids)


def plot_losses(rows: list[dict], path: Path) -> None:
    """Train and val loss against step, as a PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())


def _log_stderr(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)  # prints above the progress bar instead of through it


def train(cfg: TrainConfig, log=_log_stderr) -> dict:
    """Train a GPT as `cfg` says. Raises ConfigError on bad input.

    Returns a summary: step, val_loss, train_loss, params (count), compile_s, ms_per_iter,
    stopped_by (a signal name or None), state (params + optimizer state), and the trained
    `model` and its `tokenizer`, ready to sample from in a notebook.

    `log(str)` receives the run's messages (evals, samples, interruptions); default: stderr.
    """
    out = Path(cfg.out)
    # 1. validate everything that can be validated before writing a byte
    _check_writable(out)
    existing = None if cfg.resume else checkpoint.latest_step(out)
    if existing is not None:  # refused now, not by orbax's first save minutes later
        raise ConfigError(f"{out} already holds a training run (checkpoint at step {existing}): "
                          f"continue it with --resume, or pick another --out (or delete that one)")
    shape_cfg = cfg.model_config(vocab_size=1)  # preset / shape errors surface here
    resume_step, resume_meta = _resume_check(cfg) if cfg.resume else (0, None)
    parallel.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.init_timeout)
    mesh = parallel.make_mesh(cfg.mesh)
    main_process = parallel.is_main()  # only process 0 logs and writes run files
    if not main_process:
        log = lambda msg: None  # noqa: E731
    parallel.check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    init_params, tok = None, None
    if cfg.resume:  # the saved run fixes the model shape and the tokenizer
        model_cfg = dataclasses.replace(GPTConfig.from_dict(resume_meta["model_config"]),
                                        remat=cfg.remat)  # remat changes memory, not the math
        tok = tokenizer_from_dict(resume_meta["tokenizer"])
    elif cfg.init_from:
        model_cfg, tok, init_params = _init_from(cfg)
    block = model_cfg.block_size if tok is not None else shape_cfg.block_size
    data = prepare(cfg.data, cfg.tokenizer, out / "data", block_size=block, progress=cfg.progress,
                   tok=tok)
    tok = data.tokenizer
    if not cfg.resume and not cfg.init_from:  # from scratch: the vocabulary comes from the data
        model_cfg = cfg.model_config(vocab_size=tok.vocab_size)

    # 2. model, optimizer, state on the mesh (replicated, or split over `fsdp`)
    model = GPT(model_cfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    if init_params is not None:  # fine-tuning: start from the loaded weights
        params = jax.tree.map(lambda new, old: jnp.asarray(old, new.dtype), params, init_params)
    tx = make_optimizer(cfg)
    rep = parallel.replicated(mesh)
    shardings = {"params": parallel.state_shardings(mesh, params),
                 "opt_state": parallel.state_shardings(mesh, jax.eval_shape(tx.init, params)),
                 "step": rep}
    params = parallel.put_global(params, shardings["params"])  # same seed => same init everywhere
    state = {"params": params,
             "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
             "step": jax.device_put(jnp.array(0, jnp.int32), rep)}
    del model, params
    n_params = count_params(state["params"])
    if cfg.resume:  # every process restores its own shards
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                state)
        step, p, o, _ = checkpoint.restore(cfg.out, abstract["params"], abstract["opt_state"],
                                           step=resume_step)
        state = {"params": p, "opt_state": o, "step": jax.device_put(jnp.array(step, jnp.int32), rep)}
    start = resume_step

    # 3. run files: config, metrics (a resumed run drops rows past its checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "tokenizer": tok.to_dict(), "data_seed": cfg.seed, "n_params": n_params}
    metrics_path = out / "metrics.jsonl"
    rows = []
    if cfg.resume and metrics_path.exists():
        rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if r["step"] <= start]
    if main_process:
        atomic_write(out / "config.json", json.dumps(meta, indent=2).encode())
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    mngr = checkpoint.manager(cfg.out, keep=cfg.keep_checkpoints)

    train_step = make_train_step(graphdef, tx, cfg, shardings)
    eval_loss = make_eval_fn(graphdef)
    # this process's rows of every global batch [steps, accum, B/accum, T] and eval batch [N, B, T]
    B, A = cfg.batch_size, cfg.grad_accum
    mine = parallel.local_rows(parallel.batch_sharding(mesh, 4, 2), (1, A, B // A, block), 2)
    train_rows = np.arange(B).reshape(A, B // A)[:, mine].ravel()
    eval_rows = parallel.local_rows(parallel.batch_sharding(mesh, 3, 1), (1, B, block), 1)
    erng = np.random.default_rng([cfg.seed, EVAL_SEED_OFFSET])
    ev = [get_batch(data.val, block, B, erng, eval_rows) for _ in range(cfg.eval_iters)]
    ev_shape = (cfg.eval_iters, B, block)
    ev_x = parallel.shard_batch(mesh, np.stack([e[0] for e in ev]), 1, global_shape=ev_shape)
    ev_y = parallel.shard_batch(mesh, np.stack([e[1] for e in ev]), 1, global_shape=ev_shape)
    tokens_per_step = B * block
    samples = cfg.sample_tokens if jax.process_count() == 1 else 0  # sampling is single-process

    def write_row(row):
        rows.append(row)
        if not main_process:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(step):
        meta_step = {**meta, "step": step}
        checkpoint.save(mngr, step, state["params"], state["opt_state"], meta_step)

    log(f"jaxgpt: {n_params / 1e6:.2f}M params | {model_cfg.n_layer}L {model_cfg.n_head}H "
        f"{model_cfg.n_embd}C ctx {block} vocab {tok.vocab_size} | {len(jax.devices())} device(s) "
        f"[{jax.devices()[0].platform}] | batch {cfg.batch_size}x{block} | "
        f"{'resuming at step ' + str(start) if cfg.resume else 'fine-tuning ' + cfg.init_from if cfg.init_from else 'from scratch'}")

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_iters, initial=start, disable=not (cfg.progress and main_process), dynamic_ncols=True,
               unit="it", file=sys.stderr)
    K = cfg.steps_per_call
    every = (cfg.log_interval, cfg.eval_interval, cfg.ckpt_interval, K)
    steps_since, compile_s, t_run = 0, None, 0.0
    last_loss, last_val, last_good, stopped_by = float("nan"), None, start, None

    with jax.set_mesh(mesh), _StopSignal() as stop:
        try:
            step = start
            while True:
                # evaluate (val loss + a sample) at step 0, every eval_interval and at the end
                if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                    last_val = float(parallel.to_host(eval_loss(state["params"], ev_x, ev_y)))
                    row = {"step": step, "val_loss": last_val, "lr": float(lr_schedule(cfg)(step))}
                    if step > start:
                        row["train_loss"] = last_loss
                    write_row(row)
                    log(f"step {step}: val loss {last_val:.4f}" + (
                        f", train loss {last_loss:.4f}" if step > start else ""))
                    if samples and step > start:
                        text = sample_text(nnx.merge(graphdef, state["params"]), tok,
                                           samples, cfg.seed)
                        log("  sample: " + text.replace("\n", "\n          ")[:800])
                if step > start and (step % cfg.ckpt_interval == 0 or step == cfg.max_iters):
                    save(step)
                    last_good = step
                if step >= cfg.max_iters:
                    break
                if parallel.any_process(stop.signum is not None):  # all processes stop together
                    if last_good != step:
                        save(step)
                    stopped_by = signal.Signals(stop.signum or signal.SIGTERM).name
                    log(f"{stopped_by}: saved checkpoint at step {step} in {out}; "
                              f"continue with the same command plus --resume")
                    break
                # n optimizer steps in one call, up to the next log/eval/checkpoint/K boundary
                n = min([cfg.max_iters - step] + [e - step % e for e in every])
                xs, ys = zip(*(get_batch(data.train, block, B, step_rng(cfg.seed, s), train_rows)
                               for s in range(step, step + n)))
                gshape = (n, A, B // A, block)
                x = parallel.shard_batch(mesh, np.stack(xs).reshape(n, A, -1, block), 2, gshape)
                y = parallel.shard_batch(mesh, np.stack(ys).reshape(n, A, -1, block), 2, gshape)
                t0 = time.perf_counter()
                state, m = train_step(state, (x, y))
                m = {k: parallel.to_host(v) for k, v in m.items()}
                losses = m["loss"]  # syncs: the step is done, its loss checked
                if compile_s is None:  # the first call includes compilation
                    compile_s = time.perf_counter() - t0
                else:
                    t_run += time.perf_counter() - t0
                    steps_since += n
                bad = ~np.isfinite(losses)
                if bad.any():
                    raise FloatingPointError(
                        f"loss became {losses[bad][0]} at step {step + int(np.argmax(bad)) + 1}")
                step += n
                last_loss = float(losses[-1])
                bar.update(n)
                if step % cfg.log_interval == 0:
                    tps = tokens_per_step * steps_since / max(t_run, 1e-9) if steps_since else 0.0
                    write_row({"step": step, "train_loss": last_loss, "lr": float(m["lr"][-1]),
                               "grad_norm": float(m["grad_norm"][-1]), "tokens_per_s": round(tps, 1)})
                    bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        except FloatingPointError as e:
            kept = (f"the last good checkpoint (step {last_good}) is kept in "
                    f"{checkpoint.checkpoint_dir(out)}" if last_good > 0 else "no checkpoint was saved")
            raise ConfigError(f"training stopped: {e}; {kept} (try a lower --lr)") from None
        finally:
            bar.close()

    if main_process:
        plot_losses(rows, out / "loss.png")
    summary = {"step": step, "val_loss": last_val, "train_loss": last_loss, "params": n_params,
               "compile_s": compile_s, "stopped_by": stopped_by,
               "ms_per_iter": 1000 * t_run / max(steps_since, 1), "state": state,
               "model": nnx.merge(graphdef, state["params"]), "tokenizer": tok}
    return summary


# ---- CLI ----------------------------------------------------------------------------------------
HELP = {
    "data": "text file to train on (UTF-8); default: Tiny Shakespeare shipped with jaxgpt",
    "tokenizer": "char (vocabulary built from the corpus) or gpt2 (GPT-2 BPE, 50257 tokens)",
    "preset": "model shape: baby (4L/4H/128, ctx 64), gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl",
    "n_layer": "number of transformer blocks (overrides the preset)",
    "n_head": "attention heads per block (overrides the preset); must divide --n-embd",
    "n_embd": "width of the residual stream (overrides the preset)",
    "block_size": "context length in tokens (overrides the preset)",
    "dropout": "dropout rate for training (0 disables; always off at evaluation)",
    "remat": "activation rematerialisation: recompute each block's activations in the backward "
             "pass instead of storing them (less memory, about a third more compute)",
    "init_from": "fine-tune from this model instead of a random init: a jaxgpt run dir, a Hugging "
                 "Face GPT-2 folder, a hub name (gpt2, gpt2-medium, ...) or a nanoGPT ckpt.pt",
    "dtype": "compute dtype: float32, or bfloat16/float16 for activations and matmuls "
             "(params and optimizer state stay float32)",
    "batch_size": "global batch size in sequences per optimizer step (split over all devices)",
    "grad_accum": "gradient-accumulation micro-steps per optimizer step (divides --batch-size)",
    "max_iters": "number of optimizer steps",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine decay (default: lr/10)",
    "warmup_iters": "linear warmup steps from 0 to --lr",
    "lr_decay_iters": "step at which the cosine decay reaches --min-lr (default: --max-iters)",
    "weight_decay": "AdamW weight decay, applied to 2-D weights only (kernels, embeddings)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip gradients to this global norm (0 disables)",
    "seed": "seed of the initialisation, the data order and dropout",
    "steps_per_call": "optimizer steps fused into one jitted call (fewer host round trips; "
                      "logs, evals and checkpoints still land on their exact steps)",
    "mesh": "device mesh, e.g. data=2,fsdp=2 (fsdp shards params and optimizer state; "
            "default: all devices on data)",
    "coordinator": "HOST:PORT of process 0 for a multi-process run (jax.distributed), or auto to "
                   "detect a TPU pod / SLURM job",
    "num_processes": "number of processes of a multi-process run",
    "process_id": "index of this process (0 = the one that writes logs)",
    "init_timeout": "seconds to wait for the coordinator before giving up",
    "eval_interval": "evaluate the val loss (and print a sample) every N steps",
    "eval_iters": "number of fixed val batches per evaluation",
    "log_interval": "write a metrics row every N steps",
    "sample_tokens": "tokens in the sample printed at each evaluation (0: no samples)",
    "out": "output directory (checkpoints, metrics.jsonl, loss.png, config.json, data cache)",
    "ckpt_interval": "save a checkpoint every N steps (and at the end, and on SIGTERM/SIGINT)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue the run in --out from its newest checkpoint (same flags required)",
    "progress": "show a progress bar (--no-progress to hide it)",
    "deterministic": "GPU: XLA's deterministic kernels, so the same seed gives the same losses "
                     "(default). --no-deterministic is faster (124M bf16 on an H200: 48.5 vs 102 "
                     "ms/step, with cuDNN's fused attention) but runs differ in the last digits. "
                     "CPU runs are deterministic either way",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, named --field-name, defaulting to the dataclass default."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.train",
        description="Train a GPT from scratch. With no flags: the baby model, char-level, on Tiny "
                    "Shakespeare (nanoGPT's CPU recipe), writing to out/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(p, TrainConfig, HELP)
    return p


def parse_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg.deterministic:  # before JAX starts its backends
            parallel.deterministic_gpu_ops()
        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["stopped_by"]:
        return 128 + signal.Signals[summary["stopped_by"]].value
    if not parallel.is_main():
        return 0
    print(f"done: {summary['step']} steps, val loss {summary['val_loss']:.4f}, "
          f"{summary['ms_per_iter']:.1f} ms/iter, compile {summary['compile_s'] or 0:.1f} s, "
          f"outputs in {cfg.out}/", file=sys.stderr)
    if cfg.sample_tokens and jax.process_count() == 1:
        # the final sample: same length as the in-training ones, so it reuses their compilation
        print(sample_text(summary["model"], summary["tokenizer"], cfg.sample_tokens, cfg.seed + 1))
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables(["-m", "jaxgpt.train", *sys.argv[1:]])
    sys.exit(main())
