"""Quality cost of INT8 weights: val loss and greedy outputs of int8 vs fp32 models trained here.

    python experiments/int8_quality.py [RUN ...] [--new-tokens N]

Default runs: out_default (`python -m jaxgpt.train --out out_default`, the char-level baby model
on Tiny Shakespeare) and out_bpe_small (a GPT-2-BPE model trained on the same text, e.g.
`python -m jaxgpt.train --out out_bpe_small --tokenizer gpt2 --n-layer 4 --n-head 4 --n-embd 128
--block-size 64 --batch-size 8 --max-iters 600`). For each run: the fp32 model, int8 (default:
int8 embedding too) and int8 --keep-embedding are scored on the run's own validation tokens
(RUN/data/val.bin, non-overlapping context windows, as `python -m jaxgpt.eval`), and each int8
model's greedy continuation of a few prompts is compared token by token with fp32's. Each int8
model is scored in both matmul modes: int8 x int8 (activations quantized per row) and
weight-only (float activations).
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import jaxgpt
from jaxgpt.evaluate.scoring import evaluate
from jaxgpt.model.gpt import param_bytes
from jaxgpt.model.quant import set_activations

# int8_matmul modes: "int8" = activations quantized per row, int8 x int8 -> int32 (the default
# from 2 rows on: prompts, eval batches, batched decoding); "float" = weight-only (the default
# for one row: batch-1 decoding)
ACTS = {"int8": "int8 x int8", "float": "weight-only"}

PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY VI:\nO God", "\n"]


def val_tokens(run: Path) -> np.ndarray:
    meta = json.loads((run / "data" / "meta.json").read_text())
    return np.fromfile(run / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int32)


def greedy(lm, prompt: str, new: int) -> list[int]:
    ids = lm.encode(prompt)
    return lm.generate(ids, new, temperature=0.0, stop_at_eot=False)[len(ids):].tolist()


def compare(a: list[int], b: list[int]) -> tuple[int, float]:
    """(length of the common prefix, fraction of positions with equal tokens)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return prefix, float(np.mean(np.asarray(a) == np.asarray(b)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", default=["out_default", "out_bpe_small"])
    p.add_argument("--new-tokens", type=int, default=None,
                   help="greedy tokens per prompt (default: the model's context minus the prompt)")
    args = p.parse_args()
    print("| run | tokenizer | weights | param MB | val loss | vs fp32 | greedy: common prefix "
          "(per prompt) | greedy: equal tokens |")
    print("|---|---|---|--:|--:|--:|---|--:|")
    for run in map(Path, args.runs):
        lm = jaxgpt.load(run)
        ids = val_tokens(run)
        variants = {"fp32": lm}
        for emb in (True, False):  # each int8 model in both matmul modes (jaxgpt.model.quant.int8_matmul)
            for mode in ("int8", "float"):
                q = lm.quantize(embedding=emb)
                set_activations(q.model, mode)
                variants[f"int8{'' if emb else ' --keep-embedding'}, {ACTS[mode]}"] = q
        outs, base = {}, None
        for name, m in variants.items():
            loss = evaluate(m.model, ids)["loss"]
            outs[name] = []
            for prompt in PROMPTS:
                new = args.new_tokens or m.config.block_size - len(m.encode(prompt))
                outs[name].append(greedy(m, prompt, new))
            base = loss if base is None else base
            if name == "fp32":
                prefix_s, equal_s = "-", "-"
            else:
                cmp = [compare(a, b) for a, b in zip(outs["fp32"], outs[name])]
                n = [len(a) for a in outs["fp32"]]
                prefix_s = ", ".join(f"{pre}/{k}" for (pre, _), k in zip(cmp, n))
                equal_s = f"{np.average([f for _, f in cmp], weights=n):.1%}"
            print(f"| {run.name} | {lm.tokenizer.name} | {name} | {param_bytes(m.model) / 1e6:.2f} | "
                  f"{loss:.4f} | {(loss / base - 1):+.2%} | {prefix_s} | {equal_s} |", flush=True)
    print(f"\nval loss: mean nats/token over each run's val split ({len(PROMPTS)} prompts, greedy, "
          "no stop at <|endoftext|>)")


if __name__ == "__main__":
    main()
