"""DPO on SmolLM2-135M-Instruct with preference pairs built from the capstone data.

    python experiments/dpo/run_dpo.py                 # pairs -> DPO (LoRA) -> before/after table
    python experiments/dpo/run_dpo.py --steps 24 --train 64 --held 24

1. The capstone records (experiments/capstone/data.json) are shuffled (seed 0) and split into
   --train and --held records.
2. Every record's prompt (SmolLM2's own chat template) is answered greedily by the base model,
   all through one jaxgpt Engine (a slot each), up to --max-new tokens. A pair is
   {prompt, chosen: the reference answer, rejected: the base model's own answer} (chat format),
   unless the two agree (normalized) or the base answer is empty.
3. `python -m jaxgpt.dpo smollm2 --data pairs_train.jsonl --eval-data pairs_held.jsonl
   --lora-rank 8 ...` trains; its eval_ rows at step 0 and at the end give the held-out reward
   accuracy and margins before and after.
4. The trained adapter answers the held-out prompts greedily; ROUGE-L (jaxgpt.evaluate.answers.rouge_l)
   against the references, before vs after, goes into results.json with a few completions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

import jaxgpt  # noqa: E402
from jaxgpt import runtime  # noqa: E402
from jaxgpt.tokenizers import templates
from jaxgpt.decode.engine import Engine, Request  # noqa: E402
from jaxgpt.evaluate.answers import normalize, rouge_l  # noqa: E402


def user_messages(rec: dict) -> list[dict]:
    return templates.to_messages(rec, "capstone record")[:-1]


def greedy_answers(model, tok, recs: list[dict], max_new: int) -> list[str]:
    """Greedy answers of `model` to each record's prompt (the model's chat template), decoded in
    one Engine with a slot per record (one prefill, few shapes to compile)."""
    engine = Engine(model, slots=len(recs))
    reqs = [Request(templates.prompt_ids(tok, "model", user_messages(r)), max_new, temperature=0.0,
                    stop=(tok.eot_token,)) for r in recs]
    todo = list(reqs)
    while todo or engine.busy:
        while todo and engine.free_slots:
            engine.add(todo.pop(0))
        engine.step()
    return [tok.decode([t for t in r.tokens if t != tok.eot_token]).strip() for r in reqs]


def pairs(recs: list[dict], answers: list[str]) -> list[dict]:
    out = []
    for rec, ans in zip(recs, answers):
        msgs = templates.to_messages(rec, "capstone record")
        if not ans or normalize(ans) == normalize(msgs[-1]["content"]):
            continue
        user = msgs[0]["content"] + (f"\n\n{msgs[0]['input']}" if msgs[0].get("input") else "")
        out.append({"prompt": [{"role": "user", "content": user}],
                    "chosen": [{"role": "assistant", "content": msgs[-1]["content"]}],
                    "rejected": [{"role": "assistant", "content": ans}]})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=48, help="capstone records for training pairs")
    p.add_argument("--held", type=int, default=24, help="held-out capstone records")
    p.add_argument("--steps", type=int, default=24, help="DPO optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-new", type=int, default=64, help="longest greedy answer in tokens")
    p.add_argument("--work", default=str(HERE / "work"), help="pairs and the run folder go here")
    p.add_argument("--reuse-pairs", action="store_true", help="use the pairs a previous run left in --work")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    recs = json.loads((REPO / "experiments" / "capstone" / "data.json").read_text())
    order = np.random.default_rng(0).permutation(len(recs))
    train_recs = [recs[i] for i in order[:args.train]]
    held_recs = [recs[i] for i in order[args.train:args.train + args.held]]

    runtime.enable_compilation_cache()
    t0 = time.time()
    if args.reuse_pairs:  # the base answers are the pairs' rejected sides (every record made a pair)
        read = lambda n: [json.loads(l) for l in (work / n).read_text().splitlines()]
        train_pairs, held_pairs = read("pairs_train.jsonl"), read("pairs_held.jsonl")
        assert len(held_pairs) == len(held_recs), "--reuse-pairs needs a pair for every held-out record"
        base_held = [x["rejected"][0]["content"] for x in held_pairs]
    else:
        lm = jaxgpt.load("smollm2")
        base = greedy_answers(lm.model, lm.tokenizer, train_recs + held_recs, args.max_new)
        base_train, base_held = base[:len(train_recs)], base[len(train_recs):]
        train_pairs, held_pairs = pairs(train_recs, base_train), pairs(held_recs, base_held)
    gen_s = time.time() - t0
    for name, ps in (("pairs_train.jsonl", train_pairs), ("pairs_held.jsonl", held_pairs)):
        (work / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ps))
    print(f"{len(train_pairs)} train / {len(held_pairs)} held-out pairs; base answers in {gen_s:.0f} s",
          file=sys.stderr)

    out = work / "run"
    cmd = [sys.executable, "-m", "jaxgpt.dpo", "smollm2", "--data", str(work / "pairs_train.jsonl"),
           "--eval-data", str(work / "pairs_held.jsonl"), "--out", str(out), "--force",
           "--lora-rank", str(args.lora_rank), "--lr", str(args.lr), "--beta", str(args.beta),
           "--batch-size", str(args.batch_size), "--max-iters", str(args.steps),
           "--eval-interval", str(args.steps), "--ckpt-interval", str(args.steps), "--no-progress"]
    print(" ".join(cmd[1:]), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    train_s = time.time() - t0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]

    tuned = jaxgpt.load(out)  # the adapter merged into its base
    after_held = greedy_answers(tuned.model, tuned.tokenizer, held_recs, args.max_new)
    refs = [templates.to_messages(r, "r")[-1]["content"] for r in held_recs]
    rl = lambda answers: float(np.mean([rouge_l(a, r) for a, r in zip(answers, refs)]))
    keys = ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
            "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected"]
    res = {"pairs": {"train": len(train_pairs), "held": len(held_pairs)}, "steps": args.steps,
           "command": " ".join(["python"] + cmd[1:]).replace(str(REPO) + "/", ""),
           "train_wall_s": round(train_s, 1),
           "before": {k: evals[0][k] for k in keys} | {"rouge_l": rl(base_held)},
           "after": {k: evals[-1][k] for k in keys} | {"rouge_l": rl(after_held)},
           "examples": [{"prompt": user_messages(r)[0]["content"], "reference": ref, "before": b, "after": a}
                        for r, ref, b, a in list(zip(held_recs, refs, base_held, after_held))[:4]]}
    (HERE / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print("| metric (held-out) | before | after |\n|---|---|---|")
    for k in keys + ["rouge_l"]:
        print(f"| {k} | {res['before'][k]:.4f} | {res['after'][k]:.4f} |")


if __name__ == "__main__":
    main()
