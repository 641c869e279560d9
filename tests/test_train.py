"""Training end to end: outputs, exact resume after SIGTERM/SIGKILL, 1 vs N devices, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.config import TrainConfig
from jaxgpt.cli.train import main, parse_args
from jaxgpt.training.pretrain import train

from conftest import REPO, TINY, cli, run_cli


def rows(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> dict:
    """{(step, key): value} for every loss logged by a run."""
    return {(r["step"], k): r[k] for r in rows(out) for k in ("train_loss", "val_loss") if k in r}


def snapshot(path: Path) -> dict:
    """Every file under path with its size and mtime: to prove nothing was written."""
    if not path.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


# ---- a run and its outputs ----------------------------------------------------------------------
@pytest.mark.slow
def test_run_writes_metrics_plot_config_and_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = parse_args(["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "60",
                      "--eval-interval", "30", "--ckpt-interval", "30", "--log-interval", "10",
                      "--warmup-iters", "20"])
    summary = train(cfg, log=lambda s: None)
    assert summary["step"] == 60
    r = rows(out)
    assert [x["step"] for x in r if "val_loss" in x] == [0, 30, 60]
    assert [x["step"] for x in r if "tokens_per_s" in x] == [10, 20, 30, 40, 50, 60]
    assert {"step", "train_loss", "lr", "tokens_per_s", "grad_norm"} <= set(r[1])
    assert r[-1]["val_loss"] < r[0]["val_loss"] - 0.5  # it learns
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_config"]["max_iters"] == 60 and saved["model_config"]["n_embd"] == 32
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["30", "60"]
    # the learning-rate schedule: linear warmup then cosine to lr/10
    lr = {x["step"]: x["lr"] for x in r if "tokens_per_s" in x}
    assert lr[10] == pytest.approx(3e-3 * 9 / 20, rel=1e-4)  # step index 9 of a 20-step warmup
    assert lr[60] == pytest.approx(3e-4 + 0.5 * 2.7e-3 * (1 + np.cos(np.pi * 39 / 40)), rel=1e-4)


@pytest.mark.slow
def test_same_seed_same_losses_and_grad_accum_matches(corpus, tmp_path):
    base = ["--data", str(corpus), *TINY, "--max-iters", "20", "--eval-interval", "20",
            "--ckpt-interval", "20", "--log-interval", "5"]
    train(parse_args(base + ["--out", str(tmp_path / "a")]), log=lambda s: None)
    train(parse_args(base + ["--out", str(tmp_path / "b")]), log=lambda s: None)
    train(parse_args(base + ["--out", str(tmp_path / "c"), "--grad-accum", "4"]), log=lambda s: None)
    a, b, c = losses(tmp_path / "a"), losses(tmp_path / "b"), losses(tmp_path / "c")
    assert a == b  # bitwise deterministic
    assert a.keys() == c.keys()
    for k in a:  # 4 micro-batches of 2 == one batch of 8, up to float rounding
        assert abs(a[k] - c[k]) < 1e-5, k


@pytest.mark.slow
def test_init_from_a_run_starts_from_its_weights(capsys, corpus, tmp_path):
    base = ["--data", str(corpus), *TINY, "--eval-interval", "20", "--ckpt-interval", "20"]
    assert main(base + ["--out", str(tmp_path / "a"), "--max-iters", "20"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--max-iters", "20", "--init-from",
                        str(tmp_path / "a")]) == 0
    # same data, seed and eval batches: b's step-0 val loss is a's final one, then it improves
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert b[(0, "val_loss")] == pytest.approx(a[(20, "val_loss")], abs=1e-6)
    assert b[(20, "val_loss")] < b[(0, "val_loss")]
    capsys.readouterr()
    _bad(capsys, base + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"),
                         "--tokenizer", "gpt2"], tmp_path / "c", "pass --tokenizer char")
    _bad(capsys, base + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "nowhere")],
         tmp_path / "c", "no such file")


# ---- exact resume -----------------------------------------------------------------------------
RESUME = [*TINY, "--max-iters", "500", "--ckpt-interval", "100", "--eval-interval", "250",
          "--log-interval", "10", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *RESUME)
    assert p.returncode == 0, p.stderr
    return losses(out)


def _start_and_interrupt(corpus, out, sig) -> subprocess.Popen:
    """Start a run, wait for its first checkpoint (step 100), then send `sig`."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.train", "--data", str(corpus), "--out",
                             str(out), *RESUME], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "100").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_with_identical_losses(corpus, tmp_path, reference_run, sig):
    out = tmp_path / "run"
    proc = _start_and_interrupt(corpus, out, sig)
    stopped_at = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
        assert "--resume" in proc.stderr.read()  # it says how to continue
    else:
        assert proc.returncode == -signal.SIGKILL
    assert stopped_at < 500, "the run finished before the signal; nothing was tested"
    p = run_cli("jaxgpt.train", "--data", corpus, "--out", out, *RESUME, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"resuming at step {stopped_at}" in p.stderr
    resumed = losses(out)
    assert resumed == reference_run  # every logged loss, before and after the interruption


# ---- data parallel: 1 device == 4 devices -------------------------------------------------------
@pytest.mark.slow
def test_one_device_equals_four_devices(corpus, tmp_path):
    args = ["--data", corpus, *TINY, "--max-iters", "30", "--eval-interval", "15",
            "--ckpt-interval", "30", "--log-interval", "5"]
    one = run_cli("jaxgpt.train", *args, "--out", tmp_path / "one")
    four = run_cli("jaxgpt.train", *args, "--out", tmp_path / "four",
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    assert "| 1 device(s)" in one.stderr and "| 4 device(s)" in four.stderr
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert a.keys() == b.keys() and len(a) > 5
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------
def _bad(capsys, argv, out: Path, msg: str):
    before = snapshot(out)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and msg in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(out) == before  # nothing written


@pytest.mark.parametrize("make,extra,msg", [
    (lambda d: d / "missing.txt", [], "not found"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", [], "empty"),
    (lambda d: (d / "short.txt").write_text("To be or not") and None or d / "short.txt", [], "too short"),
    (lambda d: (d / "latin1.txt").write_bytes("café".encode("latin-1") * 99) and None or d / "latin1.txt",
     [], "not UTF-8"),
    (None, ["--preset", "gpt5"], "unknown preset"),
    (None, ["--tokenizer", "bytes"], "unknown tokenizer"),
    (None, ["--n-embd", "30", "--n-head", "4"], "divisible"),
    (None, ["--batch-size", "10", "--grad-accum", "3"], "divisible"),
])
def test_bad_inputs(capsys, corpus, tmp_path, make, extra, msg):
    data = make(tmp_path) if make else corpus
    out = tmp_path / "out"
    _bad(capsys, ["--data", str(data), "--out", str(out), *TINY, "--max-iters", "5", *extra], out, msg)
    assert not out.exists()


def test_unwritable_out(capsys, corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _bad(capsys, ["--data", str(corpus), "--out", str(blocker / "out"), *TINY], blocker, "not writable")


@pytest.mark.slow
def test_bad_resumes(capsys, corpus, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "10",
            "--ckpt-interval", "10", "--eval-interval", "10"]
    _bad(capsys, args + ["--resume"], out, "no checkpoint found")  # nothing there yet
    assert main(args) == 0
    capsys.readouterr()
    _bad(capsys, args, out, "already holds a training run")  # the same command again, no --resume
    _bad(capsys, args + ["--resume", "--lr", "0.5"], out, "disagrees")  # another config
    # corrupt every file of the checkpoint: refused, and the run directory is left untouched
    for f in (out / "checkpoints" / "10").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    _bad(capsys, args + ["--resume"], out, "corrupt")
    # a weights-only folder (converted model) is not a run to resume
    from jaxgpt import GPT, GPTConfig
    from jaxgpt.formats.checkpoint import save_model
    weights = tmp_path / "weights"
    save_model(weights, GPT(GPTConfig(vocab_size=59, block_size=32, n_layer=1, n_head=2, n_embd=8)),
               {"type": "gpt2"})
    _bad(capsys, ["--data", str(corpus), "--out", str(weights), "--resume"], weights, "weights only")


def test_nan_loss_stops_with_a_message(capsys, corpus, tmp_path):
    out = tmp_path / "out"
    code = main(["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "100",
                 "--lr", "1e4", "--warmup-iters", "0", "--grad-clip", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "loss became nan" in err.splitlines()[-1]


@pytest.mark.slow
def test_default_recipe_shortened(tmp_path):
    """`python -m jaxgpt.train` with its defaults (baby model, shipped Tiny Shakespeare), cut to
    150 of its 2000 steps: it learns, ends with a sample, and writes its outputs."""
    out = tmp_path / "out"
    p = run_cli("jaxgpt.train", "--out", out, "--max-iters", "150", "--eval-interval", "150",
                "--no-progress")
    assert p.returncode == 0, p.stderr
    r = rows(out)
    assert r[0]["val_loss"] > 4.0 and r[-1]["val_loss"] < 2.6  # from ln(65) ~ 4.17 to < 2.6
    assert len(p.stdout.strip()) > 50  # the closing sample, on stdout
    assert json.loads((out / "config.json").read_text())["model_config"]["n_layer"] == 4


@pytest.mark.slow
def test_help_explains_every_flag():
    import dataclasses
    p = cli("jaxgpt.train", "--help")  # (in this process: conftest.cli)
    assert p.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in p.stdout, f.name


@pytest.mark.slow
def test_bfloat16_losses_track_float32_and_state_stays_float32():
    """--dtype bfloat16 computes in bf16 but keeps params and AdamW moments float32; over a few
    steps of the real train step its losses stay close to float32's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.model.gpt import GPT
    from jaxgpt.optim import lr_schedule, make_optimizer
    from jaxgpt.training.trainer import make_step

    K, B, T, V = 20, 8, 32, 65
    start = np.random.default_rng(0).integers(0, V, (K, 1, B, 1))
    seq = (start + 3 * np.arange(T + 1)) % V  # learnable: each next token is +3 mod V
    batch = {"x": jnp.asarray(seq[..., :-1], jnp.int32), "y": jnp.asarray(seq[..., 1:], jnp.int32)}
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, batch_size=B, dtype=dtype,
                          max_iters=K, warmup_iters=2, lr=1e-2)
        graphdef, params, frozen = nnx.split(GPT(cfg.model_config(V), rngs=nnx.Rngs(0)), nnx.Param, ...)
        tx = make_optimizer(cfg)
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(0, jnp.int32)}
        state, m = make_step(graphdef, tx, lr_schedule(cfg), seed=cfg.seed)(state, frozen, batch)
        losses[dtype] = np.asarray(m["loss"])
        floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {jnp.dtype("float32")}, dtype
    f32, bf16 = losses["float32"], losses["bfloat16"]
    assert f32[-1] < f32[0] - 1.0  # it learns...
    assert np.abs(bf16 - f32).max() < 0.1, (f32, bf16)  # ...and bf16 tracks it step by step
    assert not np.array_equal(f32, bf16)  # (bf16 really computed something different)


@pytest.mark.slow
def test_chunked_head_loss_matches_full_logits():
    # the train step's loss computes the head in row chunks (jax.checkpoint'ed) when the logits
    # are large; forced here on a tiny model: same loss and gradients as the plain logits path
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.config import GPTConfig
    from jaxgpt.model.gpt import GPT
    from jaxgpt.losses import cross_entropy, head_loss

    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
    x, y = (jax.random.randint(jax.random.key(i), (4, 16), 0, 97) for i in (1, 2))

    def plain(p):
        return cross_entropy(nnx.merge(graphdef, p)(x)[0], y)

    def chunked(p):
        model = nnx.merge(graphdef, p)
        return head_loss(model, model(x, hidden=True)[0], y, chunk_rows=8, min_logits=0)

    (l0, g0), (l1, g1) = jax.value_and_grad(plain)(params), jax.value_and_grad(chunked)(params)
    assert abs(float(l0) - float(l1)) <= 1e-5
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
    """One array file of the newest checkpoint truncated: sample and --resume use the one before
    it, with a warning naming the damaged one, and no traceback (orbax's threads included)."""
    out = tmp_path / "run"
    args = ["--data", corpus, "--out", out, *TINY, "--max-iters", "20", "--ckpt-interval", "10",
            "--eval-interval", "10", "--log-interval", "10"]
    assert run_cli("jaxgpt.train", *args).returncode == 0
    data = max((f for f in (out / "checkpoints" / "20" / "params").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    p = run_cli("jaxgpt.sample", out, "--max-new-tokens", "5")
    assert p.returncode == 0, p.stderr
    assert "checkpoints/20 is corrupt" in p.stderr and "using the checkpoint before it" in p.stderr
    leaks = ["Traceback" in p.stderr]
    p = run_cli("jaxgpt.train", *args, "--resume")
    assert p.returncode == 0, p.stderr
    assert "checkpoints/20 is corrupt" in p.stderr and "resuming at step 10" in p.stderr
    assert losses(out)[(20, "val_loss")] > 0
    leaks.append("Traceback" in p.stderr)
    if any(leaks):  # known, intermittent: orbax's TensorStore callbacks on a closed event loop
        pytest.xfail("a traceback leaked past the closed-event-loop filter "
                     "(jaxgpt.formats.checkpoint._silence_closed_loop_callbacks)")


def test_only_orbax_closed_loop_callbacks_are_silenced(capsys, monkeypatch):
    """After a damaged checkpoint, jaxgpt.checkpoint filters sys.excepthook: the traceback of a
    callback into orbax's closed event loop (RuntimeError raised in call_soon_threadsafe, what
    TensorStore's leftover reads print) is dropped; any other error still prints."""
    import asyncio

    from jaxgpt.formats import checkpoint

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError:
        closed = sys.exc_info()
    assert checkpoint._closed_loop_callback(*closed)
    other = RuntimeError("Event loop is closed")  # the same text, raised elsewhere: not filtered
    assert not checkpoint._closed_loop_callback(RuntimeError, other, None)
    assert not checkpoint._closed_loop_callback(ValueError, ValueError("x"), closed[2])
    import threading

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    checkpoint._silence_closed_loop_callbacks()
    checkpoint._silence_closed_loop_callbacks()  # installed once
    sys.excepthook(*closed)
    assert capsys.readouterr().err == ""
    try:
        raise ValueError("a real error")
    except ValueError:
        sys.excepthook(*sys.exc_info())
    assert "ValueError: a real error" in capsys.readouterr().err


@pytest.mark.slow
def test_metrics_also_go_to_tensorboard(corpus, tmp_path):
    """--tensorboard DIR: the metrics rows as TensorBoard scalars (event file read back here)."""
    import struct

    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    out, tb = tmp_path / "run", tmp_path / "tb"
    assert main(["--data", str(corpus), "--out", str(out), *TINY, "--max-iters", "20",
                 "--eval-interval", "10", "--log-interval", "5", "--tensorboard", str(tb)]) == 0
    scalars = {}
    for f in tb.glob("events.out.tfevents.*"):
        data = f.read_bytes()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12:12 + n])
            data = data[12 + n + 4:]
            for v in event.summary.value:
                scalars[(event.step, v.tag)] = v.simple_value
    want = {(r["step"], k): v for r in rows(out) for k, v in r.items() if k != "step"}
    assert want and want.keys() == scalars.keys()
    assert all(abs(scalars[k] - want[k]) <= 1e-5 * max(1.0, abs(want[k])) for k in want)
