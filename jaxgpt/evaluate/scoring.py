"""Scoring token sequences under a model: the one batched, compile-once scorer of continuations
given contexts (`score_continuations`), and perplexity of a text built on it.

    scored = score_continuations(model, [(context_ids, continuation_ids), ...])
    scored[i].logprobs, scored[i].greedy       # per continuation token: log p, was it the argmax
    evaluate(model, ids, stride=None)          # {"loss", "perplexity", "tokens"}

HellaSwag (jaxgpt.hellaswag), the lm-evaluation-harness model (jaxgpt.harness) and the server's
echoed prompt logprobs (jaxgpt.serve) all score through `score_continuations`.

Perplexity: the text is tokenized as one stream. By default it is cut into consecutive,
non-overlapping windows of the model's context length L; a window of n tokens scores its n-1
next-token predictions (the last, shorter window included). With `--stride S` windows of L tokens
start every S tokens and each token is scored once, by the first window that has it past the
previous window's end (Hugging Face's sliding-window perplexity): more context per prediction,
more compute. With S < L every token but the first is scored; S = L is the non-overlapping layout.
The command line lives in jaxgpt.cli.eval.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import lora
from jaxgpt.config import ConfigError
from jaxgpt.decode.steps import bucket

LOGITS_BUDGET = 2**26  # floats of logits per jitted call (256 MB): sets the rows per call
MAX_ROWS = 512  # rows per call at most, however short
MIN_BUCKET = 16  # the shortest padded row length compiled for


# ----------------------------------------------------------------------------- continuations

def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by default (its `add_bos`: GGUF's
    add_bos_token, a tokenizer.json's post-processor; Hugging Face's add_special_tokens=True).
    Its `encode` never does: callers prepend it (prepend_bos)."""
    return getattr(tokenizer, "bos_token", None) is not None and bool(getattr(tokenizer, "add_bos", False))


def prepend_bos(tokenizer, ids: Sequence[int], add: bool | None = None) -> list[int]:
    """`ids` with the tokenizer's BOS token first when `add` (None: when it adds one by default,
    `adds_bos`) and it has one. GPT-2's tokenizer has none: its ids are left as they are."""
    bos = getattr(tokenizer, "bos_token", None)
    if add is None:
        add = adds_bos(tokenizer)
    return [bos, *ids] if add and bos is not None else list(ids)


class Scored(NamedTuple):
    """One (context, continuation) pair's scores, one entry per scored continuation token:
    `logprobs` float32 [n] (log-softmax of the float32 logits), `greedy` bool [n] (the token was
    the argmax), and with `top` > 0 the `top` most likely tokens at each position, `top_ids`
    int32 [n, top] and `top_logprobs` float32 [n, top] (None otherwise)."""

    logprobs: np.ndarray
    greedy: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None

    @property
    def total(self) -> float:
        """The continuation's log-likelihood: its tokens' logprobs summed in float64."""
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def is_greedy(self) -> bool:
        """Whether greedy decoding from the context produces the whole continuation."""
        return bool(np.all(self.greedy))


@partial(jax.jit, static_argnames=("graphdef", "top"))
def _token_scores(graphdef, state, x, y, adapter, top: int = 0):
    """Per position of x/y [N, T]: the logprob of y (float32), whether y is the argmax, and the
    `top` best (ids, logprobs) [N, T, top] (None when top is 0). adapter [N]: each row's LoRA
    adapter in a model with several (jaxgpt.model.lora.MultiLoRALinear; ignored otherwise)."""
    model = nnx.merge(graphdef, state)
    lora.set_adapter_rows(model, jnp.repeat(adapter, x.shape[1]))  # one id per row of [N*T, C]
    logits = model(x)[0].astype(jnp.float32)  # [N, T, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [N, T]
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == y
    best = None
    if top:
        top_lp, top_id = jax.lax.top_k(logits, top)
        best = (top_id.astype(jnp.int32), top_lp - lse[..., None])
    return picked - lse, greedy, best


def _rows(pairs, L: int):
    """(input ids, target ids, number of scored targets) per pair: the row is the last L + 1
    tokens of context + continuation; its last n targets are the continuation's tokens that
    have a prediction in the window (an empty context leaves the first token unscored)."""
    out = []
    for ctx, cont in pairs:
        toks = (list(ctx) + list(cont))[-(L + 1):]
        out.append((toks[:-1], toks[1:], max(0, min(len(cont), len(toks) - 1))))
    return out


