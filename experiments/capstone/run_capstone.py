"""The capstone: a jaxgpt CLI assistant, from a base model to a chat, in one script.

    python experiments/capstone/run_capstone.py                  # base: GPT-2 124M (needs the weights)
    python experiments/capstone/run_capstone.py --base scratch   # base: trained here (see below)
    python experiments/capstone/run_capstone.py --base PATH      # any jaxgpt checkpoint or HF folder

Recipe: the ~170 hand-written question/answer records in data.json (questions about jaxgpt's
own command line) -> seeded train/val/test split -> full SFT and LoRA SFT from the same base,
each with a before/after evaluation (masked val loss, greedy test answers scored by ROUGE-L,
exact match, ends-with-<|endoftext|>) -> a few chat turns with the fine-tuned model ->
OUT/capstone_report.md, also copied into the "## Results" section of this folder's README.md.
`--base scratch` trains the small GPT-2-BPE model of experiments/scratch_base.py first (4
layers, 128 wide, Tiny Shakespeare), because GPT-2 weights cannot be downloaded here; the report
says which base it used. Afterwards: `python -m jaxgpt.chat OUT/full` to talk to it, or ship the
LoRA adapter: `python -m jaxgpt.serve BASE --adapter capstone=OUT/lora` serves it over the
OpenAI API with a chat page at http://127.0.0.1:8000/ (the report ends with the exact command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from scratch_base import scratch_base  # noqa: E402

import jaxgpt  # noqa: E402
from jaxgpt.chat import ChatSession  # noqa: E402
from jaxgpt.sft import SFTConfig, run_sft, summary_table  # noqa: E402

CHAT_QUESTIONS = [
    "How do I train the default model?",
    "What does --top-p do in jaxgpt.sample?",
    "How do I convert a Hugging Face GPT-2 folder to a jaxgpt checkpoint?",
]
MARK = "## Results"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="gpt2",
                    help="gpt2 (hub; needs internet or the HF cache), a local checkpoint/HF folder, "
                         "or 'scratch' to train a small base here first")
    ap.add_argument("--out", default="out_capstone", help="folder for the runs and the report")
    ap.add_argument("--scratch-base", default="out_scratch_base", help="with --base scratch: its run dir (trained if missing)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of each SFT run (the data is small)")
    ap.add_argument("--lr", type=float, default=None, help="full SFT learning rate "
                    "(default: 5e-5 for GPT-2, 1e-3 for the scratch base)")
    ap.add_argument("--no-readme", action="store_true", help="don't update experiments/capstone/README.md")
    args = ap.parse_args()
    out = Path(args.out)
    scratch = args.base == "scratch"
    base = str(scratch_base(args.scratch_base)) if scratch else args.base
    lr_full = args.lr or (1e-3 if scratch else 5e-5)
    common = dict(ckpt=base, data=str(HERE / "data.json"), epochs=args.epochs, gen_tokens=96,
                  eval_interval=20, force=True)
    runs = {
        "full SFT": SFTConfig(out=str(out / "full"), lr=lr_full, **common),
        "LoRA r=16": SFTConfig(out=str(out / "lora"), lora_rank=16, lora_alpha=32.0,
                               lr=3 * lr_full if scratch else 1e-3, **common),
    }
    summaries = {name: run_sft(cfg) for name, cfg in runs.items()}

    # a few chat turns with the fully fine-tuned model (greedy, so the report is reproducible)
    chat = ChatSession(jaxgpt.load(out / "full"), temperature=0.0, max_new_tokens=80)
    transcript = []
    for q in CHAT_QUESTIONS:
        chat.reset()
        transcript.append(f"> **you:** {q}\n>\n> **bot:** {chat.reply(q).strip() or '(empty)'}\n")

    s0 = summaries["full SFT"]
    which = ("a 4-layer, 128-wide GPT-2-BPE model trained here from scratch on Tiny Shakespeare "
             "(experiments/scratch_base.py), NOT GPT-2: no GPT-2 weights can be downloaded on this "
             "machine, so expect fluent-looking but often wrong answers" if scratch else f"`{base}`")
    report = "\n".join([
        f"Base model: {which}.", "",
        f"Data: {sum(s0['records'].values())} hand-written records ({s0['records']['train']} train, "
        f"{s0['records']['val']} val, {s0['records']['test']} test), {args.epochs} epochs, batch 8, "
        f"Alpaca template, reply-only loss. Test answers are greedy, 96 tokens max.", "",
        summary_table(summaries),
        "Chat with the full-SFT model (`python -m jaxgpt.chat " + str(out / "full") + " --temperature 0`):", "",
        *transcript,
        f"Per-run reports with side-by-side answers: `{out}/full/report.md`, `{out}/lora/report.md`.",
        "Reproduce: `python experiments/capstone/run_capstone.py" + (" --base scratch" if scratch else
                                                                      f" --base {base}") + "`.", "",
        "Ship it: serve the LoRA adapter beside its base over the OpenAI API, with the chat page "
        "at http://127.0.0.1:8000/ (pick `capstone` in the model menu):", "",
        f"    python -m jaxgpt.serve {base} --adapter capstone={out / 'lora'}", ""])
    (out / "capstone_report.md").write_text(report)
    print(report)
    if not args.no_readme:
        readme = HERE / "README.md"
        text = readme.read_text()
        head = text.split(MARK)[0] if MARK in text else text + "\n"
        readme.write_text(head + MARK + "\n\n" + report)


if __name__ == "__main__":
    main()
