"""Hyperparameters: the model's shape (GPTConfig) and a training run's settings (TrainConfig)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration mistake; CLIs print it as one line and exit 2."""


# The MLP activations jaxgpt implements, by Hugging Face's names (transformers.activations.ACT2FN);
# jaxgpt.model.gpt.ACTIVATION_FNS holds their definitions.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate", "gelu",
               "gelu_python", "gelu_fast", "gelu_10", "quick_gelu", "relu", "relu2", "relu6",
               "silu", "swish", "mish", "tanh", "sigmoid", "linear")


# Upper bounds on a model's dimensions, far beyond every released model (Llama 3.1 405B: 126
# layers, 16,384 wide, MLP 53,248; vocabularies up to ~256K; contexts up to ~10M), so that a
# corrupt or hostile config is refused in microseconds instead of hanging in building its shape.
SHAPE_LIMITS = {"vocab_size": 1 << 24, "block_size": 1 << 24, "n_layer": 4096, "n_head": 1 << 14,
                "n_embd": 1 << 17, "n_inner": 1 << 20}


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
    # with quant: how int8 layers multiply (jaxgpt.model.quant.int8_matmul): "auto" (int8 x int8 with
    # activations quantized per row from a few rows on, weight-only below), "int8", "float"
    # (weight-only always) or "int8x2" (two-part int8 activations, two exact int8 dots; weight-only
    # for one row and prompts). quantize_model picks "int8x2" for the Llama family: SmolLM2's
    # activations lose too much in one pass (KL 0.11 vs 0.008 for both others; PERF.md "SmolLM2")
    quant_activations: str = "auto"
    remat: bool = False  # training: recompute each block's activations in the backward pass
    # Hugging Face GPT2Config fields that change the math (defaults: the original GPT-2)
    activation_function: str = "gelu_new"  # the MLP nonlinearity, by HF's name (ACTIVATIONS)
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also / (layer index + 1)
    reorder_and_upcast_attn: bool = False  # scores and softmax in float32 (a precision option)
    tie_word_embeddings: bool = True  # head = wte; False: a separate lm_head [C, V], no bias
    # The Llama family (SmolLM2, Llama, ...) in the same blocks (defaults: GPT-2). GPTConfig.llama
    # sets them all: grouped-query attention, RMSNorm, rotary positions, a gated (SwiGLU) MLP,
    # no biases. c_attn still holds q | k | v and c_fc gate | up, fused as GPT-2 fuses them.
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    norm: str = "layernorm"  # "rmsnorm": x / rms(x) * scale, eps = layer_norm_epsilon
    position: str = "learned"  # "rope": rotary embeddings on q and k (no wpe table)
    rope_theta: float = 10000.0  # the rotary base
    rope_scaling: str | None = None  # None, "linear" or "llama3" (HF's rope_scaling rope_type)
    rope_factor: float = 1.0  # linear / llama3: how much longer than the original context
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings
    gated_mlp: bool = False  # MLP = c_proj(act(gate) * up), c_fc = [gate | up] (SwiGLU with silu)
    bias: bool = True  # biases on the Linear layers (Llama has none)

    def __post_init__(self):
        for name, limit in SHAPE_LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "n_inner":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > limit:
                raise ConfigError(f"{name}={value} is beyond any real model's (at most {limit})")
        for name in ("layer_norm_epsilon", "rope_theta", "rope_factor"):
            if (isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Real)
                    or not 0 <= getattr(self, name) < float("inf")):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
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
        if self.quant_activations not in ("auto", "int8", "float", "int8x2"):
            raise ConfigError(f"quant_activations must be auto, int8, float or int8x2, "
                              f"got {self.quant_activations!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"activation_function={self.activation_function!r} is not supported; "
                              f"choose one of: {', '.join(ACTIVATIONS)}")
        if self.n_kv_head is not None and (isinstance(self.n_kv_head, bool)
                                           or not isinstance(self.n_kv_head, numbers.Integral)
                                           or self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must be >= 1 and divide n_head ({self.n_head})")
        choices = {"norm": ("layernorm", "rmsnorm"), "position": ("learned", "rope"),
                   "rope_scaling": (None, "linear", "llama3")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, "
                                  f"got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_dim}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "reorder_and_upcast_attn", "tie_word_embeddings", "gated_mlp", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head (GPT-2's multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def family(self) -> str:
        """"gpt2", "llama" (every Llama knob set, GPTConfig.llama) or "custom" (a mix): what
        a checkpoint is exported as (jaxgpt.convert)."""
        if self.position == "learned" and self.norm == "layernorm" and not self.gated_mlp:
            return "gpt2"
        if self.position == "rope" and self.norm == "rmsnorm" and self.gated_mlp and not self.bias:
            return "llama"
        return "custom"

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width: n_inner, or GPT-2's 4 * n_embd."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

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
    def llama(cls, **kw) -> "GPTConfig":
        """A Llama-family decoder: RMSNorm, rotary positions, SwiGLU, no biases (the shape from kw)."""
        return cls(**{**dict(norm="rmsnorm", position="rope", gated_mlp=True, bias=False,
                             activation_function="silu"), **kw})

    @classmethod
    def baby_llama(cls, **kw) -> "GPTConfig":
        """The baby GPT's size in Llama blocks (GPTConfig.llama): 4 layers, 4 heads sharing 2
        key/value heads, 128 wide, SwiGLU 352, rotary positions, context 64."""
        return cls.llama(**{**dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, n_inner=352,
                                   block_size=64, vocab_size=65), **kw})

    @classmethod
    def smollm2_135m(cls, **kw) -> "GPTConfig":
        """SmolLM2-135M (HuggingFaceTB): 30 layers, 9 heads / 3 key-value heads, 576 wide, 49,152
        tokens, tied embeddings; the shape of the model `jaxgpt.load("smollm2")` loads."""
        return cls.llama(**{**dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9,
                                   n_kv_head=3, n_embd=576, n_inner=1536, rope_theta=100000.0), **kw})

    @classmethod
    def from_preset(cls, name: str, **kw) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return getattr(cls, PRESETS[name])(**kw)

    def for_run(self, run) -> "GPTConfig":
        """This architecture with a run's compute settings (`run.compute_dtype`, `dropout`,
        `remat`): the one place a training run's model is configured (pretrain, sft, ...)."""
        return dataclasses.replace(self, dtype=run.compute_dtype, dropout=run.dropout, remat=run.remat)

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
    "baby-llama": "baby_llama",
    "smollm2-135m": "smollm2_135m",
}


