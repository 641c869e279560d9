"""Checkpoints with orbax: params, optimizer state and run metadata under OUT/checkpoints/<step>.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves only finished checkpoints visible; the newest finished one is what resumes.
Metadata (model config, train config, tokenizer, step, data seed) is JSON inside the step.
`save_model` writes a weights-only checkpoint (no optimizer state), e.g. converted GPT-2 weights.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.model.gpt import GPT
from jaxgpt.formats.shapes import check_tensors
from jaxgpt.tokenizers.tokenizer import tokenizer_from_dict
from jaxgpt.files import atomic_dir, write_error

CKPT_SUBDIR = "checkpoints"

# orbax logs routine saves and read-only opens through absl; keep the terminal for the progress bar
logging.getLogger("absl").setLevel(logging.CRITICAL)  # failures surface as exceptions


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out).resolve() / CKPT_SUBDIR


def manager(out: str | Path, keep: int = 2, read_only: bool = False,
            async_save: bool = False) -> ocp.CheckpointManager:
    """An orbax manager of OUT/checkpoints. `async_save`: `save` returns once the arrays are
    copied off the devices and the files are written by a background thread (the trainer waits
    for the last write before it returns)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           enable_async_checkpointing=async_save, read_only=read_only)
    _silence_closed_loop_callbacks()  # a failed write (a full disk) leaves the same callbacks
    return ocp.CheckpointManager(checkpoint_dir(out), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict[str, Any],
         wait: bool = True) -> None:
    """Write one complete checkpoint (atomic via orbax's tmp-dir + rename); `wait=False` with an
    asynchronous manager returns before the files are written."""
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
    ), force=True)
    if wait:
        mngr.wait_until_finished()


def latest_step(out: str | Path) -> int | None:
    d = checkpoint_dir(out)
    if not d.is_dir():
        return None
    return manager(out, read_only=True).latest_step()


def all_steps(out: str | Path) -> list[int]:
    """Every finished checkpoint's step, newest first."""
    d = checkpoint_dir(out)
    return sorted(manager(out, read_only=True).all_steps(), reverse=True) if d.is_dir() else []


class CorruptCheckpoint(ConfigError):
    """A checkpoint whose files cannot be read (truncated, overwritten, half-deleted)."""


def _damaged(out, step: int, e: Exception) -> ConfigError:
    if isinstance(e, CorruptCheckpoint):
        return e
    return CorruptCheckpoint(f"checkpoint {checkpoint_dir(out) / str(step)} is corrupt or unreadable: "
                             f"{type(e).__name__}: {str(e).split(' See full')[0].splitlines()[0][:160] if str(e) else ''}")


@contextmanager
def _quiet_asyncio():
    """A damaged checkpoint fails several of orbax's concurrent read tasks; the ones whose error
    is not the one raised are reported by asyncio ("Task exception was never retrieved", with a
    traceback) when they are collected. The error that matters is raised as a ConfigError; the
    leftovers are collected here, silently."""
    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()
        log.setLevel(level)


def after_failed_write() -> None:
    """After an asynchronous checkpoint write failed (a full disk), orbax's other write tasks of
    that checkpoint fail the same way and asyncio logs each one ("Task exception was never
    retrieved", with a traceback) whenever it is collected, up to the process's exit. The error
    that matters has been raised as a WriteError naming the checkpoint: silence the rest (and
    the RuntimeWarning for its write coroutines that were never awaited, printed at exit)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _closed_loop_callback(exc_type, exc, tb) -> bool:
    """Whether an error is orbax's leftover of an abandoned read: RuntimeError('Event loop is
    closed') raised inside asyncio's call_soon_threadsafe (TensorStore completing a read of a
    damaged checkpoint after orbax closed the event loop that was waiting for it)."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name in ("call_soon_threadsafe", "_check_closed")


def _silence_closed_loop_callbacks() -> None:
    """After a failed read of a damaged checkpoint, TensorStore's pending reads finish on their
    own threads and call back into the event loop orbax has closed; each prints a traceback (through
    sys.excepthook, threading.excepthook or sys.unraisablehook) at any later moment. Drop exactly
    those; every other error is printed as before. Installed once per process."""
    if getattr(sys.excepthook, "_jaxgpt_filter", False):
        return
    previous, previous_thread, previous_unraisable = sys.excepthook, threading.excepthook, sys.unraisablehook

    def hook(exc_type, exc, tb):
        if not _closed_loop_callback(exc_type, exc, tb):
            previous(exc_type, exc, tb)

    def thread_hook(args):
        if not _closed_loop_callback(args.exc_type, args.exc_value, args.exc_traceback):
            previous_thread(args)

    def unraisable_hook(args):
        code = getattr(args.object, "cr_code", None)  # an orbax coroutine of a damaged file read
        text = str(args.exc_value)  # or a failed write, collected after the error was raised
        leftover = (code is not None and "orbax" in code.co_filename
                    and (text.startswith("Encountered error while reading") or "shutting down" in text
                         or write_error("", args.exc_value) is not None))
        if not (leftover or _closed_loop_callback(args.exc_type, args.exc_value, args.exc_traceback)):
            previous_unraisable(args)

    hook._jaxgpt_filter = True
    sys.excepthook, threading.excepthook, sys.unraisablehook = hook, thread_hook, unraisable_hook


