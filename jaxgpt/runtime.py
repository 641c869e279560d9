"""Process-level settings a training CLI applies before JAX starts: glibc malloc tuning (by
re-executing the interpreter) and, through jaxgpt.parallel, XLA's deterministic GPU ops."""

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
