"""Verifiable rewards for the GRPO experiment, written as TRL's reward functions are:
f(prompts, completions, **columns) -> one float per completion. The prompts are few-shot
"Q: What is A + B?\nA:" texts, so the answer is the completion's first line."""

import re


def _first_line(c) -> str:
    text = c[0]["content"] if isinstance(c, list) else c
    return text.split("\n", 1)[0]


def exact_answer(prompts, completions, answer, **kwargs):
    """1.0 when the first integer on the completion's first line is the answer, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\d+", _first_line(c).replace(",", ""))
        out.append(1.0 if nums and nums[0] == str(a) else 0.0)
    return out


def number_only(prompts, completions, **kwargs):
    """The required format: 1.0 when the first line is just an integer (spaces allowed), else 0.0."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", _first_line(c)) else 0.0 for c in completions]
