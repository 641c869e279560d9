"""The one trainer: pretraining, full fine-tuning and LoRA differ only in their batches and in
which parameters train; everything else is here.

- state = {"params": the trainable params, "opt_state", "step"}, plus `frozen` (the rest of the
  model, e.g. the base weights under LoRA: read, never updated, never saved with the run);
- one pure jitted step (`make_step`) built from a loss that returns (loss_sum, token_count):
  K optimizer steps per call in a `lax.scan`, gradient accumulation over micro-batches in an
  inner scan, the mean taken once as sum / count, so accumulation and data parallelism give
  exactly the token-weighted mean of the global batch;
- the (data, fsdp) mesh and its shardings (jaxgpt.parallel), declared once at the edges;
- init or resume from the run's orbax checkpoints (jaxgpt.checkpoint), the newest intact one;
- `Trainer.fit`: the loop, with hooks for evaluation and samples, and the trainer's own
  bookkeeping: metrics.jsonl rows as they happen, the progress bar, periodic checkpoints,
  SIGTERM/SIGINT (save, then stop), the NaN guard, and the time split of the run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import parallel
from jaxgpt.formats import checkpoint
from jaxgpt.config import ConfigError, OptimConfig, RunConfig
from jaxgpt.losses import lm_loss
from jaxgpt.model.gpt import count_params
from jaxgpt.optim import lr_schedule, make_optimizer
from jaxgpt.files import WriteError, atomic_write, writing

EVAL_TOKENS = 16384  # tokens per evaluation forward (see Trainer.evaluate)
# loss_fn(model, batch, key) -> (summed loss, counted targets) or (summed loss, counted targets,
# extras): batch is a dict of [B, ...] arrays; extras {name: (sum, count)} are further metrics a loss
# reports (DPO's rewards, GRPO's KL), each summed and counted like the loss and logged as sum / count
LossFn = Callable[..., tuple]


def _parts(out) -> tuple:
    """A loss_fn's result as (total, count, extras)."""
    return (out[0], out[1], out[2] if len(out) > 2 else {})


def make_step(graphdef, tx: optax.GradientTransformation, schedule, *, loss_fn: LossFn = lm_loss,
              seed: int = 0, dropout: bool = False, state_shardings=None):
    """`step(state, frozen, batch) -> (state, metrics)`, jitted, the state donated.

    batch: a dict of arrays [K, A, B/A, ...]: K optimizer steps, each of A micro-batches. The
    gradient of each step is d(sum of the A micro-batches' loss sums) / d(params), divided by
    their total count; the logged loss is the same sum / count. metrics have a leading [K]:
    loss, grad_norm, lr, tokens (counted targets). Dropout keys are a function of (seed, step),
    so a resumed run draws the same masks. `state_shardings` pins the output state's layout.
    """
    base_key = jax.random.key(seed)

    def loss_sum(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        total, count, extras = _parts(loss_fn(model, batch, key if dropout else None))
        return total, (count, extras)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def one_step(state, frozen, batch):
        A = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(base_key, state["step"]), A)

        def micro(acc, inputs):  # accumulate (loss sum, count, extras, gradient sums) over micro-batches
            mb, key = inputs
            (total, (count, extras)), grads = grad_fn(state["params"], frozen, mb, key)
            return jax.tree.map(jnp.add, acc, (total, count, extras, grads)), None

        first = jax.tree.map(lambda a: a[0], batch)
        if A == 1:
            (total, (count, extras)), grads = grad_fn(state["params"], frozen, first, keys[0])
        else:
            shapes = jax.eval_shape(grad_fn, state["params"], frozen, first, keys[0])[0][1][1]
            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                     jax.tree.map(jnp.zeros_like, state["params"]))
            (total, count, extras, grads), _ = jax.lax.scan(micro, zeros, (batch, keys))
        n = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": total / n, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"]), "tokens": count,
                   **{"x/" + k: s / jnp.maximum(c, 1e-30) for k, (s, c) in extras.items()}}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def step(state, frozen, batch):
        return jax.lax.scan(lambda s, b: one_step(s, frozen, b), state, batch)

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


