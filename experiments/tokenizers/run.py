"""Which tokenizer for the baby model? BPE of 512 / 2,048 / 8,192 tokens trained on Tiny
Shakespeare (python -m jaxgpt.tokenizer train), characters, and GPT-2's BPE, each pretraining the
same baby model at the same compute (same steps x batch x context tokens), scored in bits per byte
on the same held-out text, with what each vocabulary costs in embedding parameters.

    nice python experiments/tokenizers/run.py --steps 300 --out /tmp/tokexp

Text: Tiny Shakespeare, the first 90% of its characters train (the tokenizers too), the last 10%
validate. Each tokenizer gets a jaxgpt.prepare folder whose val shard is exactly the val text
(<|endoftext|> + its tokens) and whose train shards are the train text. Bits per byte = the summed
next-token loss over every non-overlapping context window of the val shard / ln 2 / the UTF-8 bytes
of the tokens it predicted. Writes results.json, results.md (the table) and bpb.png next to this
file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

TEXT = REPO / "jaxgpt" / "assets" / "tinyshakespeare.txt"
BPE_SIZES = (512, 2048, 8192)


def _split(out: Path) -> tuple[Path, Path]:
    text = TEXT.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    train, val = out / "train.txt", out / "val.txt"
    train.write_text(text[:n], encoding="utf-8")
    val.write_text(text[n:], encoding="utf-8")
    return train, val


def _prepare(name: str, tokenizer: str, train: Path, val: Path, out: Path) -> Path:
    from jaxgpt.data.prepare import char_info, prepare
    from jaxgpt.data.corpus import resolve_sources
    from jaxgpt.tokenizers.tokenizer import get_tokenizer

    vt = val.read_text(encoding="utf-8")
    if tokenizer == "char":
        n_val = len(vt)
        char_info(resolve_sources([str(val), str(train)]), "text")  # (checks the corpus)
    else:
        n_val = len(get_tokenizer(tokenizer).encode_ordinary(vt))
    folder = out / f"data-{name}"
    prepare([str(val), str(train)], folder, tokenizer=tokenizer, workers=1,
            shard_tokens=10**8, val_tokens=n_val + 1)
    return folder


def _token_bytes(tok, vocab: int) -> np.ndarray:
    if tok.name == "char":
        return np.array([len(c.encode()) for c in tok.chars] + [0] * (vocab - len(tok.chars)))
    return np.array([len(tok.decode_bytes([i])) if i != tok.eot_token else 0
                     for i in range(vocab)])


def _bpb(model, tok, ds, block: int, batch: int = 16) -> tuple[float, float, int]:
    """(bits per byte, mean loss in nats/token, bytes scored) over the val shard's windows."""
    import jax
    import jax.numpy as jnp

    toks = np.asarray(ds.val.shard(0), dtype=np.int32)
    nwin = (len(toks) - 1) // block
    x = np.stack([toks[i * block:(i + 1) * block] for i in range(nwin)])
    y = np.stack([toks[i * block + 1:(i + 1) * block + 1] for i in range(nwin)])
    nbytes = _token_bytes(tok, ds.vocab_size)[y].sum()

    @jax.jit
    def nll(xb, yb):
        logits, _ = model(xb)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(lp, yb[..., None], axis=-1).sum()

    total = 0.0
    for i in range(0, nwin, batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if len(xb) < batch:  # pad to one compiled shape, count only the real rows
            pad = batch - len(xb)
            full = nll(jnp.asarray(np.concatenate([xb, xb[:1].repeat(pad, 0)])),
                       jnp.asarray(np.concatenate([yb, yb[:1].repeat(pad, 0)])))
            total += float(full) - float(nll(jnp.asarray(xb[:1].repeat(batch, 0)),
                                             jnp.asarray(yb[:1].repeat(batch, 0)))) * pad / batch
        else:
            total += float(nll(jnp.asarray(xb), jnp.asarray(yb)))
    return total / math.log(2) / nbytes, total / y.size, int(nbytes)


def _run_one(name: str, data: Path, steps: int, out: Path) -> dict:
    from jaxgpt.config import TrainConfig
    from jaxgpt.data.shards import ShardDataset
    from jaxgpt.training.pretrain import train

    cfg = TrainConfig(data=str(data), out=str(out / f"run-{name}"), preset="baby",
                      max_iters=steps, eval_interval=steps, val_tokens=64 * 12,
                      sample_tokens=0, progress=False, warmup_iters=min(100, steps // 10),
                      ckpt_interval=10**9, log_interval=max(1, steps // 5))
    t0 = time.time()
    s = train(cfg, log=lambda m: None)
    secs = time.time() - t0
    model, tok = s["model"], s["tokenizer"]
    ds = ShardDataset(data)
    bpb, loss, nbytes = _bpb(model, tok, ds, model.config.block_size)
    c = model.config
    emb = c.vocab_size * c.n_embd  # wte (tied with the head)
    n_params = s["params"]
    return {"tokenizer": name, "vocab": c.vocab_size, "val_bpb": bpb, "val_loss_per_token": loss,
            "val_bytes": nbytes, "val_tokens": int(ds.val.tokens),
            "bytes_per_token": nbytes / max(1, (ds.val.tokens - 1) // c.block_size * c.block_size),
            "emb_params": emb, "params": n_params, "emb_share": emb / n_params,
            "train_s": secs, "train_loss": s["train_loss"], "steps": steps,
            "tokens_seen": steps * cfg.batch_size * c.block_size}


def _table(rows: list[dict]) -> str:
    out = ["| tokenizer | vocab | val bits/byte | bytes/token | embedding params | share of params "
           "| val loss/token | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['tokenizer']} | {r['vocab']:,} | {r['val_bpb']:.3f} | "
                   f"{r['bytes_per_token']:.2f} | {r['emb_params']:,} | {100 * r['emb_share']:.0f}% "
                   f"| {r['val_loss_per_token']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(out)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["emb_params"], r["val_bpb"], s=40)
        ax.annotate(f"{r['tokenizer']}", (r["emb_params"], r["val_bpb"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (vocab x n_embd, tied head), log scale")
    ax.set_ylabel("val bits per byte (lower is better)")
    steps, toks = rows[0]["steps"], rows[0]["tokens_seen"]
    ax.set_title(f"baby GPT on Tiny Shakespeare, {steps} steps x {toks // steps} tokens each")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    p.add_argument("--out", default="/tmp/jaxgpt-tokenizers", help="scratch folder")
    p.add_argument("--only", nargs="*", default=None, help="a subset of the tokenizer names")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _split(out)
    from jaxgpt.tokenizers.train import train_tokenizer

    tokenizers = {"char": "char"}
    for n in BPE_SIZES:
        folder = out / f"bpe{n}"
        if not (folder / "tokenizer.json").exists():
            train_tokenizer([str(train)], folder, n)
        tokenizers[f"bpe{n}"] = str(folder)
    tokenizers["gpt2"] = "gpt2"
    rows = []
    for name, tok in tokenizers.items():
        if args.only and name not in args.only:
            continue
        data = _prepare(name, tok, train, val, out)
        r = _run_one(name, data, args.steps, out)
        print(json.dumps(r), flush=True)
        rows.append(r)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "results.md").write_text(_table(rows) + "\n")
    _plot(rows, HERE / "bpb.png")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
