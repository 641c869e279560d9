"""HellaSwag accuracy of a GPT-2-tokenized model: reading the official jsonl, the two scoring
conventions GPT-2 results are quoted in, and batched, compile-once scoring.

    examples = read_examples("hellaswag_val.jsonl", limit=None)
    result = score(model, tokenizer, examples)   # {"n", "acc", "acc_norm", "acc_norm_harness",
                                                 #  "per_example": [{"ind", "label", "pred", ...}]}

Each example is a context and four endings, one of them right (`label`). The model scores each
ending by its loss given the context; three rules pick the ending:

- `acc`, `acc_norm` -- completion style, as karpathy's build-nanogpt / llm.c `hellaswag.py`:
  context tokens = encode(ctx), ending tokens = encode(" " + ending); the loss counts the ending
  tokens only. `acc`: the lowest summed loss; `acc_norm`: the lowest mean loss per ending token.
- `acc_norm_harness` -- EleutherAI lm-evaluation-harness's hellaswag `acc_norm`: the context is
  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), each choice is
  preprocess(ending) and is scored as the continuation " " + choice (split from the context as the
  harness does); the prediction is the highest log-likelihood divided by len(choice) in
  characters. preprocess strips, turns " [title]" into ". ", deletes any "[...]" and replaces
  double spaces by single ones.

A row longer than the model's context keeps its last block_size + 1 tokens (the context is cut
from the left); ending tokens cut off that way, if any, are not scored.

`score` is meant to be called repeatedly (the trainer's periodic HellaSwag eval): the rows are
scored by jaxgpt.evaluate.scoring.score_continuations, one jitted forward keyed on the model's nnx graphdef
and the padded shape, so scoring the same examples again on the same model graph compiles
nothing; rows are padded to power-of-two lengths (buckets), each compiled once, and the
tokenization of an example is cached.
The command line is `python -m jaxgpt.eval CKPT --task hellaswag --data FILE` (jaxgpt.cli.eval).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.evaluate.scoring import LOGITS_BUDGET, score_continuations

N_ENDINGS = 4
FIELDS = ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label")

# OpenAI's GPT-2 124M on the 10,042 validation examples, from build-nanogpt's hellaswag.py
# docstring (completion style, this module's acc / acc_norm rules) and the lm-evaluation-harness
# figures quoted there. jaxgpt has not reproduced them: no GPT-2 weights where it was developed.
REFERENCE_GPT2_124M = {"acc": 0.2859, "acc_norm": 0.2955}
HARNESS_GPT2_124M = {"acc": 0.2892, "acc_norm": 0.3114}


# ----------------------------------------------------------------------------- reading

def read_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of an official HellaSwag jsonl file (one JSON object a line; blank lines are
    skipped), the first `limit` if given. ConfigError naming the line for a malformed record."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                out.append(_check(line, f"{path} line {lineno}", len(out)))
                if limit is not None and len(out) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def _check(line: str, where: str, index: int) -> dict:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in FIELDS if k not in rec or rec[k] is None]
    if "label" in missing or rec.get("label") == "":
        raise ConfigError(f"{where}: no label (the official test split is unlabelled; use val)")
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (needs {', '.join(FIELDS)})")
    for k in ("ctx", "ctx_a", "ctx_b", "activity_label"):
        if not isinstance(rec[k], str):
            raise ConfigError(f"{where}: {k} must be a string, got {type(rec[k]).__name__}")
    endings = rec["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise ConfigError(f"{where}: endings must be a list of {N_ENDINGS} strings")
    if len(endings) != N_ENDINGS:
        raise ConfigError(f"{where}: {len(endings)} endings, expected {N_ENDINGS}")
    label = rec["label"]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # the Hugging Face copy stores the label as a string
    if isinstance(label, bool) or not isinstance(label, int):
        raise ConfigError(f"{where}: label must be an integer, got {rec['label']!r}")
    if not 0 <= label < N_ENDINGS:
        raise ConfigError(f"{where}: label {label} out of range 0..{N_ENDINGS - 1}")
    return {**rec, "label": label, "ind": rec.get("ind", index)}


# ----------------------------------------------------------------------------- rendering

def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess` (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_query(ex: dict) -> str:
    """The harness's context: activity label, ": ", ctx_a, " ", ctx_b capitalized, preprocessed."""
    return harness_preprocess(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())


def _harness_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them: trailing spaces of the context
    move to the continuation, and the continuation's ids are those of context + continuation
    encoded as one string, past the context's own ids."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode_ordinary(context + continuation)
    ctx = tok.encode_ordinary(context)
    return ctx, whole[len(ctx):]


@lru_cache(maxsize=1 << 16)
def _render(tok, ctx: str, ctx_a: str, ctx_b: str, activity_label: str, endings: tuple[str, ...]):
    """(rows, choice character lengths): 2 * N_ENDINGS rows (context ids, ending ids), the
    completion-style rows first, then the harness rows."""
    c = tok.encode_ordinary(ctx)
    rows = [(c, tok.encode_ordinary(" " + e)) for e in endings]
    query = harness_query({"ctx_a": ctx_a, "ctx_b": ctx_b, "activity_label": activity_label})
    choices = [harness_preprocess(e) for e in endings]
    rows += [_harness_pair(tok, query, " " + ch) for ch in choices]
    return rows, [len(ch) for ch in choices]


