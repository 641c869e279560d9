"""Instruction records -> token ids -> masked batches, for SFT (and the pieces DPO reuses).

Records are a JSON list or JSONL of Alpaca, prompt/completion or chat records (jaxgpt.templates).
Each becomes prompt tokens (the template applied) then reply tokens and the end token; `collate`
masks everything but the reply (and the end token), and `RecordBatches` is the data order: the
global batch of step s is a pure function of (seed, s).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.decode.steps import bucket  # padded lengths: powers of two, so few shapes compile
from jaxgpt.tokenizers import templates

IGNORE = 0  # mask value of positions that do not count in the loss


# ---- records -----------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """A JSON list of records, or JSONL (one record per line), each checked as an instruction
    record. ConfigError names the bad line or record."""
    records = load_json_records(path)
    # validate every record now, so a bad one is reported before any training
    for i, r in enumerate(records):
        templates.to_messages(r, f"{Path(path).name} record {i}")
    return records


def load_json_records(path: str | Path, flag: str = "--data") -> list:
    """The records of a JSON list or JSONL file, unchecked (SFT, DPO and GRPO check their own
    fields). ConfigError names the bad line."""
    if not path:
        raise ConfigError(f"{flag} FILE is required")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"{flag} {path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{flag} {path}: malformed JSONL at line {n}: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{flag} {path}: no records (expected a JSON list or JSON lines)")
    return records


def split(records: list, val_frac: float, test_frac: float, seed: int) -> dict[str, list]:
    """Seeded shuffle, then test / val / train slices (test and val sizes rounded down)."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test, n_val = int(len(records) * test_frac), int(len(records) * val_frac)
    pick = lambda idx: [records[i] for i in idx]
    return {"test": pick(order[:n_test]), "val": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


# ---- tokens, masks, batches --------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[int]  # prompt + reply + eot
    n_prompt: int  # how many of ids are prompt (masked out unless mask_prompt is off)


def check_tokenizer(tok) -> None:
    if tok is None or getattr(tok, "eot_token", None) is None or not hasattr(tok, "encode_ordinary"):
        raise ConfigError("SFT needs a tokenizer with an end-of-text token (GPT-2's BPE, a GGUF / "
                          "tokenizer.json BPE with an eos); "
                          "this model has a char vocabulary or none")


prompt_ids = templates.prompt_ids  # token ids of the rendered prompt (messages exclude the reply)


def encode(tok, template: str, record, max_len: int, where: str = "record") -> tuple[Encoded | None, str]:
    """(Encoded, "") or (None, "skipped") / (Encoded, "truncated"): fits prompt+reply into
    max_len + 1 tokens (a sequence of n tokens gives n - 1 next-token predictions) by cutting the
    prompt from the left; a reply that alone does not fit is skipped."""
    messages = templates.to_messages(record, where)
    p = prompt_ids(tok, template, messages[:-1])
    r = tok.encode_ordinary(messages[-1]["content"]) + [tok.eot_token]
    if len(r) > max_len:
        return None, "skipped"
    status = ""
    if len(p) + len(r) > max_len + 1:
        p, status = p[len(p) + len(r) - max_len - 1:], "truncated"
    return Encoded(p + r, len(p)), status


def encode_all(tok, template: str, records: list, max_len: int, log=None) -> list[Encoded]:
    out, counts = [], {"skipped": 0, "truncated": 0}
    for i, rec in enumerate(records):
        enc, status = encode(tok, template, rec, max_len, f"record {i}")
        if status:
            counts[status] += 1
        if enc is not None:
            out.append(enc)
    if log and (counts["skipped"] or counts["truncated"]):
        log(f"{counts['truncated']} examples longer than {max_len + 1} tokens had their prompt cut "
            f"from the left; {counts['skipped']} whose reply alone is longer were skipped")
    return out


def collate(examples: list[Encoded], pad_id: int, length: int, mask_prompt: bool = True,
            rows: int | None = None):
    """(x, y, mask), each int32 [rows, length]: inputs, next-token targets, and 1 where the
    target counts (a reply token or the closing eot; with mask_prompt off, every real token).
    Right padding with pad_id; padding (and extra empty rows up to `rows`) has mask 0."""
    rows = rows or len(examples)
    x = np.full((rows, length), pad_id, np.int32)
    y = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for b, ex in enumerate(examples):
        ids = np.asarray(ex.ids[:length + 1], np.int32)
        n = len(ids) - 1  # predictions in this row
        x[b, :n], y[b, :n] = ids[:-1], ids[1:]
        # target y[j] = ids[j + 1] is a reply token iff j + 1 >= n_prompt
        first = max(ex.n_prompt - 1, 0) if mask_prompt else 0
        mask[b, first:n] = 1
    return x, y, mask


def stacked(examples: list[Encoded], batch_size: int, cap: int, pad_id: int, mask_prompt: bool,
            rows=slice(None)) -> dict:
    """Consecutive batches of `examples` stacked to {"x", "y", "mask"} [N, len(rows), L], all
    padded to one bucketed length L (one compiled evaluation), only the batch rows `rows`."""
    length = bucket(max(len(e.ids) - 1 for e in examples), cap)
    parts = [collate(examples[i:i + batch_size], pad_id, length, mask_prompt, rows=batch_size)
             for i in range(0, len(examples), batch_size)]
    return {k: np.stack([p[j][rows] for p in parts]) for j, k in enumerate(("x", "y", "mask"))}


class RecordBatches:
    """The SFT data order: the global batch of step s is a pure function of (seed, s).

    Epoch e = s // steps_per_epoch takes the train examples in a permutation seeded by
    (seed, e); step s takes the next `batch_size` of them (the epoch's last batch is filled with
    empty rows, mask 0). `__call__(steps, rows)` collates the given rows of those steps' batches,
    all padded to one bucketed length (the longest of the steps' global batches, so every
    process pads alike), as {"x", "y", "mask"} [len(steps), len(rows), L].
    """

    def __init__(self, examples: list[Encoded], batch_size: int, seed: int, cap: int, pad_id: int,
                 mask_prompt: bool):
        self.examples, self.B, self.seed, self.cap = examples, batch_size, seed, cap
        self.pad_id, self.mask_prompt = pad_id, mask_prompt
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self._order = (None, None)

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def batch(self, step: int) -> list[Encoded]:
        epoch, i = divmod(step, self.steps_per_epoch)
        return [self.examples[j] for j in self.order(epoch)[i * self.B:(i + 1) * self.B]]

    def __call__(self, steps: range, rows) -> dict:
        chunks = [self.batch(s) for s in steps]
        length = bucket(max(len(e.ids) - 1 for c in chunks for e in c), self.cap)
        cols = [collate(c, self.pad_id, length, self.mask_prompt, rows=self.B) for c in chunks]
        return {k: np.stack([c[j][rows] for c in cols]) for j, k in enumerate(("x", "y", "mask"))}