def score_continuations(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        top: int = 0, adapters: Sequence[int] | int = 0, rows: int | None = None,
                        logits_budget: int = LOGITS_BUDGET, desc: str | None = None) -> list[Scored]:
    """Score each continuation given its context: a `Scored` per (context ids, continuation ids).

    A pair longer than the model's context keeps its last block_size + 1 tokens (the context is
    cut from the left; continuation tokens cut off that way, if any, are not scored). Rows are
    grouped by their padded length (powers of two from 16 up to the context: `bucket`), `rows`
    per jitted call (default: the power of two that holds the group, at most what
    `logits_budget` float32 logits allow), the last call padded; each (rows, length, top)
    compiles once, keyed on the model's nnx graphdef, so scoring the same pairs again compiles
    nothing. `adapters`: the LoRA adapter of every pair (or one for all) in a model carrying
    several (the server's engine); `desc`: a progress bar on stderr."""
    L, V = model.config.block_size, model.config.vocab_size
    prepared = _rows(pairs, L)
    adapters = np.broadcast_to(np.asarray(adapters, np.int32), (len(prepared),))
    groups: dict[int, list[int]] = {}
    for i, (x, _, n) in enumerate(prepared):
        if n:
            groups.setdefault(bucket(len(x), cap=L, lo=MIN_BUCKET), []).append(i)
    graphdef, state = nnx.split(model)
    out: list[Scored | None] = [None] * len(prepared)
    from tqdm import tqdm  # a core dependency; imported here to keep `import jaxgpt.eval` light

    bar = tqdm(total=len(prepared), desc=desc, unit="row", disable=desc is None, file=sys.stderr,
               dynamic_ncols=True)
    pending = None  # (indices, device result): fetched after the next call is dispatched
    for T in sorted(groups):
        idx = groups[T]
        cap = int(np.clip(logits_budget // (T * V), 1, MAX_ROWS))
        G = rows or min(cap, bucket(len(idx), lo=1))
        for g in range(0, len(idx), G):
            group = idx[g:g + G]
            x = np.zeros((G, T), np.int32)
            y = np.zeros((G, T), np.int32)
            ad = np.zeros(G, np.int32)
            for k, i in enumerate(group):
                xi, yi, _ = prepared[i]
                x[k, :len(xi)], y[k, :len(yi)], ad[k] = xi, yi, adapters[i]
            result = _token_scores(graphdef, state, x, y, ad, top=int(top))
            if pending is not None:
                _collect(out, prepared, *pending, bar)
            pending = (group, result)
    if pending is not None:
        _collect(out, prepared, *pending, bar)
    bar.update(bar.total - bar.n)
    bar.close()
    empty = Scored(np.zeros(0, np.float32), np.zeros(0, bool),
                   *((np.zeros((0, top), np.int32), np.zeros((0, top), np.float32)) if top else ()))
    return [s if s is not None else empty for s in out]


def _collect(out, prepared, group, result, bar) -> None:
    lp, greedy, best = jax.device_get(result)
    for k, i in enumerate(group):
        m = len(prepared[i][1])
        sl = slice(m - prepared[i][2], m)  # the scored targets: the row's last n
        top = (best[0][k, sl], best[1][k, sl]) if best is not None else ()
        out[i] = Scored(lp[k, sl], greedy[k, sl], *top)
    bar.update(len(group))


# ----------------------------------------------------------------------------- perplexity

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


def evaluate(model, ids, stride: int | None = None, batch_size: int | None = None) -> dict:
    """{"loss": mean nats/token, "perplexity": exp(loss), "tokens": number scored} for token ids:
    each window is a (context, continuation) pair for score_continuations (`batch_size`
    windows per compiled call, default as it chooses)."""
    ids = np.asarray(ids, np.int32).reshape(-1).tolist()
    L = model.config.block_size
    check_stride(stride, L)
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); at least 2 are needed to score one")
    pairs = [(ids[start:score_from], ids[score_from:end]) for start, end, score_from in windows(len(ids), L, stride)]
    scored = score_continuations(model, pairs, rows=batch_size)
    n = sum(len(s.logprobs) for s in scored)
    loss = -sum(s.total for s in scored) / n
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n}
