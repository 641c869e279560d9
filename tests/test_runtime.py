"""Process-level settings (jaxgpt.runtime): the CPU XLA flags `import jaxgpt` adds."""

import os
import subprocess
import sys

import pytest

from jaxgpt.runtime import CPU_XLA_FLAGS

SHOW = "import os, jaxgpt; print(os.environ.get('XLA_FLAGS'))"


def flags_after_import(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXGPT_XLA_TUNING")}
    p = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True,
                       env={**base, "JAX_PLATFORMS": "cpu", **env}, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.mark.parametrize("env,want", [
    ({}, CPU_XLA_FLAGS),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
     "--xla_force_host_platform_device_count=4 " + CPU_XLA_FLAGS),
    ({"XLA_FLAGS": "--xla_backend_optimization_level=3"}, "--xla_backend_optimization_level=3"),  # the user's wins
    ({"JAXGPT_XLA_TUNING": "0"}, "None"),
])
def test_import_sets_the_cpu_xla_flags_unless_told_otherwise(env, want):
    assert flags_after_import(**env) == want
