"""The sampling settings a request gets for the fields it leaves out: temperature, top_p, top_k,
max_tokens.

Each comes from the first of, in order (vLLM's `--generation-config auto` and llama.cpp's
GGUF `general.sampling.*` keys work the same way):

1. the server's flag, when it was given (`--temperature`, `--top-p`, `--top-k`, `--max-tokens`);
2. the model: a `generation_config.json` beside its weights (Hugging Face's `temperature`,
   `top_p`, `top_k`, `max_new_tokens`), the `general.sampling.temp` / `top_p` / `top_k` keys of a
   GGUF file, else the setting measured for a packaged model (MEASURED);
3. BUILTIN: measured to keep a small instruct model coherent (SmolLM2-135M-Instruct; the
   numbers are in docs/serving.md, from experiments/sampling_defaults.py).

`resolve` returns them as a `SamplingDefaults`, with where each came from (shown by /v1/models
and /props and logged at start).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jaxgpt.config import ConfigError

FIELDS = ("temperature", "top_p", "top_k", "max_tokens")
# experiments/sampling_defaults.py on SmolLM2-135M-Instruct (6 questions x 3 seeds, <= 96 tokens):
# right and ended T=1 10/18 (median reply 68 tokens), T=0.8 top-p 0.95 top-k 40 12/18 (47),
# T=0.2 top-p 0.9 (its model card's) 11/18 (48), greedy 3/6: within this noise the card's setting
# is as good as any and stays short; max_tokens bounds the replies that never end
# (docs/serving.md "Sampling defaults")
BUILTIN = {"temperature": 0.2, "top_p": 0.9, "top_k": None, "max_tokens": 1024}
MEASURED = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}  # packaged models (jaxgpt.formats.load.PACKAGED_MODELS)
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k"}
HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_new_tokens": "max_tokens"}


@dataclass
class SamplingDefaults:
    """The settings of a request's missing fields (None: off / as long as the context allows)
    and, per field, where the value came from."""

    temperature: float = BUILTIN["temperature"]
    top_p: float | None = BUILTIN["top_p"]
    top_k: int | None = BUILTIN["top_k"]
    max_tokens: int | None = BUILTIN["max_tokens"]
    source: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check(values: dict, where: str) -> dict:
    """`values` (a subset of FIELDS) as numbers, or a ConfigError naming `where`."""
    out = {}
    for name, v in values.items():
        if v is None:
            out[name] = None
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, got {v!r}")
        if name == "temperature" and not v >= 0:
            raise ConfigError(f"{where}: temperature must be >= 0, got {v}")
        if name == "top_p" and not 0 < v <= 1:
            raise ConfigError(f"{where}: top_p must be in (0, 1], got {v}")
        if name in ("top_k", "max_tokens"):
            if v != int(v) or v < 0:
                raise ConfigError(f"{where}: {name} must be a whole number >= 0, got {v}")
            v = int(v) or None  # 0: off (top_k) / the context (max_tokens)
        out[name] = float(v) if name in ("temperature", "top_p") else v
    if out.get("top_p") == 1.0:
        out["top_p"] = None
    return out


def model_defaults(ckpt: str) -> tuple[dict, str | None]:
    """(the settings the model at `ckpt` (anything jaxgpt.load takes) carries, where from): a
    generation_config.json in its folder, the sampling keys of a GGUF file, or MEASURED."""
    from jaxgpt.formats.load import PACKAGED_MODELS, packaged_model

    p = Path(str(ckpt)).expanduser()
    packaged = str(ckpt) in PACKAGED_MODELS and not p.exists()
    if packaged:
        p = packaged_model(str(ckpt))
    if p.is_file() and p.suffix == ".gguf":
        from jaxgpt.formats.gguf import read_gguf

        meta = read_gguf(p).metadata
        found = {GGUF_KEYS[k]: meta[k] for k in GGUF_KEYS if k in meta}
        if found:
            return check(found, f"{p} (general.sampling)"), f"{p.name} (general.sampling)"
    folder = p if p.is_dir() else p.parent
    for where in (folder / "generation_config.json", folder.parent / "generation_config.json"):
        if where.is_file():
            try:
                cfg = json.loads(where.read_text())
            except ValueError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
            found = {HF_KEYS[k]: cfg[k] for k in HF_KEYS if isinstance(cfg, dict) and k in cfg}
            if found:
                return check(found, str(where)), str(where)
    if packaged and str(ckpt) in MEASURED:
        return dict(MEASURED[str(ckpt)]), f"measured for {ckpt} (experiments/sampling_defaults.py)"
    return {}, None


def resolve(flags: dict, model: dict, model_source: str | None = None) -> SamplingDefaults:
    """The defaults: each field from `flags` (the server's, None = not given), else `model`,
    else BUILTIN."""
    flags = check({k: v for k, v in flags.items() if v is not None}, "the server's flags")
    out = SamplingDefaults()
    for name in FIELDS:
        if name in flags:
            value, src = flags[name], "flag"
        elif name in model:
            value, src = model[name], model_source or "model"
        else:
            value, src = BUILTIN[name], "built-in"
        setattr(out, name, value)
        out.source[name] = src
    return out
