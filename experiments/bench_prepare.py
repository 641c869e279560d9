"""Tokenization and loader throughput: `jaxgpt.prepare` vs tiktoken's own batch encoder, and
`ShardDataset.batch`.

The corpus is the shipped Tiny Shakespeare replicated to about --mb megabytes and cut at blank
lines into documents of about --doc-chars characters, written as one .jsonl file. In the same
process, on the same documents, it times:

- tiktoken's `encode_ordinary_batch` (the texts already in memory; num_threads 1 and 2), and a
  plain loop of `encode_to_numpy` (what jaxgpt.prepare's workers call: no Python int lists);
- `jaxgpt.data.prepare.prepare` from the .jsonl file to finished shards on disk (read, parse,
  tokenize, write, sha256, manifest) with 1 and 2 workers (threads, and processes for 2);
- `ShardDataset.batch` over the prepared shards at 16 x 1024 and 8 x 1024 (page cache warm).

Each timing is the best of --repeats. Prints one markdown table; goal: prepare >= 0.8x of
encode_ordinary_batch per worker, >= 1.7x with 2 workers on 2 cores.

    python experiments/bench_prepare.py            # ~20 MB, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxgpt.data.prepare import prepare
from jaxgpt.data.shards import ShardDataset
from jaxgpt.tokenizers.tokenizer import get_tokenizer

SHAKES = Path(__file__).resolve().parents[1] / "jaxgpt" / "assets" / "tinyshakespeare.txt"


def make_docs(mb: float, doc_chars: int) -> list[str]:
    text = SHAKES.read_text()
    paras = [p + "\n" for p in text.split("\n\n") if p.strip()]
    reps = max(1, round(mb * 1e6 / len(text)))
    docs, cur, n = [], [], 0
    for _ in range(reps):
        for p in paras:
            cur.append(p)
            n += len(p)
            if n >= doc_chars:
                docs.append("\n".join(cur))
                cur, n = [], 0
    if cur:
        docs.append("\n".join(cur))
    return docs


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in megabytes")
    ap.add_argument("--doc-chars", type=int, default=3000, help="document size in characters")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loader-batches", type=int, default=2000)
    args = ap.parse_args()

    docs = make_docs(args.mb, args.doc_chars)
    n_chars = sum(map(len, docs))
    enc = get_tokenizer("gpt2").enc
    n_tokens = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=2)) + len(docs)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    src = work / "corpus.jsonl"
    with open(src, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"corpus: {len(docs):,} documents, {n_chars / 1e6:.1f} M chars, "
          f"{os.path.getsize(src) / 1e6:.1f} MB jsonl, {n_tokens:,} tokens (with EOTs); "
          f"{os.cpu_count()} CPUs", flush=True)

    rows = []  # (what, workers, tokens/s)
    for threads in (1, 2):
        t = best(lambda: enc.encode_ordinary_batch(docs, num_threads=threads), args.repeats)
        rows.append(("tiktoken encode_ordinary_batch (texts in memory)", threads, n_tokens / t))
    t = best(lambda: [enc.encode_to_numpy(d, allowed_special=set(), disallowed_special=())
                      for d in docs], args.repeats)
    rows.append(("tiktoken encode_to_numpy loop (texts in memory)", 1, n_tokens / t))

    out = work / "out"
    shas = set()
    for workers, backend in ((1, "threads"), (2, "threads"), (2, "processes")):
        def run():
            shutil.rmtree(out, ignore_errors=True)
            m = prepare([src], out, workers=workers, backend=backend, shard_tokens=2_000_000,
                        val_tokens=500_000)
            shas.add(tuple(s["sha256"] for s in m["shards"]))
        t = best(run, args.repeats)
        rows.append((f"jaxgpt.prepare, {backend} (jsonl file -> shards on disk)", workers,
                     n_tokens / t))
    assert len(shas) == 1, "prepare's output differs between worker counts"

    ds = ShardDataset(out)
    loader = []
    for B, T in ((16, 1024), (8, 1024)):
        ds.batch(0, 0, B, T)  # permutation + page cache
        nb = args.loader_batches
        t0 = time.perf_counter()
        for s in range(nb):
            ds.batch(0, s, B, T)
        dt = time.perf_counter() - t0
        loader.append((B, T, nb * B * T / dt, dt / nb * 1e3))
    shutil.rmtree(work, ignore_errors=True)

    base1 = rows[0][2]
    base = {r[1]: r[2] for r in rows[:2]}
    print("\n| what | workers | tokens/s | vs encode_ordinary_batch, 1 thread | "
          "vs encode_ordinary_batch, same threads |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for what, w, tps in rows:
        print(f"| {what} | {w} | {tps / 1e6:.2f} M | {tps / base1:.2f}x | {tps / base[w]:.2f}x |")
    for B, T, tps, ms in loader:
        print(f"| ShardDataset.batch {B} x {T} ({ms:.3f} ms/batch) | 1 | {tps / 1e6:.0f} M | | |")
    p1 = next(r[2] for r in rows if r[0].startswith("jaxgpt.prepare, threads") and r[1] == 1)
    p2 = max(r[2] for r in rows if r[0].startswith("jaxgpt.prepare") and r[1] == 2)
    print(f"\ngoal: prepare 1 worker >= 0.8x encode_ordinary_batch: {p1 / base1:.2f}x "
          f"({'met' if p1 >= 0.8 * base1 else 'NOT met'}); 2 workers >= 1.7x: {p2 / base1:.2f}x "
          f"({'met' if p2 >= 1.7 * base1 else 'NOT met'}); 2 workers / 1 worker of prepare: "
          f"{p2 / p1:.2f}x")


if __name__ == "__main__":
    main()
