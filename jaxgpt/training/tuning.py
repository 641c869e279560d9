"""What every fine-tuning run shares (SFT, DPO, GRPO): the base model, the LoRA settings and the
adapter written at the end, the output-folder policy, and the model made trainable (full or LoRA).

`TuningConfig` holds the fields and checks the three configs have in common; each run's own
config (SFTConfig, DPOConfig, GRPOConfig) adds its data and loss settings and its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx

from jaxgpt import files
from jaxgpt.config import ConfigError, OptimConfig, RunConfig
from jaxgpt.data.records import check_tokenizer
from jaxgpt.formats import checkpoint
from jaxgpt.model import lora
from jaxgpt.tokenizers import templates


@dataclass(frozen=True)
class TuningConfig(OptimConfig, RunConfig):
    """The settings every fine-tuning run has: its base, template, LoRA and --force."""

    ckpt: str | None = None  # base model: jaxgpt run dir, HF folder, GGUF, hub name, nanoGPT ckpt.pt
    template: str | None = None  # chat records: None = the model's (templates.default_template)
    lora_rank: int | None = None  # None: every weight trains
    lora_alpha: float = 16.0
    lora_targets: str = "c_attn,c_proj,c_fc"
    force: bool = False
    # fine-tuning defaults of the shared fields (TRL's for preference tuning and RL: no warmup,
    # no weight decay); each run sets its own batch size and intervals
    out: str | None = None
    seed: int = 123
    max_iters: int | None = None
    lr: float | None = None  # default: each run's peak_lr
    warmup_iters: int = 0
    weight_decay: float = 0.0
    beta2: float = 0.999
    log_interval: int = 1
    steps_per_call: int = 1

    USAGE = "python -m jaxgpt.sft CKPT --data FILE --out DIR"  # (each run's own, for the missing-base error)

    def __post_init__(self):
        super().__post_init__()
        if self.template is not None:
            templates.check_template(self.template)
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1 (leave it out to train every weight), got {self.lora_rank}")

    def check_base(self) -> None:
        if not self.ckpt:
            raise ConfigError(f"name the base model: {self.USAGE}")

    def adapter_meta(self, model_config: dict, template: str, **run) -> dict:
        """What an adapter folder records: its base (absolute when local), rank, alpha, targets,
        template, the base's config, and the run's own entries (`sft=`, `dpo=`, `grpo=`)."""
        return {"template": template, "base": portable(self.ckpt), "rank": self.lora_rank,
                "alpha": self.lora_alpha, "targets": lora.parse_targets(self.lora_targets),
                "model_config": model_config, **run}


def load_base(cfg: TuningConfig):
    """The base model (float32 weights; int8 refused) with the compute dtype of the run."""
    from jaxgpt.formats.load import load
    from jaxgpt.model.gpt import rebuilt

    cfg.check_base()
    lm = load(cfg.ckpt)
    check_tokenizer(lm.tokenizer)
    lm.model = rebuilt(lm.model, lm.config.for_run(cfg))  # the run's compute dtype / dropout / remat
    return lm


def prepare_out(cfg: TuningConfig) -> None:
    """Refuse an --out that holds something (unless --resume, or --force replaces it)."""
    if not cfg.resume:
        ran = Path(cfg.out).is_dir() and checkpoint.latest_step(cfg.out) is not None
        files.check_writable(cfg.out, cfg.force, " (a training run: continue it with --resume)" if ran else "")


def trainable_model(cfg: TuningConfig, base_model, log):
    """(model to train, the nnx filter of its trainable params, LoRA layer names, trainable and
    total parameter counts)."""
    model = nnx.clone(base_model)
    adapted = []
    if cfg.lora_rank:
        adapted = lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    wrt = nnx.LoRAParam if cfg.lora_rank else nnx.Param
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))
    n_total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"trainable params: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)"
        + (f"; LoRA rank {cfg.lora_rank} on {len(adapted)} layers" if adapted else ""))
    return model, wrt, adapted, n_train, n_total


def portable(ckpt: str) -> str:
    """A local base path recorded absolute (so the adapter loads from anywhere); hub names as is."""
    p = Path(ckpt).expanduser()
    return str(p.resolve()) if p.exists() else ckpt


def merge_adapter(adapter: str, out: str, base: str | None = None, force: bool = False) -> Path:
    """Fold a LoRA adapter into its base and save a plain jaxgpt checkpoint at `out`."""
    from jaxgpt.formats.load import load

    meta = lora.read_adapter_meta(adapter)
    files.check_writable(out, force)
    lm = load(base or meta["base"])
    lora.load_adapter(adapter, lm.model)
    merged = lora.merge(lm.model)
    extra = {"template": meta.get("template") or templates.default_template(lm), "source": f"{adapter} merged into {base or meta['base']}",
             "sft": meta.get("sft", {})}
    tok = lm.tokenizer.to_dict() if lm.tokenizer is not None else None
    return checkpoint.save_model(out, merged, tok, extra, force=force)
