"""Sampling text from a loaded model: `text_samples` (prompt text -> continuations), as
`python -m jaxgpt.sample CKPT --prompt TEXT` prints them (the CLI lives in jaxgpt.cli.sample).

The decoder itself -- logit filters, the decode copy and its int8 greedy screen, `generate` and
the slot-based `Engine` -- is jaxgpt.engine; its names are re-exported here for the code that
imports them from this module.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.decode.sampling import check_sampling, sample_rows, sample_token, top_k_filter, top_p_filter  # noqa: F401  (re-exported: `from jaxgpt.sample import generate`, ...)
from jaxgpt.decode.fast import _DERIVED, SCREEN_K, GreedyScreen, decode_copy, greedy_screen, head_table, screened_argmax  # noqa: F401  (re-exported: `from jaxgpt.sample import generate`, ...)
from jaxgpt.decode.steps import bucket  # noqa: F401  (re-exported: `from jaxgpt.sample import generate`, ...)
from jaxgpt.decode.generate import generate  # noqa: F401  (re-exported: `from jaxgpt.sample import generate`, ...)
from jaxgpt.tokenizers.templates import render_prompt


def text_samples(lm, prompt: str = "", max_new_tokens: int = 100, *, num_samples: int = 1,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: bool = True, use_cache: bool = True,
                 fast_decode: bool | None = None, raw: bool = False, grammar=None,
                 log=lambda s: print(s, file=sys.stderr)) -> list[dict]:
    """Samples as [{"text", "tokens"}] (tokens = prompt + generated ids) from a `jaxgpt.load`
    result, decoded as one batch of `num_samples`. The empty prompt is <|endoftext|> (or a
    newline for models without it); an instruction-tuned checkpoint's saved template wraps the
    prompt unless `raw`; a prompt longer than the context keeps its last block_size tokens.
    `stop`: cut each sample at <|endoftext|>. `grammar` (jaxgpt.decode.grammar.Grammar): every
    continuation follows it (lm.generate's constrained path). ConfigError for bad settings."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    tok, L = lm.tokenizer, lm.config.block_size
    if tok is None:
        raise ConfigError("this model has no known tokenizer, so it cannot sample from a text prompt")
    eot = getattr(tok, "eot_token", None)
    template = lm.meta.get("template")
    if prompt and template and not raw:
        # an instruction-tuned checkpoint (jaxgpt.sft): ask it the way it was trained
        prompt = render_prompt(template, [{"role": "user", "content": prompt}],
                               getattr(tok, "chat_template", None))
        log(f"(prompt wrapped in the model's {template} template; --raw to send it as is)")
    ids = tok.encode(prompt) if prompt else ([eot] if eot is not None else tok.encode("\n"))
    if len(ids) > L:
        log(f"warning: the prompt has {len(ids)} tokens, more than the context ({L}); "
            f"keeping its last {L}")
        ids = ids[-L:]
    stop = eot if stop else None
    batch = np.tile(np.asarray(ids, np.int32), (num_samples, 1))  # [N, T0]
    if grammar is not None:
        out = lm.generate(batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_at_eot=stop is not None, fast_decode=fast_decode, grammar=grammar)
    else:
        out = np.asarray(generate(lm.model, batch, max_new_tokens, key=jax.random.key(seed),
                                  temperature=temperature, top_k=top_k, top_p=top_p, eot=stop,
                                  use_cache=use_cache, fast_decode=fast_decode))
    samples = []
    for row in out:
        new = row[len(ids):].tolist()
        if stop is not None and stop in new:
            new = new[:new.index(stop)]  # cut at <|endoftext|> (it is not printed or returned)
        tokens = list(ids) + new
        samples.append({"text": tok.decode(tokens), "tokens": tokens})
    return samples