@dataclass(frozen=True)
class OptimConfig:
    """The optimization of a run, shared by pretraining and fine-tuning: the global batch and its
    accumulation, AdamW, the warmup + cosine schedule, clipping, the seed (jaxgpt.optim)."""

    batch_size: int = 12  # global batch, in sequences, per optimizer step
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    max_iters: int | None = 2000  # optimizer steps (SFT: None = --epochs over the train split)
    lr: float | None = 3e-3  # peak; nanoGPT uses 1e-3, 3e-3 reaches a lower val loss in 2000 steps
    min_lr: float | None = None  # default lr/10, as nanoGPT
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # default: the last step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337

    MIN_ITERS = 1  # DPO allows 0: --max-iters 0 only evaluates

    def __post_init__(self):
        for name in ("batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters < self.MIN_ITERS:
            raise ConfigError(f"--max-iters must be >= {self.MIN_ITERS}, got {self.max_iters}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"--batch-size ({self.batch_size}) must be divisible by --grad-accum ({self.grad_accum})"
            )
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_iters < 0:
            raise ConfigError(f"--warmup-iters must be >= 0, got {self.warmup_iters}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("--grad-clip and --weight-decay must be >= 0")
        super_post = getattr(super(), "__post_init__", None)
        if super_post:
            super_post()

    @property
    def peak_lr(self) -> float:
        return self.lr


@dataclass(frozen=True)
class RunConfig:
    """How a run executes, shared by pretraining and fine-tuning: compute dtype, dropout and
    remat, K steps per call, the device mesh and processes, the eval / log / checkpoint cadence,
    the output folder and resuming (jaxgpt.trainer)."""

    out: str | None = "out"
    dtype: str | None = None  # compute dtype; None: bfloat16 on GPU/TPU, float32 on CPU
    dropout: float = 0.0
    remat: bool = False  # activation rematerialisation per block: less memory, ~1/3 more compute
    steps_per_call: int = 10  # optimizer steps fused into one jitted call (lax.scan)
    mesh: str = ""  # e.g. "data=2,fsdp=2"; empty: pure data parallel over every device
    coordinator: str | None = None  # HOST:PORT of process 0, or "auto" (TPU/SLURM detection)
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = 60  # seconds to wait for the coordinator
    eval_interval: int = 250
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    deterministic: bool = False  # GPU: XLA's deterministic kernels (CPU is deterministic anyway)
    tensorboard: str | None = None  # also log metrics rows to TensorBoard event files here
    wandb: str | None = None  # also log metrics rows to this Weights & Biases project

    # fields that do not change what a run computes: a resumed run may change them (and `out`:
    # a run folder may be moved or copied and resumed where it now is)
    RESUMABLE = ("out", "resume", "progress", "remat", "log_interval", "eval_interval", "mesh",
                 "coordinator", "num_processes", "process_id", "init_timeout", "ckpt_interval",
                 "keep_checkpoints", "deterministic", "tensorboard", "wandb")

    def __post_init__(self):
        for name in ("eval_interval", "log_interval", "ckpt_interval", "keep_checkpoints",
                     "steps_per_call", "init_timeout"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def compute_dtype(self) -> str:
        """--dtype, or by default bfloat16 on an accelerator and float32 on a CPU (where bf16
        matmuls are slower; params and optimizer state are float32 either way). Asking starts
        JAX's backends: a multi-process run asks only after joining jax.distributed."""
        if self.dtype is not None:
            return self.dtype
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def resume_diff(self, saved: dict[str, Any]) -> list[str]:
        """Flags (as --names) whose value differs from a saved run's and that change the math."""
        now = self.to_dict()
        return [f"--{k.replace('_', '-')} {saved.get(k)!r} (saved) vs {now[k]!r}"
                for k in now if k not in self.RESUMABLE and saved.get(k) != now[k]]


def default_data_path() -> str:
    """Tiny Shakespeare, shipped inside the package."""
    return str(resources.files("jaxgpt") / "assets" / "tinyshakespeare.txt")


@dataclass(frozen=True)
class TrainConfig(OptimConfig, RunConfig):
    """Every setting of a pretraining run: the data and the model here, the optimization and the
    run from OptimConfig / RunConfig; `python -m jaxgpt.train` flags map onto these 1:1.

    Defaults are nanoGPT's CPU recipe for the baby model on Tiny Shakespeare.
    """

    # data
    data: str = field(default_factory=default_data_path)  # a text file, or token shards (a folder/glob)
    tokenizer: str = "char"  # "char", "gpt2" or a tokenizer folder (text files; shards say their own)
    val_tokens: int = 10_485_760  # shards: the val prefix evaluated (llm.c's default)
    # model (None = take it from the preset)
    preset: str = "baby"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    init_from: str | None = None  # fine-tune: jaxgpt run dir, HF GPT-2 folder, hub name, nanoGPT ckpt.pt
    # evaluation and samples
    eval_iters: int = 20  # val batches per evaluation (as nanoGPT's CPU recipe)
    sample_tokens: int = 200  # length of the text sample printed at each evaluation (0: none)
    hellaswag: str | None = None  # a HellaSwag jsonl scored during training (jaxgpt.hellaswag)
    hellaswag_interval: int = 250

    RESUMABLE = RunConfig.RESUMABLE + ("eval_iters", "sample_tokens", "hellaswag", "hellaswag_interval")

    def __post_init__(self):
        super().__post_init__()
        if self.max_iters is None:
            raise ConfigError("--max-iters is required")
        if self.lr is None:
            raise ConfigError("--lr is required")
        if self.hellaswag_interval < 1:
            raise ConfigError(f"--hellaswag-interval must be >= 1, got {self.hellaswag_interval}")
        if self.val_tokens < 1:
            raise ConfigError(f"--val-tokens must be >= 1, got {self.val_tokens}")
        if self.eval_iters < 1:
            raise ConfigError(f"--eval-iters must be >= 1, got {self.eval_iters}")
        if self.tokenizer not in ("char", "gpt2") and not os.path.isdir(self.tokenizer):
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}; choose char, gpt2 or a "
                              "tokenizer folder (tokenizer.json, e.g. from python -m "
                              "jaxgpt.tokenizer train)")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")

    def model_config(self, vocab_size: int, dtype: str | None = None) -> GPTConfig:
        """The GPTConfig this run trains: the preset, overridden by any explicit flags. `dtype`
        overrides the compute dtype (a shape check passes one, so that nothing asks JAX for its
        backend before a multi-process run has joined jax.distributed)."""
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                     if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.preset, vocab_size=vocab_size, dropout=self.dropout,
                                     dtype=dtype or self.compute_dtype, remat=self.remat, **overrides)


def add_dataclass_flags(parser, cls, helps: dict[str, str], positional: tuple[str, ...] = ()) -> None:
    """One CLI flag per field of dataclass `cls`: --field-name, typed and defaulted from the field;
    bools become --x/--no-x; names in `positional` become optional positional arguments. Fields
    inherited from OptimConfig / RunConfig are listed under their own headings in --help."""
    import argparse

    defaults = cls()
    types = {"int": int, "float": float, "str": str}
    groups = {OptimConfig: parser.add_argument_group("optimization"),
              RunConfig: parser.add_argument_group("devices, evaluation, checkpoints")}
    shared = {f.name: groups[base] for base in groups if issubclass(cls, base)
              for f in dataclasses.fields(base)}
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        typ = types.get(str(f.type).split(" |")[0], str)
        where = shared.get(f.name, parser)
        if f.name in positional:
            where.add_argument(f.name, nargs="?", type=typ, default=default, help=helps[f.name])
        elif f.type in ("bool", bool):
            where.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                               default=default, help=helps[f.name])
        else:
            where.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default,
                               help=helps[f.name], metavar=f.name.upper())