def render(tok, ex: dict):
    """An example's 8 (context ids, ending ids) rows and its harness choices' character lengths."""
    return _render(tok, ex["ctx"], ex["ctx_a"], ex["ctx_b"], ex["activity_label"], tuple(ex["endings"]))


# ----------------------------------------------------------------------------- scoring

def check_tokenizer(model, tokenizer) -> None:
    if getattr(tokenizer, "name", None) != "gpt2":
        have = getattr(tokenizer, "name", None) or "no known tokenizer"
        raise ConfigError(f"HellaSwag needs a model with the GPT-2 tokenizer; this one has {have}")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"HellaSwag needs GPT-2's {tokenizer.vocab_size}-token vocabulary; this "
                          f"model's is {model.config.vocab_size}")


def score(model, tokenizer, examples: list[dict], progress: bool = True,
          logits_budget: int = LOGITS_BUDGET) -> dict:
    """{"n", "acc", "acc_norm", "acc_norm_harness", "per_example": [{"ind", "label", "pred",
    "pred_norm", "pred_norm_harness"}, ...]} for a GPT (nnx) model and the GPT-2 tokenizer.

    Each example's 8 rows (4 endings x 2 conventions) are (context, ending) pairs for
    jaxgpt.evaluate.scoring.score_continuations, the scorer shared with perplexity, the lm-evaluation-harness
    model and the server: batched by padded length, each shape compiled once."""
    check_tokenizer(model, tokenizer)
    if not examples:
        raise ConfigError("no HellaSwag examples to score")
    R = 2 * N_ENDINGS
    pairs, char_len = [], np.ones((len(examples), N_ENDINGS))
    for i, ex in enumerate(examples):
        rows, lens = render(tokenizer, ex)
        # an empty context: the ending is predicted from <|endoftext|>
        pairs += [(ctx or [tokenizer.eot_token], end) for ctx, end in rows]
        char_len[i] = np.maximum(lens, 1)  # an empty choice would divide by zero
    scored = score_continuations(model, pairs, logits_budget=logits_budget,
                                 desc="hellaswag" if progress else None)
    sums = -np.array([s.total for s in scored]).reshape(len(examples), R)  # summed losses
    counts = np.array([len(s.logprobs) for s in scored], np.float64).reshape(len(examples), R)

    sums_c, sums_h = sums[:, :N_ENDINGS], sums[:, N_ENDINGS:]
    n_tok = np.maximum(counts[:, :N_ENDINGS], 1)
    pred = np.argmin(sums_c, axis=1)
    pred_norm = np.argmin(sums_c / n_tok, axis=1)
    pred_harness = np.argmax(-sums_h / char_len, axis=1)  # log-likelihood per character
    labels = np.array([ex["label"] for ex in examples])
    per_example = [{"ind": ex["ind"], "label": int(ex["label"]), "pred": int(a), "pred_norm": int(b),
                    "pred_norm_harness": int(c)}
                   for ex, a, b, c in zip(examples, pred, pred_norm, pred_harness)]
    return {"n": len(examples), "acc": float(np.mean(pred == labels)),
            "acc_norm": float(np.mean(pred_norm == labels)),
            "acc_norm_harness": float(np.mean(pred_harness == labels)), "per_example": per_example}


# ----------------------------------------------------------------------------- reporting

def is_gpt2_124m(config, source: str | None) -> bool:
    """OpenAI's GPT-2 124M: 12 layers, 12 heads, 768 channels, 50,257 tokens, 1024 context, from a
    source whose name says gpt2 (the hub name `gpt2`, a folder of it)."""
    c = config
    return ((c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (12, 12, 768, 50257, 1024)
            and "gpt2" in str(source or "").lower().replace("-", ""))


def reference_note(full: bool) -> str:
    """The published GPT-2 124M figures, and the plain statement that jaxgpt has not checked them."""
    lines = [f"reference, OpenAI GPT-2 124M on the 10,042 val examples: acc {REFERENCE_GPT2_124M['acc']:.4f}"
             f" acc_norm {REFERENCE_GPT2_124M['acc_norm']:.4f} (build-nanogpt hellaswag.py); "
             f"lm-evaluation-harness acc_norm {HARNESS_GPT2_124M['acc_norm']:.4f} (as quoted there)",
             "not checked: jaxgpt's scoring could not be compared with these numbers on the machine "
             "it was developed on (no GPT-2 weights there)"]
    if not full:
        lines.append("(this run scored a subset, so its numbers are not comparable to the reference)")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    rows = [("acc", "lowest summed loss of the ending (build-nanogpt / llm.c)"),
            ("acc_norm", "lowest mean loss per ending token (build-nanogpt / llm.c)"),
            ("acc_norm_harness", "highest log-likelihood per character (lm-evaluation-harness)")]
    lines = [f"hellaswag: {result['n']} examples"]
    lines += [f"  {name:<17} {result[name]:.4f}  {what}" for name, what in rows]
    return "\n".join(lines)
