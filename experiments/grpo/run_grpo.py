"""GRPO on SmolLM2-135M-Instruct with verifiable rewards: two-digit additions, exact answers and a
required format (the bare number).

    python experiments/grpo/run_grpo.py                # prompts -> GRPO (LoRA) -> table + reward.png
    python experiments/grpo/run_grpo.py --steps 30

Prompts are plain text, two worked examples then "Q: What is A + B?\nA:" (A, B in 10..99,
seeded); --train of them for training, --held others held out. The rewards are
experiments/grpo/rewards.py: exact_answer (the first integer of the completion's first line is
A + B; weight 1) and number_only (that line is just an integer; weight 0.5). `python -m jaxgpt.grpo` trains a
LoRA adapter: each step samples --group-size completions of --batch-size prompts through the
Engine; held-out reward (greedy completions) is logged at step 0, every --eval-every steps and
at the end. results.json keeps the numbers, a few completions verbatim and the rollout speed;
reward.png plots the reward by step.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


SHOTS = "Q: What is 12 + 30?\nA: 42\nQ: What is 51 + 17?\nA: 68\n"


def problems(n: int, rng) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        out.append({"prompt": f"{SHOTS}Q: What is {a} + {b}?\nA:", "answer": str(a + b)})
    return out


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    tr = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    ev = [(r["step"], r["eval_reward"]) for r in rows if "eval_reward" in r]
    ax.plot(*zip(*tr), label="training reward (sampled, mean of the step's group)", lw=1)
    ax.plot(*zip(*ev), "o-", label="held-out reward (greedy)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (exact_answer + 0.5 number_only)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path.write_bytes(buf.getvalue())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--held", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--work", default=str(HERE / "work"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train, held = problems(args.train, rng), problems(args.held, rng)
    for name, recs in (("train.jsonl", train), ("held.jsonl", held)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = work / "run"
    rw = "experiments/grpo/rewards.py"
    cmd = [sys.executable, "-m", "jaxgpt.grpo", "smollm2", "--prompts", str(work / "train.jsonl"),
           "--eval-prompts", str(work / "held.jsonl"), "--reward", f"{rw}:exact_answer,{rw}:number_only",
           "--reward-weights", "1,0.5", "--out", str(out), "--force", "--lora-rank", "8",
           "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--max-iters", str(args.steps),
           "--eval-interval", str(args.eval_every), "--ckpt-interval", str(args.steps), "--no-progress"]
    print(" ".join(cmd[1:]), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - t0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    plot(rows, HERE / "reward.png")
    evals = [r for r in rows if "eval_reward" in r]
    summary = json.loads((out / "summary.json").read_text())
    comps = [json.loads(l) for l in (out / "eval_completions.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout_tokens_per_s" in r]
    res = {"command": " ".join(["python"] + cmd[1:]).replace(str(REPO) + "/", ""), "wall_s": round(wall, 1),
           "rows_per_step": args.batch_size * args.group_size,
           "before": {k: v for k, v in evals[0].items() if k.startswith("eval_")},
           "after": {k: v for k, v in evals[-1].items() if k.startswith("eval_")},
           "eval_by_step": [(r["step"], r["eval_reward"]) for r in evals],
           "train_reward_by_step": [(r["step"], r["reward"]) for r in steps],
           "rollout_tokens": summary["rollout_tokens"], "rollout_seconds": round(summary["rollout_seconds"], 2),
           "rollout_tokens_per_s": round(summary["rollout_tokens"] / summary["rollout_seconds"], 1),
           "rollout_tokens_per_s_median_step": float(np.median([r["rollout_tokens_per_s"] for r in steps])),
           "examples": [{"prompt": c["prompt"].rsplit("Q: ", 1)[-1], "answer": c["answer"], "before": c["before"],
                         "after": c["after"]} for c in comps[:6]]}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| held-out (greedy) | before | after |\n|---|---|---|")
    for k in res["before"]:
        print(f"| {k} | {res['before'][k]:.4f} | {res['after'][k]:.4f} |")
    print(f"rollouts: {res['rollout_tokens']} tokens in {res['rollout_seconds']} s "
          f"({res['rollout_tokens_per_s']} tokens/s at {res['rows_per_step']} rows)")


if __name__ == "__main__":
    main()
