"""Losses: next-token cross-entropy as (loss_sum, token_count) under a mask, and the output head
applied to the final hidden states in chunks, so the [N, vocab] logits never exist at once.

Every loss the trainer optimizes is a sum and a count: the mean over a global batch is then
exactly sum / count, whether the batch is split over devices, over micro-batches (gradient
accumulation) or both, and whether the rows are all tokens (pretraining: no mask) or only a
reply's tokens (SFT: a 0/1 mask), so records of unequal lengths weigh by their tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats/token) of logits [B, T, V] against targets [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def masked_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """(sum of cross-entropy over the targets where mask is 1, number of those targets).
    logits [..., V], targets and mask [...]; mask None counts every target."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return ce.sum(), jnp.asarray(ce.size, jnp.float32)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)


def masked_mean(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over every unmasked target (not a mean of row means)."""
    total, n = masked_sum(logits, targets, mask)
    return total / jnp.maximum(n, 1.0)


def head_loss_sum(model, h: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                  chunk_rows: int = 1024, min_logits: int = 2 ** 27):
    """(summed cross-entropy, count) of the model's head at final hidden states h [N, C] against
    targets [N] (mask [N] or None).

    When the logits would be large (N * vocab >= min_logits: 0.5 GiB in float32; GPT-2 at
    8 x 1024 has 1.5 GiB, and the head's backward makes several such copies) they are computed
    `chunk_rows` rows at a time in a `lax.map`, with the chunk's forward recomputed in the
    backward pass (`jax.checkpoint`): only one chunk of logits is ever alive. Same value and
    gradients as `masked_sum(model(x)[0], y, mask)`; small runs (the baby model) use one chunk.
    """
    N = h.shape[0]
    targets = targets.reshape(N)
    mask = None if mask is None else mask.reshape(N)

    def chunk(hc, yc, mc):  # (summed loss, count) of one chunk of rows
        return masked_sum(model.head(hc), yc, mc)

    if N * model.config.vocab_size < min_logits or N % chunk_rows or N == chunk_rows:
        return chunk(h, targets, mask)
    hs, ys = h.reshape(N // chunk_rows, chunk_rows, -1), targets.reshape(-1, chunk_rows)
    ms = jnp.ones_like(ys, jnp.float32) if mask is None else mask.reshape(-1, chunk_rows)
    sums, counts = jax.lax.map(jax.checkpoint(lambda a: chunk(*a)), (hs, ys, ms))
    return sums.sum(), counts.sum()


def head_loss(model, h: jax.Array, targets: jax.Array, chunk_rows: int = 1024,
              min_logits: int = 2 ** 27) -> jax.Array:
    """Mean cross-entropy of `head_loss_sum` with every target counted."""
    total, n = head_loss_sum(model, h, targets, None, chunk_rows, min_logits)
    return total / n


def lm_loss(model, batch: dict, key=None):
    """The language-model loss of one (micro-)batch, as (summed cross-entropy, counted targets).

    batch: {"x": int [B, T], "y": int [B, T]} and, for SFT, "mask" [B, T] (1 where the target
    counts). `key` enables dropout. This is the loss_fn the trainer differentiates, for
    pretraining and fine-tuning alike."""
    h, _ = model(batch["x"], key=key, hidden=True)  # [B*T, C]
    return head_loss_sum(model, h, batch["y"], batch.get("mask"))
