"""Hyperparameters: the model's shape (GPTConfig) and a training run's settings (TrainConfig)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration mistake; CLIs print it as one line and exit 2."""


@dataclass(frozen=True)
class GPTConfig:
    """The architecture of a GPT-2 style decoder. Presets are classmethod constructors."""

    vocab_size: int = 50257  # GPT-2 BPE vocabulary (50,000 merges + 256 bytes + <|endoftext|>)
    block_size: int = 1024  # context length = number of learned positions (n_positions in HF)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"  # compute dtype of activations/matmuls; params always stay float32
    quant: str | None = None  # "int8": matmul kernels stored int8 + per-channel scales (inference)
    quant_embedding: bool = True  # with quant: the tied embedding wte is int8 too (per-row scales)
    remat: bool = False  # training: recompute each block's activations in the backward pass

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quant not in (None, "int8"):
            raise ConfigError(f"quant must be None or 'int8', got {self.quant!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def gpt2(cls, **kw) -> "GPTConfig":
        """GPT-2 small, 124M parameters."""
        return cls(**{**dict(n_layer=12, n_head=12, n_embd=768), **kw})

    @classmethod
    def gpt2_medium(cls, **kw) -> "GPTConfig":
        """GPT-2 medium, 350M parameters."""
        return cls(**{**dict(n_layer=24, n_head=16, n_embd=1024), **kw})

    @classmethod
    def gpt2_large(cls, **kw) -> "GPTConfig":
        """GPT-2 large, 774M parameters."""
        return cls(**{**dict(n_layer=36, n_head=20, n_embd=1280), **kw})

    @classmethod
    def gpt2_xl(cls, **kw) -> "GPTConfig":
        """GPT-2 XL, 1558M parameters."""
        return cls(**{**dict(n_layer=48, n_head=25, n_embd=1600), **kw})

    @classmethod
    def baby(cls, **kw) -> "GPTConfig":
        """nanoGPT's CPU "baby GPT": 4 layers, 4 heads, 128 wide, context 64 (char-level vocab)."""
        return cls(**{**dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), **kw})

    @classmethod
    def from_preset(cls, name: str, **kw) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return getattr(cls, PRESETS[name])(**kw)

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS = {
    "baby": "baby",
    "gpt2": "gpt2",
    "gpt2-medium": "gpt2_medium",
    "gpt2-large": "gpt2_large",
    "gpt2-xl": "gpt2_xl",
}


def default_data_path() -> str:
    """Tiny Shakespeare, shipped inside the package."""
    return str(resources.files("jaxgpt") / "assets" / "tinyshakespeare.txt")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; `python -m jaxgpt.train` flags map onto these 1:1.

    Defaults are nanoGPT's CPU recipe for the baby model on Tiny Shakespeare.
    """

    # data
    data: str = field(default_factory=default_data_path)
    tokenizer: str = "char"  # "char" or "gpt2"
    # model (None = take it from the preset)
    preset: str = "baby"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float = 0.0
    dtype: str = "float32"
    remat: bool = False  # activation rematerialisation per block: less memory, ~1/3 more compute
    init_from: str | None = None  # fine-tune: jaxgpt run dir, HF GPT-2 folder, hub name, nanoGPT ckpt.pt
    # optimisation
    batch_size: int = 12  # global batch, in sequences, per optimizer step
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    max_iters: int = 2000
    lr: float = 3e-3  # nanoGPT uses 1e-3; 3e-3 reaches a lower val loss in the same 2000 steps
    min_lr: float | None = None  # default lr/10, as nanoGPT
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # default max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    steps_per_call: int = 10  # optimizer steps fused into one jitted call (lax.scan)
    # devices and processes
    mesh: str = ""  # e.g. "data=2,fsdp=2"; empty: pure data parallel over every device
    coordinator: str | None = None  # HOST:PORT of process 0, or "auto" (TPU/SLURM detection)
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = 60  # seconds to wait for the coordinator
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 50  # nanoGPT's CPU recipe uses 20
    log_interval: int = 10
    sample_tokens: int = 200  # length of the text sample printed at each evaluation (0: none)
    out: str = "out"
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    deterministic: bool = True  # GPU: XLA's deterministic kernels (CPU is deterministic anyway)

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                    "log_interval", "ckpt_interval", "keep_checkpoints", "steps_per_call")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size ({self.batch_size}) must be divisible by --grad-accum ({self.grad_accum})"
            )
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_iters < 0:
            raise ConfigError(f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        if self.tokenizer not in ("char", "gpt2"):
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}; choose char or gpt2")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig this run trains: the preset, overridden by any explicit flags."""
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                     if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.preset, vocab_size=vocab_size, dropout=self.dropout,
                                     dtype=self.dtype, remat=self.remat, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def add_dataclass_flags(parser, cls, helps: dict[str, str], positional: tuple[str, ...] = ()) -> None:
    """One CLI flag per field of dataclass `cls`: --field-name, typed and defaulted from the field;
    bools become --x/--no-x; names in `positional` become optional positional arguments."""
    import argparse

    defaults = cls()
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        typ = types.get(str(f.type).split(" |")[0], str)
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", type=typ, default=default, help=helps[f.name])
        elif f.type in ("bool", bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=default, help=helps[f.name])
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default,
                                help=helps[f.name], metavar=f.name.upper())
