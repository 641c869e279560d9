"""Shared fixtures: a small corpus and a tiny, fast training configuration."""

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from jaxgpt.config import default_data_path

REPO = Path(__file__).resolve().parents[1]

# XLA's persistent compilation cache (runtime.enable_compilation_cache, which the train, sft, chat
# and serve CLIs turn on) goes to a folder of this session, shared by its CLI subprocesses, not
# to the user's ~/.cache/jaxgpt/xla: a test run neither reads programs left by other versions
# nor leaves thousands of its own behind.
os.environ.setdefault("JAXGPT_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jaxgpt-xla-cache-"))


def _no_persistent_cache_in_this_process():
    """In the pytest process itself the cache stays off (the CLI subprocesses keep it): once an
    in-process CLI test had turned it on, a later server test's first decode step aborted the
    whole session inside XLA (`executable.serialize()` writing the entry, in the scheduler
    thread; it hung once and aborted once in full runs, never with that test alone, cache on or off)."""
    from jaxgpt import runtime

    runtime.enable_compilation_cache = lambda: None


_no_persistent_cache_in_this_process()

# a tiny model that trains in seconds on a CPU core; every flag is a real CLI flag
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-iters", "4", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 60,000 characters of the shipped Tiny Shakespeare."""
    p = tmp_path_factory.mktemp("corpus") / "shakespeare_head.txt"
    p.write_text(Path(default_data_path()).read_text()[:60_000])
    return p


def run_cli(module: str, *args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m module args...` in a fresh interpreter; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=kw.get("cwd", REPO),
                          input=kw.get("input"))


def cli(module: str, *args, input: str = "") -> subprocess.CompletedProcess:
    """`python -m module args...` run in this process, as its `main(argv)` (jaxgpt.cli.<name>),
    with stdin, stdout and stderr swapped for strings; an uncaught exception's traceback goes to
    stderr with status 1, as the interpreter would end. For a command's refusals (exit 2 before
    any model work): it skips the interpreter start and the imports, ~5 s per call as a
    subprocess. What only a real process shows (signals, peak memory, environment read at
    start, the `python -m` shim) stays with run_cli, which every command also meets."""
    import contextlib
    import importlib
    import io
    import traceback

    main = importlib.import_module("jaxgpt.cli." + module.removeprefix("jaxgpt.")).main
    out, err, stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(input)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main([str(a) for a in args])
            except SystemExit as e:  # argparse's exit 2, or a command's own sys.exit
                status = e.code if isinstance(e.code, int) or e.code is None else 1
                if status == 1 and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)  # sys.exit("message")
            except Exception:  # noqa: BLE001 (a bug: the traceback a user would see)
                traceback.print_exc()
                status = 1
    finally:
        sys.stdin = stdin
    return subprocess.CompletedProcess([module, *map(str, args)], status or 0, out.getvalue(), err.getvalue())


def random_adapter(base_dir, out, rank, targets, seed):
    """A LoRA adapter folder on the model at base_dir with random, non-zero A and B, as
    jaxgpt.sft writes one; returns `out`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxgpt
    from jaxgpt.model import lora
    lm = jaxgpt.load(base_dir)
    lora.apply_lora(lm.model, rank, 2.0 * rank, targets, seed=seed)
    rng = np.random.RandomState(seed)
    state = nnx.state(lm.model, nnx.LoRAParam)
    nnx.update(lm.model, jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape).astype(np.float32) * 0.3), state))
    meta = {"base": str(base_dir), "rank": rank, "alpha": 2.0 * rank, "targets": targets,
            "model_config": lm.config.to_dict()}
    lora.save_adapter(out, lm.model, meta)
    return out


@contextmanager
def xla_compiles():
    """The list of XLA compilations (backend compile events) that happen inside the block."""
    import jax

    compiles = []
    listener = lambda name, secs, **kw: (compiles.append(name)
                                         if name.endswith("backend_compile_duration") else None)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
