"""Scaling on JAX's own runtime: 2 processes (gloo) == 1 process, FSDP == data parallel."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, TINY, run_cli

pytestmark = pytest.mark.slow  # servers, processes or the real model: the slow tier

ARGS = [*TINY, "--max-iters", "50", "--eval-interval", "25", "--ckpt-interval", "25",
        "--log-interval", "5"]


def losses(out) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in rows for k in ("train_loss", "val_loss") if k in r}


def assert_same(a: dict, b: dict, tol=1e-5):
    assert a.keys() == b.keys() and len(a) > 10
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The reference: one process, one device."""
    out = tmp_path_factory.mktemp("single")
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *ARGS)
    assert p.returncode == 0, p.stderr
    return out


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(corpus, tmp_path, single):
    out, port = tmp_path / "multi", free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # 2 CPU devices per process
    cmd = [sys.executable, "-m", "jaxgpt.train", "--data", str(corpus), "--out", str(out), *ARGS,
           "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "| 4 device(s)" in logs[0][1]  # one mesh over both processes' devices
    assert logs[1][1].count("val loss") == 0  # only process 0 logs
    assert_same(losses(single), losses(out))
    # a checkpoint written by the 2-process run continues in 1 process with the same losses
    shutil.rmtree(out / "checkpoints" / "50")  # as if the run had died after step 25's checkpoint
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *ARGS, "--resume")
    assert p.returncode == 0, p.stderr
    assert "resuming at step 25" in p.stderr
    assert_same(losses(single), losses(out))


FSDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from jaxgpt.cli.train import parse_args
    from jaxgpt.training.pretrain import train
    argv = sys.argv[1:]
    s = train(parse_args(argv), log=lambda m: None)
    shards = []
    for x in jax.tree.leaves(s["state"]["params"]) + jax.tree.leaves(s["state"]["opt_state"]):
        if getattr(x, "ndim", 0) == 0:
            continue
        local = x.addressable_shards[0].data.shape
        shards.append([list(x.shape), list(local), len(x.addressable_shards)])
    print(json.dumps(shards))
""")


def test_fsdp_matches_data_parallel_and_shards_every_param(corpus, tmp_path, single):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    p = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, "--data", str(corpus), "--out",
                        str(tmp_path / "fsdp"), *ARGS, "--mesh", "data=1,fsdp=4"], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, **env},
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert_same(losses(single), losses(tmp_path / "fsdp"))
    shards = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(shards) > 20
    for full, local, n in shards:
        assert n == 4
        if any(d % 4 == 0 for d in full):  # every tensor with a dimension that splits evenly
            assert math.prod(local) * 4 == math.prod(full), (full, local)  # has 1/4 per device


def test_mixed_mesh_data2_fsdp2(corpus, tmp_path, single):
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", tmp_path / "mix", *ARGS,
                "--mesh", "data=2,fsdp=2",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert p.returncode == 0, p.stderr
    assert_same(losses(single), losses(tmp_path / "mix"))


@pytest.mark.parametrize("extra,env,msg", [
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "1",
      "--init-timeout", "2"], {}, "could not reach the coordinator localhost:1 within 2 s"),
    (["--batch-size", "6"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
     "does not split over 4 devices"),
    (["--mesh", "data=3"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
     "has 3 devices but 4 are available"),
])
def test_bad_distributed_inputs(corpus, tmp_path, extra, env, msg):
    out = tmp_path / "out"
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *TINY, *extra, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()
