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

`--bpe` adds a second table, your own tokenizer (jaxgpt.tokenizer_train, issue 30), in the same
run: training a --vocab-size BPE with `python -m jaxgpt.tokenizer train`'s function on the
--train-mb corpus (MB/s); then on the same documents, jaxgpt's BPETokenizer against Hugging Face
`tokenizers` (the library transformers uses), with that trained tokenizer or --model-tokenizer DIR
(e.g. SmolLM2's tokenizer.json folder): one string (all the documents joined) and batched (ours:
a loop in 1 process and a Pool of 2; `tokenizers`: encode_batch on 2 threads), the same ids
checked; and jaxgpt.prepare with it (1 worker, 2 processes: byte-identical shards).

    python experiments/bench_prepare.py            # ~20 MB, about a minute on 2 cores
    nice python experiments/bench_prepare.py --mb 5 --bpe --train-mb 100 --repeats 1
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
    ap.add_argument("--bpe", action="store_true",
                    help="also train a BPE and time it against Hugging Face tokenizers")
    ap.add_argument("--train-mb", type=float, default=100.0,
                    help="--bpe: corpus size for training the tokenizer")
    ap.add_argument("--vocab-size", type=int, default=32768, help="--bpe: the trained vocabulary")
    ap.add_argument("--model-tokenizer", default=None,
                    help="--bpe: time this tokenizer folder instead of the trained one")
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
    if args.bpe:
        bpe_table(args, docs)
    p1 = next(r[2] for r in rows if r[0].startswith("jaxgpt.prepare, threads") and r[1] == 1)
    p2 = max(r[2] for r in rows if r[0].startswith("jaxgpt.prepare") and r[1] == 2)
    print(f"\ngoal: prepare 1 worker >= 0.8x encode_ordinary_batch: {p1 / base1:.2f}x "
          f"({'met' if p1 >= 0.8 * base1 else 'NOT met'}); 2 workers >= 1.7x: {p2 / base1:.2f}x "
          f"({'met' if p2 >= 1.7 * base1 else 'NOT met'}); 2 workers / 1 worker of prepare: "
          f"{p2 / p1:.2f}x")


_OURS = None


def _ours_init(d):
    global _OURS
    from jaxgpt.tokenizers.bpe import BPETokenizer
    _OURS = BPETokenizer.from_dict(d)


def _ours_encode(texts):
    return [_OURS.encode_ordinary(t) for t in texts]


def bpe_table(args, docs: list[str]) -> None:
    """Train a BPE (MB/s), then encode with ours vs `tokenizers`, then prepare with it."""
    from multiprocessing import get_context

    from tokenizers import Tokenizer

    from jaxgpt.tokenizers.tokenizer import load_tokenizer_dir
    from jaxgpt.tokenizers.train import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_bpe_"))
    train_docs = make_docs(args.train_mb, args.doc_chars)
    extra = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"
    if extra.is_file():  # mix in the instruction data (other words than Shakespeare's)
        recs = json.loads(extra.read_text())
        train_docs += [" ".join(r[k] for k in ("instruction", "input", "output")) for r in recs]
    src = work / "train.jsonl"
    with open(src, "w") as f:
        for d in train_docs:
            f.write(json.dumps({"text": d}) + "\n")
    mb = os.path.getsize(src) / 1e6
    t0 = time.perf_counter()
    train_tokenizer([str(src)], work / "tok", args.vocab_size)
    t_train = time.perf_counter() - t0
    folder = Path(args.model_tokenizer) if args.model_tokenizer else work / "tok"
    ours, hf = load_tokenizer_dir(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "".join(docs)
    n_mb = len(text.encode()) / 1e6
    rows = [(f"train {args.vocab_size:,} BPE (tokenizers, via jaxgpt.tokenizer train)",
             f"{mb:.1f} MB jsonl", mb / t_train, t_train)]

    def timed(what, fn, ref=None):
        ids = None

        def go():
            nonlocal ids
            ids = fn()
        t = best(go, args.repeats)
        rows.append((what, f"{n_mb:.1f} MB", n_mb / t, t))
        return ids

    def cold(fn):  # ours keeps a word cache; every timed run starts without it
        return lambda: (ours._cache.clear(), fn())[1]

    a = timed("encode one string: jaxgpt BPETokenizer", cold(lambda: ours.encode_ordinary(text)))
    b = timed("encode one string: tokenizers Tokenizer.encode",
              lambda: hf.encode(text, add_special_tokens=False).ids)
    assert a == b, "ids differ (one string)"
    flat = lambda lists: [x for part in lists for x in part]  # noqa: E731  (Pool's chunks)
    c = timed("encode batched: jaxgpt BPETokenizer, loop, 1 process",
              cold(lambda: [ours.encode_ordinary(d) for d in docs]))
    pool = get_context("spawn").Pool(2, initializer=_ours_init, initargs=(ours.to_dict(),))
    n = max(1, len(docs) // 64)
    chunks = [docs[i:i + n] for i in range(0, len(docs), n)]
    pool.map(_ours_encode, chunks[:2])  # warm both workers
    d = timed("encode batched: jaxgpt BPETokenizer, Pool of 2 processes",
              lambda: flat(pool.map(_ours_encode, chunks)))
    pool.close()
    e = timed("encode batched: tokenizers encode_batch, 2 threads",
              lambda: [x.ids for x in hf.encode_batch(docs, add_special_tokens=False)])
    assert c == d == e, "ids differ (batched)"

    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    shas = set()
    for workers, backend in ((1, "threads"), (2, "processes")):
        def run():
            shutil.rmtree(work / "out", ignore_errors=True)
            m = prepare([corpus], work / "out", tokenizer=str(folder), workers=workers,
                        backend=backend, shard_tokens=2_000_000, val_tokens=500_000)
            shas.add(tuple(s["sha256"] for s in m["shards"]))
        timed(f"jaxgpt.prepare --tokenizer DIR, {workers} worker(s), {backend}", run)
    assert len(shas) == 1, "prepare's output differs between worker counts"
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nyour own tokenizer ({folder.name if args.model_tokenizer else 'trained here'}: "
          f"{ours.vocab_size:,} tokens; {os.cpu_count()} CPUs)\n")
    print("| what | input | MB/s | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for what, size, mbs, t in rows:
        print(f"| {what} | {size} | {mbs:.2f} | {t:.1f} |")
    print(f"\nours / tokenizers: one string {rows[1][2] / rows[2][2]:.2f}x (ids equal), batched "
          f"2 processes vs 2 threads {rows[4][2] / rows[5][2]:.2f}x (ids equal); prepare "
          "shards identical for 1 and 2 workers")


if __name__ == "__main__":
    main()
