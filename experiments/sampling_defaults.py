"""Which sampling defaults make SmolLM2-135M-Instruct answer well: the numbers behind the server's
defaults (jaxgpt/serve/defaults.py, docs/serving.md "Sampling defaults").

    python experiments/sampling_defaults.py [--seeds 3] [--max-tokens 96]

Six short questions with a one-word answer, each asked with the model's own chat template (its
default system message), under a few settings x seeds, all decoded by the one Engine (8 slots).
An answer counts as *right* when it holds the expected word (case-insensitive) and ends the turn
(<|im_end|>) within --max-tokens; *ended* counts the answers that ended the turn at all. Prints one
table: per setting, right / ended out of questions x seeds, and the median reply length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

QUESTIONS = [("What is the capital of France?", ["paris"]),
             ("How many days are in a week?", ["seven", "7"]),
             ("What color is the sky on a clear day?", ["blue"]),
             ("What is 2 + 2?", ["4", "four"]),
             ("Who wrote Romeo and Juliet?", ["shakespeare"]),
             ("What is the largest planet in our solar system?", ["jupiter"])]
# (label, temperature, top_p, top_k): OpenAI's default (what the server gave before), llama.cpp's
# (without its min_p), the SmolLM2 model card's, and colder ones
SETTINGS = [("T=1 (OpenAI default)", 1.0, None, None),
            ("T=0.8 top-p 0.95 top-k 40 (llama.cpp)", 0.8, 0.95, 40),
            ("T=0.2 top-p 0.9 (model card)", 0.2, 0.9, None),
            ("greedy", 0.0, None, None)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    import jaxgpt
    from jaxgpt import runtime
    from jaxgpt.tokenizers import templates
    from jaxgpt.decode.engine import Engine, Request

    runtime.enable_compilation_cache()
    lm = jaxgpt.load("smollm2")
    tok = lm.tokenizer
    eot = tok.eot_token
    prompts = [templates.prompt_ids(tok, "model", [{"role": "user", "content": q}]) for q, _ in QUESTIONS]
    engine = Engine(lm.model, slots=8, max_len=1024)
    rows = []
    t0 = time.perf_counter()
    for label, t, p, k in SETTINGS:
        seeds = [0] if t == 0 else range(args.seeds)
        reqs = [(qi, Request(prompts[qi], args.max_tokens, temperature=t, top_p=p, top_k=k, seed=s,
                             stop=(eot,))) for qi in range(len(QUESTIONS)) for s in seeds]
        todo = list(reqs)
        while todo or engine.busy:
            while todo and engine.free_slots:
                engine.add(todo.pop(0)[1])
            engine.step()
        right = ended = 0
        lengths = []
        for qi, r in reqs:
            text = tok.decode([x for x in r.tokens if x != eot]).lower()
            done = r.finish_reason == "stop"
            ended += done
            right += done and any(w in text for w in QUESTIONS[qi][1])
            lengths.append(len(r.tokens))
        rows.append((label, right, ended, len(reqs), statistics.median(lengths)))
        print(f"  {label}: {right}/{len(reqs)} right, {ended} ended ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, float32), {len(QUESTIONS)} questions x "
          f"{args.seeds} seeds, at most {args.max_tokens} new tokens\n")
    print("| setting | right (holds the answer, ended) | ended the turn | median reply tokens |")
    print("|---|---|---|---|")
    for label, right, ended, n, med in rows:
        print(f"| {label} | {right}/{n} | {ended}/{n} | {med:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