def make_eval(graphdef, loss_fn: LossFn = lm_loss):
    """`evaluate(params, frozen, batches) -> (loss sum, count)` over stacked batches [N, B, ...]
    in one call (a `lax.map` over N, so one compiled program whatever N); a loss with extras
    gives (loss sum, count, {name: (sum, count)})."""

    @jax.jit
    def evaluate(params, frozen, batches):
        model = nnx.merge(graphdef, params, frozen)
        sums, counts, extras = jax.lax.map(lambda b: _parts(loss_fn(model, b)), batches)
        total = jax.tree.map(jnp.sum, extras)
        return (sums.sum(), counts.sum(), total) if total else (sums.sum(), counts.sum())

    return evaluate


def flops_per_token(config, n_params: int) -> float:
    """Model FLOPs of one training token (forward + backward), as nanoGPT / PaLM count them:
    6 per weight (the position table is a lookup, not a matmul) + 12 L C T for attention."""
    n = n_params - config.block_size * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_embd * config.block_size


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the current call and exits."""

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


def setup_devices(run: RunConfig):
    """Join the multi-process runtime (if asked) and build the (data, fsdp) mesh."""
    parallel.initialize(run.coordinator, run.num_processes, run.process_id, run.init_timeout)
    return parallel.make_mesh(run.mesh)


def log_stderr(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)  # prints above the progress bar instead of through it


class Trainer:
    """Trains `model`'s params selected by `wrt` (nnx.Param: all; nnx.LoRAParam: the adapters).

    `optim` and `run` are the shared OptimConfig / RunConfig parts of a TrainConfig or SFTConfig;
    `total_steps` is the run's length; `meta` is saved with every checkpoint (and must say what
    kind of run it is). The batches come from the caller (`fit(batch_fn, ...)`), already cut to
    this process's rows (`self.local_rows`), so the trainer never sees where data comes from.
    """

    def __init__(self, model, *, optim: OptimConfig, run: RunConfig, total_steps: int, mesh,
                 meta: dict, wrt=nnx.Param, loss_fn: LossFn = lm_loss, log=log_stderr):
        self.optim, self.run, self.total_steps, self.mesh, self.meta = optim, run, total_steps, mesh, meta
        self.flops_per_token = flops_per_token(model.config, count_params(model))
        # what the loss's count counts (its mean's denominator): the name of the logged rate,
        # {counts}_per_s; "tokens" (the LM losses) also gives the MFU column
        self.counts = getattr(loss_fn, "counts", "tokens")
        self.peak = parallel.peak_flops(model.config.dtype)  # None: no MFU column
        self.main = parallel.is_main()  # only process 0 logs and writes run files
        self.log = log if self.main else (lambda msg: None)
        parallel.check_batch(optim.batch_size, optim.grad_accum, mesh)
        self.graphdef, trainable, frozen = nnx.split(model, wrt, ...)
        self.tx = make_optimizer(optim, total_steps)
        self.schedule = lr_schedule(optim, total_steps)
        rep = parallel.replicated(mesh)
        self.shardings = {"params": parallel.state_shardings(mesh, trainable),
                          "opt_state": parallel.state_shardings(mesh, jax.eval_shape(self.tx.init, trainable)),
                          "step": rep}
        self.frozen = parallel.put_global(frozen, parallel.state_shardings(mesh, frozen))
        params = parallel.put_global(trainable, self.shardings["params"])  # same seed => same init everywhere
        self.state = {"params": params,
                      "opt_state": jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(params),
                      "step": jax.device_put(jnp.array(0, jnp.int32), rep)}
        self.n_trainable = sum(x.size for x in jax.tree.leaves(params))
        self.step_fn = make_step(self.graphdef, self.tx, self.schedule, loss_fn=loss_fn, seed=optim.seed,
                                 dropout=run.dropout > 0, state_shardings=self.shardings)
        self.eval_fn = make_eval(self.graphdef, loss_fn)
        B, A = optim.batch_size, optim.grad_accum
        mine = parallel.local_rows(parallel.batch_sharding(mesh, 4, 2), (1, A, B // A, 1), 2)
        # this process's rows of every global batch, in the order the micro-batches take them
        self.local_rows = np.arange(B).reshape(A, B // A)[:, mine].ravel()
        self.eval_rows = parallel.local_rows(parallel.batch_sharding(mesh, 3, 1), (1, B, 1), 1)
        self.timers = {"steps": 0.0, "eval": 0.0, "sample": 0.0, "save": 0.0}
        self._mngr = None
        self._saving = None  # the step of the asynchronous checkpoint write in flight

    # ---- model views and state ------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(parallel.to_host(self.state["step"]))

    def model(self):
        """The model with the current weights (frozen + trainable), e.g. for samples."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)

    def host_model(self):
        """`model()` with every array whole in this process: in a multi-process run the weights
        span all processes' devices, and decoding (test generations, samples) needs a local copy."""
        if jax.process_count() == 1:
            return self.model()
        from jax.experimental import multihost_utils

        graphdef, state = nnx.split(self.model())
        return nnx.merge(graphdef, jax.tree.map(
            lambda x: jnp.asarray(multihost_utils.process_allgather(x, tiled=True)), state))

    def restore(self, out, step: int | None = None, warn=None) -> int:
        """Load the trainable params, optimizer state and step of run `out`'s checkpoint `step`
        (default: the newest intact one; `warn(msg)` hears of each damaged one skipped). Every
        process restores its own shards. Returns the step."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.state)
        step, p, o, _ = checkpoint.restore(out, abstract["params"], abstract["opt_state"], step=step,
                                           warn=warn)
        self.state = {"params": p, "opt_state": o,
                      "step": jax.device_put(jnp.array(step, jnp.int32), parallel.replicated(self.mesh))}
        return step

    def evaluate(self, batches: dict, tokens_per_forward: int = EVAL_TOKENS) -> float:
        """Mean loss over host batches {name: [N, B, ...]} (this process's rows of each), in one
        call. Evaluation is sized in tokens, not in training batches: g of the N batches go
        through the model together (g dividing N, g * B * T <= tokens_per_forward), so a small
        training batch does not make evaluation a long series of small forwards. The mean is
        sum / count over every row, so the grouping does not change it."""
        return self.evaluate_metrics(batches, tokens_per_forward)["loss"]

    def evaluate_metrics(self, batches: dict, tokens_per_forward: int = EVAL_TOKENS) -> dict:
        """{"loss": the mean of `evaluate`, and each extra of the loss (its sum / count)}."""
        v0 = next(iter(batches.values()))
        N, B, T = v0.shape[0], self.optim.batch_size, int(np.prod(v0.shape[2:]))
        g = max([d for d in range(1, N + 1) if N % d == 0 and d * B * T <= tokens_per_forward] or [1])
        arrays = {k: parallel.shard_batch(self.mesh, v.reshape(N // g, g * v.shape[1], *v.shape[2:]), 1,
                                          (N // g, g * B, *v.shape[2:])) for k, v in batches.items()}
        total, count, extras = _parts(self.eval_fn(self.state["params"], self.frozen, arrays))
        mean = lambda s, c: float(parallel.to_host(s)) / max(float(parallel.to_host(c)), 1e-30)
        return {"loss": float(parallel.to_host(total)) / max(float(parallel.to_host(count)), 1.0),
                **{k: mean(s, c) for k, (s, c) in extras.items()}}

    def save(self, step: int) -> None:
        """Start writing checkpoint `step` (asynchronously). A failed write (this one's start,
        or the previous one's end, which orbax reports here) is a WriteError naming it; the
        checkpoints finished before it stay as they are."""
        t0 = time.perf_counter()
        ckpts = checkpoint.checkpoint_dir(self.run.out)
        try:
            if self._mngr is not None:
                with writing(ckpts / str(self._saving)):  # the previous write's failure, as its own
                    self._mngr.wait_until_finished()
            with writing(ckpts / str(step)):
                if self._mngr is None:
                    self._mngr = checkpoint.manager(self.run.out, keep=self.run.keep_checkpoints,
                                                    async_save=True)
                if step in self._mngr.all_steps():  # a damaged checkpoint resuming skipped: replaced
                    self._mngr.delete(step)
                self._saving = step
                checkpoint.save(self._mngr, step, self.state["params"], self.state["opt_state"],
                                {**self.meta, "step": step}, wait=False)
        except WriteError:
            checkpoint.after_failed_write()
            raise
        self.timers["save"] += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the last (asynchronous) checkpoint write to finish (a WriteError if it
        failed); the manager is closed either way."""
        if self._mngr is None:
            return
        t0 = time.perf_counter()
        mngr, self._mngr = self._mngr, None
        try:
            with writing(checkpoint.checkpoint_dir(self.run.out) / str(self._saving)):
                mngr.wait_until_finished()
        except WriteError:
            checkpoint.after_failed_write()
            raise
        finally:
            try:
                mngr.close()
            except Exception:  # noqa: BLE001 (the same failure, already raised above)
                pass
            self._saving = None
            self.timers["save"] += time.perf_counter() - t0

    def _call(self, batch: dict, n: int) -> dict:
        """n optimizer steps in one call on host batches {name: [n, local rows, ...]}."""
        A, B = self.optim.grad_accum, self.optim.batch_size
        arrays = {}
        for k, v in batch.items():
            v = np.asarray(v).reshape(n, A, -1, *v.shape[2:])
            arrays[k] = parallel.shard_batch(self.mesh, v, 2, (n, A, B // A, *v.shape[3:]))
        self.state, m = self.step_fn(self.state, self.frozen, arrays)
        return {k: parallel.to_host(v) for k, v in m.items()}

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, batch_fn, hooks: Sequence[Hook] = (), *, rows: list[dict] | None = None,
            row_extras=None) -> dict:
        """Train from the current step to total_steps.

        batch_fn(steps: range) -> {name: [len(steps), len(local_rows), ...]} host arrays: the
        batches of those steps, this process's rows. `hooks`: the work between steps (Eval,
        Sample; checkpoints every run.ckpt_interval are the trainer's own). `rows`: metrics
        already logged (a resumed run's, up to its checkpoint). Each training row also carries
        the loss's extras (see LossFn) and row_extras(step) -> {metric: value} (e.g. GRPO's
        rewards of the step's rollouts). Returns the run summary."""
        run = self.run
        log = _Log(self, rows)
        hooks = [*hooks, Hook("checkpoint", run.ckpt_interval, self.save, at_start=False)]
        start = step = self.step
        st = {"start": start, "last_good": start, "last_loss": float("nan"), "eval": {}, "sample": None,
              "compile_s": None, "steps": 0, "tokens": 0.0, "stopped_by": None}
        t_wall = time.perf_counter()
        with jax.set_mesh(self.mesh), StopSignal() as stop:
            try:
                while True:
                    self._run_hooks(step, hooks, st, log)
                    if step >= self.total_steps or self._stopped(step, stop, st):
                        break
                    step = self._train_steps(step, batch_fn, hooks, st, log, row_extras)
            except FloatingPointError as e:
                kept = (f"the last good checkpoint (step {st['last_good']}) is kept in "
                        f"{checkpoint.checkpoint_dir(run.out)}" if st["last_good"] > start or start > 0
                        else "no checkpoint was saved")
                raise ConfigError(f"training stopped: {e}; {kept} (try a lower --lr)") from None
            finally:
                log.close()
                self.close()
        if st["compile_s"] is not None:
            self.timers["steps"] += st["compile_s"]
        if self.main:
            plot_losses(log.rows, Path(run.out) / "loss.png")
        return {"step": step, "train_loss": st["last_loss"], "eval": st["eval"], "sample": st["sample"],
                "rows": log.rows, "stopped_by": st["stopped_by"], "compile_s": st["compile_s"],
                "ms_per_iter": 1000 * (self.timers["steps"] - (st["compile_s"] or 0)) / max(st["steps"], 1),
                "wall_s": time.perf_counter() - t_wall, "timers": dict(self.timers)}

    def _run_hooks(self, step: int, hooks: list[Hook], st: dict, log: "_Log") -> None:
        """The hooks due at `step`: the evaluations (one metrics row), then samples, then a checkpoint."""
        due = [h for h in hooks if h.due(step, st["start"], self.total_steps)]
        evals = [h for h in due if h.kind == "eval"]
        if evals:
            t0, now = time.perf_counter(), {}
            for h in evals:
                now.update(h.fn(step))
            st["eval"] = {**st["eval"], **now}
            self.timers["eval"] += time.perf_counter() - t0
            row = {"step": step, **now, "lr": float(self.schedule(step))}
            if step > st["start"]:
                row["train_loss"] = st["last_loss"]
            log.write(row)
            self.log(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in now.items())
                     + (f", train loss {st['last_loss']:.4f}" if step > st["start"] else ""))
        for h in (h for h in due if h.kind == "sample"):
            t0 = time.perf_counter()
            st["sample"] = h.fn(step)
            self.timers["sample"] += time.perf_counter() - t0
            if st["sample"] is not None:
                self.log("  sample: " + st["sample"].replace("\n", "\n          ")[:800])
        if any(h.kind == "checkpoint" for h in due):
            self.save(step)
            st["last_good"] = step

    def _stopped(self, step: int, stop: StopSignal, st: dict) -> bool:
        """SIGTERM / Ctrl-C in any process: every process saves `step` and stops."""
        if not parallel.any_process(stop.signum is not None):
            return False
        if st["last_good"] != step:
            self.save(step)
        st["stopped_by"] = signal.Signals(stop.signum or signal.SIGTERM).name
        self.log(f"{st['stopped_by']}: saved checkpoint at step {step} in {self.run.out}; "
                 f"continue with the same command plus --resume")
        return True

    def _train_steps(self, step: int, batch_fn, hooks, st: dict, log: "_Log", row_extras) -> int:
        """Optimizer steps in one call, up to the next log / hook / K boundary; the new step."""
        run = self.run
        every = (run.log_interval, run.steps_per_call, run.eval_interval, *(h.every for h in hooks))
        n = min([self.total_steps - step] + [e - step % e for e in every])
        batch = batch_fn(range(step, step + n))
        t0 = time.perf_counter()
        m = self._call(batch, n)  # the metrics' transfer syncs: the steps are done
        dt = time.perf_counter() - t0
        if st["compile_s"] is None:  # the first call includes compilation
            st["compile_s"] = dt
        else:
            self.timers["steps"] += dt
            st["steps"] += n
            st["tokens"] += float(m["tokens"].sum())
        bad = ~np.isfinite(m["loss"])
        if bad.any():
            raise FloatingPointError(f"loss became {m['loss'][bad][0]} at step {step + int(np.argmax(bad)) + 1}")
        step += n
        st["last_loss"] = float(m["loss"][-1])
        log.bar.update(n)
        if step % run.log_interval == 0:
            tps = st["tokens"] / self.timers["steps"] if st["steps"] else 0.0
            row = {"step": step, "train_loss": st["last_loss"], "lr": float(m["lr"][-1]),
                   "grad_norm": float(m["grad_norm"][-1]), f"{self.counts}_per_s": round(tps, 1)}
            if self.peak and self.counts == "tokens":  # model FLOPs/s over the devices' peak
                row["mfu"] = round(tps * self.flops_per_token / self.peak, 4)
            row.update({k[2:]: float(v[-1]) for k, v in m.items() if k.startswith("x/")})
            if row_extras is not None:
                row.update(row_extras(step))
            log.write(row)
            log.bar.set_postfix(loss=f"{st['last_loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False,
                                **({"mfu": f"{row['mfu']:.0%}"} if self.peak else {}))
        return step


@dataclass(frozen=True)
class Hook:
    """Work the trainer does between optimizer steps: `fn(step)` every `every` steps, at the
    last step, and at the first one if `at_start`. kind "eval": fn -> {metric: value} (the due
    evaluations of a step make one metrics row); "sample": fn -> text (logged); "checkpoint"."""
    kind: str
    every: int
    fn: Callable
    at_start: bool = True

    def due(self, step: int, start: int, total: int) -> bool:
        if step == start and not self.at_start:
            return False
        return step % self.every == 0 or step == total


def Eval(every: int, fn: Callable[[int], dict]) -> Hook:
    """An evaluation every `every` steps, at the start and at the end: fn(step) -> {metric: value}."""
    return Hook("eval", every, fn)


def Sample(every: int, fn: Callable[[int], str | None]) -> Hook:
    """A text sample every `every` steps and at the end (not at the start): fn(step) -> text."""
    return Hook("sample", every, fn, at_start=False)


class _Log:
    """A run's metrics rows: metrics.jsonl (rewritten with the kept rows, then appended), the
    tracking sinks (TensorBoard, W&B) and the progress bar."""

    def __init__(self, trainer: Trainer, rows: list[dict] | None):
        from tqdm import tqdm

        self.main, out = trainer.main, Path(trainer.run.out)
        self.path, self.rows = out / "metrics.jsonl", list(rows or [])
        if self.main:
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self.sinks = metric_sinks(trainer.run, trainer.meta) if self.main else []
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, dynamic_ncols=True, unit="it",
                        disable=not (trainer.run.progress and self.main), file=sys.stderr)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.main:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for sink in self.sinks:
                sink(row)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink(None)


def plot_losses(rows: list[dict], path: Path) -> None:
    """Train and val loss against step, as a PNG (written atomically)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, a third of the import time

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
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
    atomic_write(path, png.getvalue())


def resume_point(cfg, kind: str, config_key: str) -> tuple[int, dict]:
    """(step, meta) of the newest intact checkpoint of the run in cfg.out, refusing one of
    another kind (pretraining vs SFT), a weights-only or int8 folder, or a different config.
    Shared by pretraining and SFT."""
    step, meta = checkpoint.read_meta(cfg.out)
    if meta.get("quant") or meta.get("model_config", {}).get("quant"):
        raise ConfigError(f"{cfg.out} is an int8-quantized model: it cannot be trained further "
                          f"(fine-tune the float model, then quantize)")
    saved_kind = meta.get("kind", "pretrain" if "train_config" in meta else "sft" if "sft_config" in meta else None)
    if saved_kind is None:
        raise ConfigError(f"{cfg.out} holds weights only (a converted model), not a training run "
                          f"to resume; start a new run with --init-from {cfg.out}")
    if saved_kind != kind:
        cli = {"pretrain": "python -m jaxgpt.train", "sft": "python -m jaxgpt.sft",
               "dpo": "python -m jaxgpt.dpo", "grpo": "python -m jaxgpt.grpo"}.get(saved_kind, "its own command")
        raise ConfigError(f"{cfg.out} is a {saved_kind} run, not a {kind} run: resume it with {cli} --resume")
    diff = cfg.resume_diff(meta[config_key])
    if diff:
        raise ConfigError(f"--resume config disagrees with the checkpoint in {cfg.out}: {', '.join(diff)}")
    return step, meta


def metric_sinks(run: RunConfig, meta: dict) -> list:
    """Where metrics rows go besides metrics.jsonl: TensorBoard (--tensorboard DIR, through
    tensorboardX) and Weights & Biases (--wandb PROJECT), both optional extras. Each sink is
    called with a row, and with None at the end of the run."""
    sinks = []
    if run.tensorboard:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs tensorboardX: pip install 'jaxgpt[tracking]'") from None
        writer = SummaryWriter(run.tensorboard)

        def tensorboard(row):
            if row is None:
                return writer.close()
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, row["step"])
            writer.flush()

        sinks.append(tensorboard)
    if run.wandb:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs wandb: pip install 'jaxgpt[tracking]'") from None
        wrun = wandb.init(project=run.wandb, dir=str(run.out), resume="allow",
                          config={k: v for k, v in meta.items() if k.endswith("config")})

        def log_wandb(row):
            if row is None:
                return wrun.finish()
            wrun.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

        sinks.append(log_wandb)
    return sinks


def read_rows(out, upto: int, warn=log_stderr) -> list[dict]:
    """The metrics rows a resumed run keeps: those logged up to its checkpoint's step. A torn
    last line (the run was killed, or the disk filled, while appending it) is dropped with a
    warning; a damaged line before it is a ConfigError naming it."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(i, l) for i, l in enumerate(path.read_text(errors="replace").splitlines(), 1) if l.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except (ValueError, RecursionError) as e:
            if k == len(lines) - 1:
                warn(f"warning: {path}: dropped its torn last line {i} ({len(line)} characters)")
                break
            raise ConfigError(f"{path}: line {i} is not a metrics row ({type(e).__name__}); "
                              "fix or remove the line, then resume") from None
        rows.append(row)
    return [r for r in rows if r["step"] <= upto]


def time_split(summary: dict) -> str:
    """'steps 71.2 s (compile 1.4) / eval 3.1 s / sample 2.0 s / save 0.4 s' for a closing line."""
    t = summary["timers"]
    return (f"steps {t['steps']:.1f} s (compile {summary['compile_s'] or 0:.1f}) / eval {t['eval']:.1f} s"
            f" / sample {t['sample']:.1f} s / save {t['save']:.1f} s")
