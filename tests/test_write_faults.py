"""Write faults (issue 26, point 5): a full disk, a missing permission or a read-only file system
while train, sft, prepare, convert and quantize write is one line naming the path and the cause,
exit status 2, and the last good file, shard or checkpoint is kept; a torn last line of
metrics.jsonl is dropped on --resume with a warning.

The tests run as root, where chmod does not stop a write, so the faults are made two ways:
in process (quick tier), the writer's own system calls fail with the errno a full disk gives
(monkeypatched `os.fsync` / the orbax save raising what they raise); through the CLIs (slow
tier), on a real full disk: a small tmpfs mounted for the test (skipped where mounting is not
allowed), so the error comes from the kernel, through orbax / TensorStore / safetensors.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.data import prepare as prep
from jaxgpt.config import ConfigError
from jaxgpt.files import atomic_write
from jaxgpt.training.trainer import read_rows
from jaxgpt.files import WriteError, write_error, writing

REPO = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# the text orbax raises (a ValueError from TensorStore) when a checkpoint's data file does not fit
ORBAX_FULL = ('RESOURCE_EXHAUSTED: Error writing "h.0.attn.c_attn.kernel.value/0.0" in OCDBT '
              'database at local file "x/": Failed writing: "x/d/41": Failed to write 1590543 '
              "bytes to file 17: No space left on device [os_error_code='28']")


def fail_after(n: int, error: BaseException):
    """A stand-in for a system call that works `n` times, then raises `error` every time."""
    calls = {"n": 0}
    real = os.fsync

    def call(fd):
        calls["n"] += 1
        if calls["n"] > n:
            raise error
        return real(fd)

    return call


# ---- the mechanism ----------------------------------------------------------------------------
@pytest.mark.parametrize("error,cause", [
    (ENOSPC, "No space left on device"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
    (ValueError(ORBAX_FULL), "No space left on device"),
    (RuntimeError("save failed"), None),  # not a write failure: passes through unchanged
])
def test_writing_names_the_path_and_the_cause(tmp_path, error, cause):
    target = tmp_path / "out" / "model.bin"
    wrapped = RuntimeError("async save failed")
    wrapped.__cause__ = error  # as orbax's background thread re-raises it
    for e in (error, wrapped):
        with pytest.raises(Exception) as got:
            with writing(target):
                raise e
        if cause is None:
            assert got.value is e
        else:
            assert type(got.value) is WriteError and isinstance(got.value, ConfigError)
            assert str(got.value) == f"cannot write {target}: {cause}"
    assert write_error(target, ValueError("a shape mismatch")) is None


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write(path, b"old")
    monkeypatch.setattr(os, "fsync", fail_after(0, ENOSPC))
    with pytest.raises(WriteError, match=f"^cannot write {path}: No space left on device$"):
        atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---- prepare: the finished shards are kept, a rerun resumes to the same manifest ---------------
def test_prepare_disk_full_keeps_finished_shards_then_resumes(corpus, tmp_path, monkeypatch):
    kw = dict(tokenizer="char", shard_tokens=8000, val_tokens=4000)
    reference = prep.prepare([corpus], tmp_path / "ref", **kw)
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # each shard: one fsync for it, one for the state file
        m.setattr(os, "fsync", fail_after(7, ENOSPC))
        with pytest.raises(WriteError) as e:
            prep.prepare([corpus], out, **kw)
    assert str(e.value) == f"cannot write {out / 'train_000003.bin'}: No space left on device"
    kept = sorted(p.name for p in out.iterdir())
    assert kept == [".prepare-state.json", "train_000001.bin", "train_000002.bin", "val_000000.bin"]
    for name in kept[1:]:  # the finished shards are the reference's, byte for byte
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    resumed = prep.prepare([corpus], out, **kw)  # the disk has room again
    assert resumed["shards"] == reference["shards"]


# ---- metrics.jsonl: a torn tail ---------------------------------------------------------------
def test_torn_metrics_tail_is_dropped_with_a_warning(tmp_path):
    rows = [{"step": s, "train_loss": 4.0 - s / 100} for s in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 40, "train_lo')
    warnings = []
    assert read_rows(tmp_path, 20, warn=warnings.append) == rows[:2]
    assert len(warnings) == 1 and "torn last line 4" in warnings[0] and "\n" not in warnings[0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"ste\n{"step": 30}\n')
    with pytest.raises(ConfigError, match="line 2 is not a metrics row"):
        read_rows(tmp_path, 30, warn=warnings.append)


# ---- the trainer: a failed asynchronous checkpoint write ----------------------------------------
@pytest.mark.slow
def test_train_checkpoint_write_failure_keeps_the_last_good_one(corpus, tmp_path, monkeypatch):
    """The second checkpoint's write fails as orbax fails on a full disk: train stops with a
    WriteError naming that checkpoint, and the first one restores."""
    import jaxgpt
    from jaxgpt.formats import checkpoint
    from jaxgpt.config import TrainConfig
    from jaxgpt.training.pretrain import train

    real_save, saves = checkpoint.save, []

    def save(mngr, step, *a, **kw):
        saves.append(step)
        if len(saves) == 2:
            raise ValueError(ORBAX_FULL)
        return real_save(mngr, step, *a, **kw)

    monkeypatch.setattr(checkpoint, "save", save)
    cfg = TrainConfig(data=str(corpus), out=str(tmp_path / "run"), n_layer=2, n_head=2, n_embd=32,
                      block_size=32, batch_size=8, eval_iters=2, sample_tokens=0, progress=False,
                      max_iters=30, ckpt_interval=10, eval_interval=10, log_interval=10)
    with pytest.raises(WriteError) as e:
        train(cfg)
    assert str(e.value) == f"cannot write {tmp_path / 'run' / 'checkpoints' / '20'}: No space left on device"
    assert checkpoint.all_steps(tmp_path / "run") == [10]
    assert jaxgpt.load(tmp_path / "run").config.n_layer == 2


# ---- through the CLIs, on a full disk (slow) --------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A tmpfs of the given size under tmp_path (unmounted afterwards); skips where mounting a
    file system is not allowed."""
    mounted = []

    def make(size: str) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:100]}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


