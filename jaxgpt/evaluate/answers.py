"""Held-out answers and their scores: greedy answers to records' prompts through the one Engine,
exact match / ROUGE-L / ends-with-EOS against the references, and the before/after report an SFT
run writes (report.md, test_generations.jsonl, summary.json) with the table comparing runs.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from jaxgpt.files import atomic_write
from jaxgpt.tokenizers import templates


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (for exact match and ROUGE-L)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words of the normalized texts (longest common subsequence)."""
    c, r = normalize(candidate).split(), normalize(reference).split()
    if not c or not r:
        return float(c == r)
    prev = [0] * (len(r) + 1)
    for a in c:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generate_answers(model, tok, template: str, records: list, max_new: int, progress=None,
                     slots: int = 8) -> list[dict]:
    """Greedy answers for each record's prompt, decoded by the one Engine `slots` rows at a time:
    [{"text", "ended"}] (ended: the end-of-text token came within the budget)."""
    from jaxgpt.decode.batch import run_requests
    from jaxgpt.decode.engine import Engine, Request

    L, eot = model.config.block_size, tok.eot_token
    requests = []
    for rec in records:
        msgs = templates.to_messages(rec, "record")[:-1]
        ids = templates.prompt_ids(tok, template, msgs)[-max(L - max_new, 1):]  # room for the answer
        requests.append(Request(ids, min(max_new, L - len(ids)), temperature=0.0, stop=(eot,)))
    if not requests:
        return []
    engine = Engine(model, slots=min(slots, len(requests)))
    run_requests(engine, requests, on_done=(lambda i, r: progress.update(1)) if progress else None)
    out = []
    for r in requests:
        ended = eot in r.tokens
        row = r.tokens[:r.tokens.index(eot)] if ended else r.tokens
        out.append({"text": tok.decode(row), "ended": ended})
    return out


def score(answers: list[dict], records: list) -> dict:
    refs = [templates.to_messages(r, "record")[-1]["content"] for r in records]
    n = max(len(answers), 1)
    return {
        "exact_match": sum(normalize(a["text"]) == normalize(r) for a, r in zip(answers, refs)) / n,
        "rouge_l": sum(rouge_l(a["text"], r) for a, r in zip(answers, refs)) / n,
        "ends_with_eos": sum(a["ended"] for a in answers) / n,
        "n": len(answers),
    }


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def write_report(out: Path, cfg, summary: dict, recs, before, after,
                  chat_template: str | None = None) -> None:
    """test_generations.jsonl, summary.json and report.md (metrics.jsonl and loss.png are the
    trainer's)."""
    lines = []
    for i, (rec, b, a) in enumerate(zip(recs, before, after)):
        msgs = templates.to_messages(rec, "record")
        ref = msgs[-1]["content"]
        lines.append(json.dumps({
            "index": i, "prompt": templates.render_prompt(summary["template"], msgs[:-1], chat_template),
            "reference": ref,
            "before": b["text"], "before_ended_with_eos": b["ended"],
            "before_rouge_l": rouge_l(b["text"], ref), "after": a["text"],
            "after_ended_with_eos": a["ended"], "after_rouge_l": rouge_l(a["text"], ref),
        }, ensure_ascii=False))
    atomic_write(out / "test_generations.jsonl", ("\n".join(lines) + "\n").encode())
    atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write(out / "report.md", report_markdown(cfg, summary, recs, before, after).encode())


def report_markdown(cfg, s: dict, recs, before, after, n_examples: int = 3) -> str:
    b, a = s["before"], s["after"]
    kind = (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, targets {cfg.lora_targets}"
            if cfg.lora_rank else "full fine-tuning")
    md = [f"# SFT report: {cfg.ckpt} on {cfg.data}", "",
          f"{kind}; template `{s.get('template', cfg.template)}`; {s['steps']} steps of batch {cfg.batch_size}, "
          f"lr {cfg.peak_lr:g}, {s['train_seconds']:.0f} s of training; trainable params "
          f"{s['trainable_params']:,} of {s['total_params']:,}; prompt tokens "
          f"{'masked out of' if cfg.mask_prompt else 'included in'} the loss.",
          f"Records: {s['records']['train']} train, {s['records']['val']} val, "
          f"{s['records']['test']} test ({b['n']} generated, greedy, {cfg.gen_tokens} tokens max).", "",
          "| metric | before | after |", "|---|---|---|",
          f"| masked val loss (nats/token, {b['val_tokens']} tokens) | {fmt(b['val_loss'])} | {fmt(a['val_loss'])} |",
          f"| test exact match (normalized) | {b['exact_match']:.3f} | {a['exact_match']:.3f} |",
          f"| test ROUGE-L F1 | {b['rouge_l']:.3f} | {a['rouge_l']:.3f} |",
          f"| test answers ending with the end-of-text token | {b['ends_with_eos']:.3f} | {a['ends_with_eos']:.3f} |",
          "", "![loss](loss.png)", "", "## Examples (test split)", ""]
    for rec, bb, aa in list(zip(recs, before, after))[:n_examples]:
        msgs = templates.to_messages(rec, "record")
        user = msgs[-2]["content"] + (f"\n\n{msgs[-2]['input']}" if msgs[-2].get("input") else "")
        md += [f"**Instruction:** {user}", "", f"- reference: {msgs[-1]['content']}",
               f"- before: {bb['text'].strip() or '(empty)'}", f"- after: {aa['text'].strip() or '(empty)'}", ""]
    md += ["All generations with scores: `test_generations.jsonl`."]
    return "\n".join(md) + "\n"


def summary_table(runs: dict[str, dict]) -> str:
    """A markdown table comparing SFT runs (name -> run_sft summary): the base row once, then
    each run's after-metrics, with its trainable params and training time."""
    head = ("| model | masked val loss | test ROUGE-L F1 | test exact match | ends with EOS | "
            "trainable params | train time |\n|---|---|---|---|---|---|---|\n")
    first = next(iter(runs.values()))["before"]
    rows = [f"| base (before SFT) | {fmt(first['val_loss'])} | {first['rouge_l']:.3f} | "
            f"{first['exact_match']:.3f} | {first['ends_with_eos']:.2f} | - | - |"]
    for name, s in runs.items():
        a = s["after"]
        rows.append(f"| {name} | {fmt(a['val_loss'])} | {a['rouge_l']:.3f} | {a['exact_match']:.3f} | "
                    f"{a['ends_with_eos']:.2f} | {s['trainable_params']:,} | {s['train_seconds']:.0f} s |")
    return head + "\n".join(rows) + "\n"
