"""Serving throughput and latency: jaxgpt.serve under 1, 4, 8 and 16 concurrent streaming clients,
against the same engine's offline batched `generate` and against sequential requests.

    python experiments/bench_serve.py [--tokens 64] [--out /tmp/bench_serve] [--quick]

GPT-2 124M shape with random weights (float32, saved once under --out), plus two random rank-16
LoRA adapters on all four layer kinds. The server runs in its own process (the real FastAPI app
over uvicorn, --max-batch 8, each slot's cache --max-len 256 positions, warmed up for the
bench's prompt length: the shapes the bench meets are compiled before anything is timed, and
the server reports how many compilations happened afterwards, which must be 0); the clients are
threads of this process reading the SSE streams with httpx. Every request is a distinct
20-token prompt, greedy, --tokens new tokens.

Rows:
- serve, c clients: c streams started together (c=1: two requests one after the other, i.e.
  sequential serving; c=16: twice the slots, so half of them queue): aggregate tokens/s (all
  tokens / wall time from the first request sent to the last token), time to first token and
  inter-token latency percentiles as the clients see them.
- offline generate, batch c: jaxgpt.decode.generate.generate on the same model in this process (after
  the server is stopped), the same prompts and lengths: new tokens / wall time.
- TTFT idle vs with 7 others decoding: 5 one-token probes on an idle server, then 5 while 7
  long streams decode.
- adapters: a second server with the two adapters; 8 clients on one adapter, on a mix of
  adapter a / adapter b / the base, and on the base alone (MultiLoRA layers present).

Goals (the serving issue): serving overhead <= 20% of offline batched decode at 8 clients;
8 clients >= 3x the aggregate tokens/s of 1; TTFT with 7 others decoding <= 2x idle; mixed
adapters at 8 clients >= 80% of single-adapter throughput. Prints a markdown table and writes it
to OUT/bench_serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT_LEN = 20
MAX_LEN = 256
SLOTS = 8


# ---- the server process -------------------------------------------------------------------------
def serve_main(args) -> None:
    """(in the server process) build the service warmed up for the bench's prompts, serve it,
    and print the number of compilations after warm-up when stopped."""
    import jax
    import uvicorn

    from jaxgpt.serve.app import build_service, create_app

    adapters = [a.split("=", 1) for a in args.adapter]
    service = build_service(args.serve, adapters, max_batch=SLOTS, max_len=MAX_LEN,
                            warmup_prompt=PROMPT_LEN)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(secs) if name.endswith("backend_compile_duration") else None)
    try:
        uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        print(f"COMPILES_AFTER_WARMUP {len(compiles)}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, base: Path, adapters=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, __file__, "--serve", str(base), "--port", str(self.port)]
        for name, path in adapters:
            cmd += ["--adapter", f"{name}={path}"]
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the server died: " + self.proc.stderr.read()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - t

    def stop(self) -> int:
        """Stop it (SIGINT); the number of compilations it saw after warm-up."""
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.communicate(timeout=60)[1]
        for line in err.splitlines():
            if line.startswith("COMPILES_AFTER_WARMUP"):
                return int(line.split()[1])
        raise RuntimeError("no compile count from the server: " + err[-2000:])


# ---- clients ------------------------------------------------------------------------------------
def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import numpy as np
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 50000, PROMPT_LEN).tolist() for _ in range(n)]


def stream(url: str, prompt, tokens: int, model: str | None = None, stop_event=None, started=None) -> dict:
    """One streamed completion: {t0, first, times (of each chunk with text), tokens}."""
    import httpx
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    out = {"times": [], "tokens": 0}
    with httpx.Client(timeout=600) as client:
        out["t0"] = time.perf_counter()
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            buf = ""
            for piece in r.iter_text():
                buf += piece
                while "\n\n" in buf:
                    event, buf = buf.split("\n\n", 1)
                    data = event[6:]
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        out["tokens"] = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        out["times"].append(time.perf_counter())
                        if started is not None and len(out["times"]) == 2:
                            started.release()
                if stop_event is not None and stop_event.is_set():
                    return out  # closing the stream cancels the request
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_clients(url, n_clients, tokens, models=None, rounds=1, seed=0):
    """n_clients concurrent streams (rounds of them one after another per client)."""
    ps = prompts(n_clients * rounds, seed)
    models = models or [None] * n_clients

    def client(i):
        return [stream(url, ps[i * rounds + k], tokens, models[i % len(models)]) for k in range(rounds)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = [r for rs in pool.map(client, range(n_clients)) for r in rs]
    wall = max(t for r in results for t in r["times"][-1:]) - t0
    total = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"clients": n_clients, "requests": len(results), "tokens": total, "wall": wall,
            "tps": total / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def probe_ttft(url, n, seed):
    out = []
    for p in prompts(n, seed):
        r = stream(url, p, 1)
        out.append(r["times"][0] - r["t0"])
    return out


def ttft_with_others(url, n_probes, n_others=7):
    """TTFT of probes while n_others long streams decode (they are dropped afterwards)."""
    stop = threading.Event()
    started = threading.Semaphore(0)
    long_tokens = MAX_LEN - PROMPT_LEN - 1
    pool = ThreadPoolExecutor(n_others)
    futs = [pool.submit(stream, url, p, long_tokens, None, stop, started) for p in prompts(n_others, 200)]
    for _ in range(n_others):
        started.acquire(timeout=120)
    try:
        return probe_ttft(url, n_probes, 300)
    finally:
        stop.set()
        for f in futs:
            f.result()
        pool.shutdown()


# ---- offline ------------------------------------------------------------------------------------
def offline_tps(base: Path, batches, tokens):
    import jax
    import numpy as np

    import jaxgpt
    from jaxgpt.decode.generate import generate
    model = jaxgpt.load(base).model
    out = {}
    for B in batches:
        ids = np.asarray(prompts(B, 0), np.int32)
        generate(model, ids, tokens, temperature=0.0).block_until_ready()  # compile
        best = float("inf")
        for _ in range(2 if B <= 8 else 1):
            t = time.perf_counter()
            jax.block_until_ready(generate(model, ids, tokens, temperature=0.0))
            best = min(best, time.perf_counter() - t)
        out[B] = B * tokens / best
    return out


# ---- the model ----------------------------------------------------------------------------------
def make_models(out: Path):
    """A random GPT-2 124M jaxgpt checkpoint and two random rank-16 LoRA adapters (kept)."""
    base = out / "base"
    import numpy as np
    if not (base / "checkpoints").is_dir():
        from jaxgpt.formats.load import LoadedModel
        from jaxgpt.config import GPTConfig
        from jaxgpt.model.gpt import GPT
        from jaxgpt.tokenizers.tokenizer import GPT2Tokenizer
        cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
        LoadedModel(GPT(cfg, seed=0), GPT2Tokenizer(), {"model_config": cfg.to_dict()}).save(base, force=True)
    paths = []
    for name, seed in (("ad_a", 1), ("ad_b", 2)):
        p = out / name
        if not (p / "adapter.json").is_file():
            import jax
            import jax.numpy as jnp
            from flax import nnx

            import jaxgpt
            from jaxgpt.model import lora
            lm = jaxgpt.load(base)
            targets = list(lora.ALL_TARGETS)
            lora.apply_lora(lm.model, 16, 32.0, targets, seed=seed)
            rng = np.random.RandomState(seed)
            state = nnx.state(lm.model, nnx.LoRAParam)
            nnx.update(lm.model, jax.tree.map(
                lambda x: jnp.asarray(rng.randn(*x.shape).astype(np.float32) * 0.02), state))
            lora.save_adapter(p, lm.model, {"base": str(base), "rank": 16, "alpha": 32.0,
                                            "targets": targets, "model_config": lm.config.to_dict()},
                              force=True)
        paths.append(p)
    return base, paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--out", default="/tmp/bench_serve", help="models and the table go here")
    ap.add_argument("--quick", action="store_true", help="fewer tokens (16) and probes, no adapters")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # (the server process)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_main(args)
    if args.quick:
        args.tokens = 16
    T = args.tokens
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base, (ad_a, ad_b) = make_models(out)
    n_probes = 3 if args.quick else 5

    server = ServerProcess(base)
    print(f"server up in {server.startup_s:.0f} s", flush=True)
    for c in (1, 2, 4, 8):  # every prefill group size, once more (warm caches, nothing compiles)
        run_clients(server.url, c, 2, seed=50 + c)
    rows = {}
    for c in (1, 4, 8, 16):
        rows[c] = run_clients(server.url, c, T, rounds=2 if c == 1 else 1, seed=c)
        print(f"serve c={c}: {rows[c]['tps']:.1f} tok/s", flush=True)
    idle = probe_ttft(server.url, n_probes, 400)
    busy = ttft_with_others(server.url, n_probes)
    compiles_a = server.stop()

    adapters = {}
    if not args.quick:
        server = ServerProcess(base, [("a", ad_a), ("b", ad_b)])
        for c in (1, 2, 4, 8):
            run_clients(server.url, c, 2, models=["a", "b", "base"], seed=60 + c)
        for label, models in (("one adapter", ["a"]), ("mixed a / b / base", ["a", "b", "base"]),
                              ("base rows only", ["base"])):
            adapters[label] = run_clients(server.url, 8, T, models=models, seed=70)
            print(f"adapters {label}: {adapters[label]['tps']:.1f} tok/s", flush=True)
        compiles_b = server.stop()
    else:
        compiles_b = 0

    offline = offline_tps(base, (1, 4, 8, 16), T)

    lines = [f"GPT-2 124M shape (random weights, float32), {platform.machine()} {os.cpu_count()} "
             f"cores, jaxgpt.serve --max-batch {SLOTS} --max-len {MAX_LEN}, {PROMPT_LEN}-token "
             f"prompts, {T} new tokens, greedy; clients stream over HTTP (SSE).", "",
             "| clients | requests | aggregate tok/s | offline generate tok/s (batch) | serving / offline "
             "| TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c, r in rows.items():
        off = offline[c]
        note = " (sequential)" if c == 1 else (" (8 queue)" if c == 16 else "")
        lines.append(f"| {c}{note} | {r['requests']} | {r['tps']:.1f} | {off:.1f} ({c}) | "
                     f"{r['tps'] / off:.2f} | {r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | "
                     f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} |")
    lines += ["", f"TTFT of a one-token request: idle p50 {statistics.median(idle) * 1e3:.0f} ms "
                  f"(p99 {pct(idle, 99) * 1e3:.0f}); with 7 others decoding p50 "
                  f"{statistics.median(busy) * 1e3:.0f} ms (p99 {pct(busy, 99) * 1e3:.0f})."]
    if adapters:
        lines += ["", "| 8 clients on | aggregate tok/s | vs one adapter |", "|---|---:|---:|"]
        one = adapters["one adapter"]["tps"]
        for label, r in adapters.items():
            lines.append(f"| {label} | {r['tps']:.1f} | {r['tps'] / one:.2f} |")
    ratio8 = rows[8]["tps"] / offline[8]
    goals = [("serving overhead at 8 clients <= 20% of offline batched decode",
              f"{(1 - ratio8) * 100:.0f}%", ratio8 >= 0.8),
             ("8 clients >= 3x the aggregate tokens/s of 1",
              f"{rows[8]['tps'] / rows[1]['tps']:.1f}x", rows[8]["tps"] >= 3 * rows[1]["tps"]),
             ("TTFT with 7 others decoding <= 2x idle (p50)",
              f"{statistics.median(busy) / statistics.median(idle):.2f}x",
              statistics.median(busy) <= 2 * statistics.median(idle))]
    if adapters:
        mix = adapters["mixed a / b / base"]["tps"] / adapters["one adapter"]["tps"]
        goals.append(("mixed adapters at 8 clients >= 80% of single-adapter throughput",
                      f"{mix * 100:.0f}%", mix >= 0.8))
    lines += ["", "| goal | measured | met |", "|---|---:|:-:|"]
    lines += [f"| {g} | {m} | {'yes' if ok else 'NO'} |" for g, m, ok in goals]
    lines += ["", f"Compilations in the servers after warm-up: {compiles_a} (base), {compiles_b} "
                  f"(adapters). Bench wall time {time.perf_counter() - t_start:.0f} s."]
    table = "\n".join(lines)
    print(table)
    (out / "bench_serve.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
