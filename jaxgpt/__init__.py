"""jaxgpt: GPT-2 in JAX/Flax NNX — train from scratch, sample, and load checkpoints."""

from jaxgpt.config import ConfigError, GPTConfig, TrainConfig

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ConfigError", "count_params", "init_cache",
           "generate", "get_tokenizer", "train", "load", "LoadedModel"]
__version__ = "0.1.0"


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Train as `python -m jaxgpt.train` does: `jaxgpt.train(TrainConfig(...))` or keyword flags."""
    from jaxgpt.train import train as _train

    config = config or TrainConfig()
    if overrides:
        import dataclasses
        config = dataclasses.replace(config, **overrides)
    return _train(config)


def __getattr__(name):
    # PEP 562 lazy attributes, for two reasons only (no import cycle needs them): `import jaxgpt`
    # stays light (the model with jax and flax, the decoder and the loaders with orbax and the
    # converters load on first use, so a CLI re-executing itself imports them once), and `python -m jaxgpt.<module>` does not find its module imported already by the
    # package (runpy would warn, and the module would run twice).
    if name in ("GPT", "count_params", "init_cache"):  # jax + flax: ~1 s to import
        from jaxgpt import model
        return getattr(model, name)
    if name == "get_tokenizer":
        from jaxgpt.tokenizer import get_tokenizer
        return get_tokenizer
    if name == "generate":
        from jaxgpt.engine import generate
        return generate
    if name in ("load", "LoadedModel"):
        from jaxgpt import api
        return getattr(api, name)
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
