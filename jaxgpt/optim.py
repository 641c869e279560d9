"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay on 2-D weights."""

from __future__ import annotations

import jax
import optax

from jaxgpt.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int | None = None) -> optax.Schedule:
    """Linear warmup from 0 to the peak lr over warmup_iters, cosine down to min_lr at
    lr_decay_iters (default: the last step, `total_steps` or max_iters), then flat at min_lr
    (nanoGPT's get_lr)."""
    total = total_steps if total_steps is not None else cfg.max_iters
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else total
    lr = cfg.peak_lr
    min_lr = cfg.min_lr if cfg.min_lr is not None else lr / 10
    warmup = min(cfg.warmup_iters, decay_iters)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup),
         optax.cosine_decay_schedule(lr, max(decay_iters - warmup, 1), alpha=min_lr / lr)],
        boundaries=[warmup],
    )


def decay_mask(params):
    """True for the tensors that get weight decay: 2-D ones (matmul kernels and embeddings),
    not biases or LayerNorm scales (as nanoGPT's configure_optimizers)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
