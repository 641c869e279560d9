"""Verifiable rewards for the GRPO experiment, written as TRL's reward functions are:
f(prompts, completions, **columns) -> one float per completion (completions are chat messages
here: [{"role": "assistant", "content": ...}])."""

import re


def _text(c) -> str:
    return c[0]["content"] if isinstance(c, list) else c


def exact_answer(prompts, completions, answer, **kwargs):
    """1.0 when the last integer in the completion is the answer, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\d+", _text(c).replace(",", ""))
        out.append(1.0 if nums and nums[-1] == str(a) else 0.0)
    return out


def number_only(prompts, completions, **kwargs):
    """The required format: 1.0 when the completion is just an integer (spaces / a full stop allowed)."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*\.?\s*", _text(c)) else 0.0 for c in completions]
