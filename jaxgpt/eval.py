"""Perplexity of a model on a text: mean next-token cross-entropy over context-sized windows.

    python -m jaxgpt.eval CKPT --text FILE [--stride S] [--json]

The text is tokenized as one stream. By default it is cut into consecutive, non-overlapping
windows of the model's context length L; a window of n tokens scores its n-1 next-token
predictions (the last, shorter window included). With `--stride S` windows of L tokens start
every S tokens and each token is scored once, by the first window that has it past the previous
window's end (Hugging Face's sliding-window perplexity): more context per prediction, more compute.
With S < L every token but the first is scored; S = L is the non-overlapping layout.
The command line lives in jaxgpt.cli.eval.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt.config import ConfigError

LOGITS_BUDGET = 2**26  # floats of logits per jitted batch (256 MB): sets how many windows per call


def windows(n_tokens: int, L: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, score_from) per window: it reads tokens[start:end] and scores the tokens at
    positions score_from..end-1, each predicted from the tokens before it in the window."""
    out = []
    if stride is None:
        for start in range(0, n_tokens, L):
            end = min(start + L, n_tokens)
            if end - start >= 2:  # a lone final token has nothing to predict it from
                out.append((start, end, start + 1))
        return out
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + L, n_tokens)
        score_from = max(prev_end, start + 1)  # a window's first token has no context in it
        if end > score_from:
            out.append((start, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_stride(stride: int | None, L: int) -> None:
    if stride is not None and not 1 <= stride <= L:
        raise ConfigError(f"--stride must be between 1 and the context length {L}, got {stride}")


def window_arrays(ids: np.ndarray, L: int, wins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets and a score mask, each [n_windows, L]; short windows are zero-padded."""
    x = np.zeros((len(wins), L), np.int32)
    y = np.zeros((len(wins), L), np.int32)
    mask = np.zeros((len(wins), L), bool)
    for k, (start, end, score_from) in enumerate(wins):
        n = end - start
        x[k, :n] = ids[start:end]
        y[k, :n - 1] = ids[start + 1:end]  # position j predicts token start + j + 1
        pos = start + 1 + np.arange(n - 1)  # stream position of each target
        mask[k, :n - 1] = pos >= score_from
    return x, y, mask


@partial(jax.jit, static_argnames="graphdef")
def _nll_sum(graphdef, params, x, y, mask):
    """Sum of next-token negative log-likelihoods over the masked positions of x/y [B, L]."""
    logits, _ = nnx.merge(graphdef, params)(x)  # [B, L, V] float32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)  # [B, L]
    return jnp.sum(jnp.where(mask, nll, 0.0))


def evaluate(model, ids, stride: int | None = None, batch_size: int | None = None) -> dict:
    """{"loss": mean nats/token, "perplexity": exp(loss), "tokens": number scored} for token ids."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    L, V = model.config.block_size, model.config.vocab_size
    check_stride(stride, L)
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); at least 2 are needed to score one")
    x, y, mask = window_arrays(ids, L, windows(len(ids), L, stride))
    B = batch_size or int(np.clip(LOGITS_BUDGET // (L * V), 1, 64))
    pad = -len(x) % B  # whole batches only, so every call has the same shape (one compile)
    x, y, mask = (np.concatenate([a, np.zeros((pad, L), a.dtype)]) for a in (x, y, mask))
    graphdef, params = nnx.split(model)
    total = 0.0
    for i in range(0, len(x), B):
        total += float(_nll_sum(graphdef, params, x[i:i + B], y[i:i + B], mask[i:i + B]))
    n = int(mask.sum())
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n}


if __name__ == "__main__":  # `python -m jaxgpt.eval` runs the CLI (no library module imports it)
    import runpy
    runpy.run_module("jaxgpt.cli.eval", run_name="__main__")