def run_cli(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def assert_disk_full(r, path: Path) -> None:
    """Exit 2, the last line of stderr `error: cannot write PATH...: No space left on device`,
    and no traceback anywhere."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(f"error: cannot write {path}") and \
        lines[-1].endswith(": No space left on device"), r.stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A 3 MB Hugging Face GPT-2 folder (bigger than the full disks below)."""
    from jaxgpt.formats import hf
    from jaxgpt.config import GPTConfig
    from jaxgpt.model.gpt import GPT

    d = tmp_path_factory.mktemp("hfm") / "hf"
    hf.save_hf(GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)), d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "convert --to-hf", "quantize"])
def test_cli_model_writers_on_a_full_disk(hf_model, full_disk, command):
    disk = full_disk("900k")
    out = disk / "out"
    r = run_cli(f"jaxgpt.{command.split()[0]}", *command.split()[1:], hf_model, out)
    assert_disk_full(r, out)
    assert list(disk.iterdir()) == []  # no half-written folder, no temporary one


@pytest.mark.slow
def test_cli_prepare_on_a_full_disk_keeps_shards(corpus, full_disk):
    disk = full_disk("300k")
    big = disk.parent / "big.txt"
    big.write_text(corpus.read_text() * 6)
    out = disk / "shards"
    r = run_cli("jaxgpt.prepare", big, "--tokenizer", "char", "--out", out, "--shard-tokens", "60000",
                "--val-tokens", "20000", "--no-progress")
    assert_disk_full(r, out)
    state = json.loads((out / ".prepare-state.json").read_text())
    assert state["shards"] and all((out / s["file"]).is_file() for s in state["shards"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


TRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
         "--eval-iters", "2", "--sample-tokens", "0", "--no-progress", "--max-iters", "30",
         "--ckpt-interval", "10", "--eval-interval", "10", "--log-interval", "10"]


@pytest.mark.slow
def test_cli_train_on_a_full_disk_then_resume_past_a_torn_metrics_line(corpus, full_disk, tmp_path):
    """train fills the disk at its second checkpoint: one line, exit 2, checkpoint 10 kept. The
    run, moved to a disk with room and given a torn metrics.jsonl tail, resumes from step 10 with
    one warning."""
    disk = full_disk("900k")
    out = disk / "run"
    r = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *TRAIN)
    assert_disk_full(r, out / "checkpoints")
    from jaxgpt.formats import checkpoint
    assert checkpoint.all_steps(out) == [10]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with open(moved / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "train_l')  # the append a full disk or a kill cut short
    r = run_cli("jaxgpt.train", "--data", corpus, "--out", moved, *TRAIN, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum("torn last line" in line for line in r.stderr.splitlines()) == 1
    rows = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    # the failed run's rows past step 10 and the torn line are gone; the resumed run's follow
    assert [row["step"] for row in rows if "val_loss" not in row] == [10, 20, 30]
    assert checkpoint.all_steps(moved)[0] == 30


@pytest.mark.slow
def test_cli_sft_on_a_full_disk(full_disk, tmp_path):
    from jaxgpt.formats import checkpoint
    from jaxgpt.formats import hf
    from jaxgpt.config import GPTConfig
    from jaxgpt.model.gpt import GPT

    base = tmp_path / "base"
    hf.save_hf(GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=1, n_head=2, n_embd=32)),
                    base, {"type": "gpt2"})
    recs = json.loads((REPO / "experiments" / "data" / "instruction-data.json").read_text())[:40]
    (tmp_path / "sft.json").write_text(json.dumps(recs))
    out = full_disk("30m") / "sft"  # the first checkpoint (~19 MB) fits, the second does not
    r = run_cli("jaxgpt.sft", base, "--data", tmp_path / "sft.json", "--out", out, "--max-iters", "30",
                "--ckpt-interval", "10", "--eval-interval", "10", "--batch-size", "4", "--max-test", "1",
                "--gen-tokens", "4", "--no-progress")
    assert_disk_full(r, out / "checkpoints")
    assert checkpoint.all_steps(out) == [10]
    assert np.isfinite(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_loss"])
