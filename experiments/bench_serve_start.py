"""How fast `python -m jaxgpt.serve MODEL` is ready, cold and warm, and what the first requests wait
(issue 28, point 4: ready <= 30 s on a cold compilation cache on 2 cores, the model's full context).

    python experiments/bench_serve_start.py [--models smollm2,gpt2-124m] [--out /tmp/bench_serve_start]

For each model the real CLI runs twice in its own process: first on an empty compilation cache
(JAXGPT_COMPILATION_CACHE=OUT/xla-MODEL, emptied first: "cold"), then on what that run left there
("warm"). Timed from the process start: *ready* (GET /health answers), then one streamed chat
request ("What is the capital of France?", greedy, 32 tokens): its time to first token and to the
end, then one with a ~700-token prompt (a padded length not compiled before ready: it waits for
its prefill's program or borrows a longer one), then *all compiled* (GET /props says nothing is
compiling any more). gpt2-124m is GPT-2 124M's shape with random weights (a Hugging Face folder
saved once under OUT; no download). Prints one markdown table and writes it to OUT/bench_serve_start.md.
The numbers are what this machine gave in one run (its CPU may be shared: see `load` in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_124m(out: Path) -> str:
    folder = out / "gpt2-124m"
    if not (folder / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
    return str(folder)


def chat(url: str, messages, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, to the end, completion tokens) of one streamed greedy chat."""
    import httpx

    body = {"messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, n = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return first or float("nan"), time.perf_counter() - t0, n


def start(model: str, cache: Path, wait_all: bool = True) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAXGPT_COMPILATION_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", model, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()[-3000:])
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        row["ready"] = time.perf_counter() - t0
        props = httpx.get(url + "/props").json()
        row["context"] = props["n_ctx"]
        row["ttft"], row["total"], row["tokens"] = chat(url, QUESTION, 32)
        long = [{"role": "user", "content": "Summarize: " + "the cat sat on the mat. " * 100}]
        row["long_ttft"], _, _ = chat(url, long, 8)
        print(f"  {row}", file=sys.stderr, flush=True)
        while wait_all:  # (the compiling thread may hold the GIL a while: a generous timeout)
            try:
                if not httpx.get(url + "/props", timeout=300).json()["compiling"]:
                    break
            except httpx.TimeoutException:
                pass
            time.sleep(1)
        row["all"] = time.perf_counter() - t0 if wait_all else float("nan")
    finally:
        proc.terminate()
        proc.wait(60)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gpt2-124m")
    ap.add_argument("--out", default="/tmp/bench_serve_start")
    ap.add_argument("--kinds", default="cold,warm",
                    help="cold (the cache emptied first), warm (what is there), or both in order")
    ap.add_argument("--no-all", action="store_true",
                    help="stop each server after its first requests instead of waiting until every "
                         "program is compiled (the last column is then empty)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model = gpt2_124m(out) if name == "gpt2-124m" else name
        cache = out / f"xla-{name}"
        for kind in args.kinds.split(","):
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            load = os.getloadavg()[0]
            row = start(model, cache, wait_all=not args.no_all)
            rows.append((name, kind, load, row))
            print(f"{name} {kind}: {row}", file=sys.stderr, flush=True)
    lines = [f"jaxgpt.serve start-up, {os.cpu_count()} cores (load average at each start shown), one run\n",
             "| model | cache | load | context | ready s | first token s | 32 tokens s | ~700-token prompt: first token s | all compiled s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, kind, load, r in rows:
        lines.append(f"| {name} | {kind} | {load:.1f} | {r['context']} | {r['ready']:.1f} | {r['ttft']:.2f} | "
                     f"{r['total']:.2f} | {r['long_ttft']:.2f} | {r['all']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "bench_serve_start.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
