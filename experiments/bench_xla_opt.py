"""XLA's CPU optimisation level: compile time and speed of the programs that matter, per level.

    python experiments/bench_xla_opt.py                    # SmolLM2, levels 3 (XLA's default), 1 (jaxgpt's), 0
    python experiments/bench_xla_opt.py --levels 3,1 --rounds 3 --model /path/to/gpt2

Each (level, round) is a fresh process (XLA reads XLA_FLAGS once; JAXGPT_XLA_TUNING=0 so the
level given is the one used), levels alternated round by round; no compilation cache. A process
compiles the server engine's decode step and chunked prefill (8 slots, the model's context) and
times an 8-row decode step, then `generate` 128 greedy tokens at batch 1, float32 and int8 (its
first call, compile included, and the best of 3 after). One table of medians at the end.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
from jaxgpt.formats.load import load_for_inference
from jaxgpt.decode.engine import Engine, Request
from jaxgpt.decode.generate import generate
lm = load_for_inference(sys.argv[1])
row = {}
e = Engine(lm.model, slots=8)
S = e.capacities[0]
for key in (("step", S), ("chunk", S)):
    t = time.perf_counter(); e.warmup(shapes=[key]); row[key[0] + " compile s"] = time.perf_counter() - t
for i in range(8):
    e.add(Request(list(range(100, 140)), 24, temperature=0.7, top_p=0.9, seed=i))
ts = []
while e.busy:
    t = time.perf_counter(); e.step(); ts.append(time.perf_counter() - t)
row["8-row step ms"] = 1000 * float(np.median(ts[2:]))
del e
for name, m in (("float32", lm.model), ("int8", lm.quantize().model)):
    p = np.arange(100, 116)[None]
    t = time.perf_counter(); np.asarray(generate(m, p, 128, temperature=0.0)); row[f"{name} first call s"] = time.perf_counter() - t
    ts = []
    for _ in range(3):
        t = time.perf_counter(); np.asarray(generate(m, p, 128, temperature=0.0)); ts.append(time.perf_counter() - t)
    row[f"{name} tokens/s"] = 128 / min(ts)
print("ROW " + json.dumps(row))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="anything jaxgpt.load takes (default smollm2)")
    ap.add_argument("--levels", default="3,1,0", help="XLA CPU optimisation levels, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="processes per level, alternated (default 2)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    rows = {lv: [] for lv in levels}
    for r in range(args.rounds):
        for lv in levels:
            env = {**os.environ, "JAXGPT_XLA_TUNING": "0", "JAXGPT_COMPILATION_CACHE": "0",
                   "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level={lv}".strip()}
            p = subprocess.run([sys.executable, "-c", CHILD, args.model], env=env, capture_output=True, text=True)
            line = [l for l in p.stdout.splitlines() if l.startswith("ROW ")]
            if p.returncode or not line:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            rows[lv].append(json.loads(line[0][4:]))
            print(f"round {r + 1} level {lv}: {rows[lv][-1]}", file=sys.stderr, flush=True)
    cols = list(rows[levels[0]][0])
    print(f"XLA CPU optimisation level, {args.model}, {os.cpu_count()} cores, medians of {args.rounds} "
          "alternated processes\n")
    print("| level | " + " | ".join(cols) + " |")
    print("|--:|" + "--:|" * len(cols))
    for lv in levels:
        print(f"| {lv} | " + " | ".join(f"{statistics.median(r[c] for r in rows[lv]):.1f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
