"""Process-level settings applied before JAX starts: XLA's CPU compiler options (at `import
jaxgpt`), glibc malloc tuning for the training CLIs (by re-executing the interpreter) and, through
jaxgpt.parallel, XLA's deterministic GPU ops."""

from __future__ import annotations

import os
import sys

# glibc malloc settings the train CLIs re-execute themselves with (experiments/PERF.md): XLA mallocs
# each step's temporaries (~3 GB for the 124M model at 4 x 256) afresh on every execution, from its
# worker threads. By default glibc serves such blocks from per-thread arenas or with mmap and
# returns them to the kernel on free, so every step faults in and zeroes gigabytes of new pages
# (~0.7 s of system CPU per 124M step). One arena (arena_max=1), no mmap for big blocks
# (mmap_max=0) and no trimming keep the freed memory in the process for the next step, 1 GiB of
# top padding grows the heap in few steps, and hugetlb=1 backs it with transparent huge pages.
# The process keeps its peak heap until it exits. GLIBC_TUNABLES the user set come after these
# and win; JAXGPT_MALLOC_TUNING=0 turns the re-execution off.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=1099511627776:glibc.malloc.top_pad=1073741824")


# XLA's CPU backend compiles each program through LLVM at its optimisation level 3 by default. At
# level 1 the programs compiled up to ~20% faster and ran as fast (the products are library calls
# either way): `python experiments/bench_xla_opt.py` (SmolLM2, processes alternated, medians): its
# chunked prefill 9.0 -> 7.0 s to compile, the decode step 8.9 -> 8.5 s, 128 greedy tokens 31.6 ->
# 34.4 tokens/s float32, 71.1 -> 72.8 int8 (experiments/PERF.md "XLA's optimisation level").
# Level 0 compiles faster still but runs the elementwise loops unvectorised (an 8-row step 1.5x
# slower). Set only where no GPU / TPU plugin is installed (the level applies to their compilers
# too), and only if XLA_FLAGS does not name it; JAXGPT_XLA_TUNING=0 turns it off.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=1"
ACCELERATOR_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")


def set_cpu_xla_flags() -> None:
    """Add CPU_XLA_FLAGS to XLA_FLAGS (see above); a no-op once JAX's backend has started."""
    import importlib.util

    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAXGPT_XLA_TUNING", "1") == "0" or "xla_backend_optimization_level" in flags:
        return
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu" and any(
            importlib.util.find_spec(m) is not None for m in ACCELERATOR_PLUGINS):
        return
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAGS}".strip()


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


def enable_compilation_cache() -> str | None:
    """Keep XLA's compiled programs on disk (JAX's persistent compilation cache), so a second run
    of the same shapes skips compiling: the model's initializers, the train step, the evaluation
    and the sample decoder (the default run: ~8 s of its ~12 s outside the steps). The folder is
    $JAXGPT_COMPILATION_CACHE, default ~/.cache/jaxgpt/xla; set it to 0 to turn the cache off.
    Returns the folder, or None when off."""
    where = os.environ.get("JAXGPT_COMPILATION_CACHE", os.path.join("~", ".cache", "jaxgpt", "xla"))
    if where in ("", "0"):
        return None
    import jax

    where = os.path.expanduser(where)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small programs add up
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where