def _newest_first(out, step: int | None, read, warn=None):
    """read(step) for the given step, or for the newest checkpoint that reads without error: a
    damaged one is skipped (with `warn(message)`) in favour of the one before it, which is kept
    for exactly this. ConfigError when there is none, or none reads."""
    steps = [step] if step is not None else all_steps(out)
    if not steps:
        raise ConfigError(f"no checkpoint found in {checkpoint_dir(out)}")
    errors = []
    _silence_closed_loop_callbacks()  # (before reading: the callbacks may come during the read)
    for s in steps:
        try:
            with _quiet_asyncio():
                return read(s)
        except CorruptCheckpoint as e:
            errors.append(e)
        except ConfigError:  # a readable checkpoint that does not fit: no fallback
            raise
        except Exception as e:  # orbax raises many types for damaged files
            errors.append(_damaged(out, s, e))
        if warn is not None and s != steps[-1]:
            warn(f"warning: {errors[-1]}; using the checkpoint before it")
    raise errors[0]


def read_meta(out: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, metadata) of the given checkpoint, or of the newest one whose metadata reads;
    ConfigError if there is none."""

    def read(s):
        mngr = manager(out, read_only=True)
        try:
            meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        finally:
            mngr.close()
        if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
            raise ConfigError(f"checkpoint {checkpoint_dir(out) / str(s)} has no model config "
                              "(model_config is missing or not a JSON object)")
        return s, meta

    return _newest_first(out, step, read)


def restore(out: str | Path, abstract_params, abstract_opt_state=None, step: int | None = None,
            warn=None):
    """Restore (step, params, opt_state or None, meta), shaped and sharded like the abstract
    trees, from checkpoint `step` or the newest intact one (see _newest_first)."""

    def read(s):
        s, meta = read_meta(out, s)
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        mngr = manager(out, read_only=True)
        try:
            got = mngr.restore(s, args=ocp.args.Composite(**items))
        except ConfigError:
            raise
        except ValueError as e:  # orbax: the saved tree does not have this model's structure
            if "tree" in str(e).lower() or "shape" in str(e).lower() or "structure" in str(e).lower():
                raise ConfigError(f"checkpoint {checkpoint_dir(out) / str(s)} does not match this "
                                  f"model: {str(e).splitlines()[0][:160]}") from None
            raise
        finally:
            mngr.close()
        return s, got["params"], got.get("opt_state") if abstract_opt_state is not None else None, meta

    return _newest_first(out, step, read, warn)


def model_config(meta: dict, where) -> GPTConfig:
    """The GPTConfig of a checkpoint's metadata; a one-line ConfigError naming `where` if it is
    not one (a hand-edited or corrupt config)."""
    d = meta.get("model_config")
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: model_config is not a JSON object")
    try:
        return GPTConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad model_config ({type(e).__name__}: {str(e)[:160]})") from None


def saved_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Dotted parameter path -> shape of every array of the orbax tree saved at `path` (read from
    its metadata, no array data), or None when the metadata does not read (restoring it then
    reports the damage)."""
    try:
        tree = ocp.StandardCheckpointer().metadata(Path(path).resolve()).item_metadata.tree
    except Exception:
        return None
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, str(k)))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*prefix, str(i)))
        elif hasattr(node, "shape"):  # an nnx Variable is saved as {"value": array}
            out[".".join(prefix[:-1] if prefix[-1:] == ("value",) else prefix)] = tuple(node.shape)

    walk(tree, ())
    return out


def state_shapes(state) -> dict[str, tuple[int, ...]]:
    """Dotted parameter path -> shape of an nnx State (abstract or not), as `saved_shapes` names them."""
    return {".".join(map(str, path)): tuple(var.get_value().shape)
            for path, var in nnx.to_flat_state(state)}


def load_model(out: str | Path, step: int | None = None, warn=None):
    """(model, tokenizer, meta) from a jaxgpt run directory (by default its newest intact
    checkpoint; `warn(msg)` hears of a damaged newer one skipped). The saved arrays' shapes are
    compared with the model config (jaxgpt.shapes) before the model's shape is built."""
    s, meta = read_meta(out, step)  # every checkpoint of a run has the same model config
    where = checkpoint_dir(out) / str(s)
    config = model_config(meta, where)
    built = {}

    def expected():
        built["abstract"] = GPT.abstract(config)
        return state_shapes(nnx.state(built["abstract"]))

    saved = saved_shapes(where / "params")
    if saved is not None:
        check_tensors(config.n_layer, saved, expected, str(where), "its model_config")
    abstract = built.get("abstract") or GPT.abstract(config)
    graphdef, abstract_params = nnx.split(abstract)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                   abstract_params)
    _, params, _, meta = restore(out, abstract_params, step=step, warn=warn)
    # a converted model whose vocabulary jaxgpt cannot rebuild (e.g. a nanoGPT char model) has none
    tokenizer = tokenizer_from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    return nnx.merge(graphdef, params), tokenizer, meta








def save_model(out: str | Path, model: GPT, tokenizer_dict: dict | None,
               extra_meta: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write `model`'s params + metadata as a run directory that `load_model` reads (no optimizer).

    The directory is written atomically: into a temporary sibling, renamed into place at the end.
    """
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer_dict,
            **(extra_meta or {})}
    meta.setdefault("step", 0)
    params = nnx.state(model, nnx.Param)
    with atomic_dir(out, force) as tmp:
        mngr = manager(tmp, keep=1)
        # a full disk fails several of orbax's write tasks at once: the first is raised (a
        # WriteError, by atomic_dir); asyncio would log the others with tracebacks when they are
        # collected, at any moment up to exit, so it stays quiet unless the save succeeds
        log = logging.getLogger("asyncio")
        level = log.level
        log.setLevel(logging.CRITICAL)
        try:
            mngr.save(meta["step"], args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)
            mngr.wait_until_finished()
        except Exception:
            after_failed_write()
            raise
        log.setLevel(level)
        mngr.close()
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))  # human-readable copy, as train
    return Path(out)
