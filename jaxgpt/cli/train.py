"""`python -m jaxgpt.train`: flags -> TrainConfig -> jaxgpt.training.pretrain.train -> a closing line.

One flag per TrainConfig field (the optimization and run flags shared with jaxgpt.sft under
their own headings); bad input is one line on stderr and exit status 2 (jaxgpt.cli.run).
"""

import argparse
import signal
import sys

from jaxgpt.cli import run
from jaxgpt.cli.flags import MODEL_SOURCES
from jaxgpt.config import TrainConfig, add_dataclass_flags

HELP = {
    "data": "what to train on: a UTF-8 text file (tokenized into OUT/data, 90%% train / 10%% val), "
            "or token shards: a folder written by python -m jaxgpt.prepare, or a folder / glob of "
            "llm.c .bin shards (GPT-2 BPE); default: Tiny Shakespeare shipped with jaxgpt",
    "tokenizer": "for a text file: char (vocabulary built from the corpus), gpt2 (GPT-2 BPE, "
                 "50257 tokens) or a tokenizer folder (tokenizer.json, e.g. from python -m "
                 "jaxgpt.tokenizer train; the vocabulary size comes from it); shards carry their own",
    "val_tokens": "shards: evaluate the first N tokens of the val shard (as llm.c; at most one "
                  "val batch per training step between evaluations)",
    "preset": "model shape: baby (4L/4H/128, ctx 64), gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl; "
              "Llama blocks (RMSNorm, rotary, grouped-query attention, SwiGLU): baby-llama, smollm2-135m",
    "n_layer": "number of transformer blocks (overrides the preset)",
    "n_head": "attention heads per block (overrides the preset); must divide --n-embd",
    "n_embd": "width of the residual stream (overrides the preset)",
    "block_size": "context length in tokens (overrides the preset)",
    "dropout": "dropout rate for training (0 disables; always off at evaluation)",
    "remat": "activation rematerialisation: recompute each block's activations in the backward "
             "pass instead of storing them (less memory, about a third more compute)",
    "init_from": "fine-tune from this model instead of a random init: " + MODEL_SOURCES,
    "dtype": "compute dtype of activations and matmuls: float32, bfloat16 or float16 (params "
             "and optimizer state stay float32); default: bfloat16 on a GPU/TPU, float32 on a CPU",
    "batch_size": "global batch size in sequences per optimizer step (split over all devices)",
    "grad_accum": "gradient-accumulation micro-steps per optimizer step (divides --batch-size)",
    "max_iters": "number of optimizer steps",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine decay (default: lr/10)",
    "warmup_iters": "linear warmup steps from 0 to --lr",
    "lr_decay_iters": "step at which the cosine decay reaches --min-lr (default: --max-iters)",
    "weight_decay": "AdamW weight decay, applied to 2-D weights only (kernels, embeddings)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip gradients to this global norm (0 disables)",
    "seed": "seed of the initialisation, the data order and dropout",
    "steps_per_call": "optimizer steps fused into one jitted call (fewer host round trips; "
                      "logs, evals and checkpoints still land on their exact steps)",
    "mesh": "device mesh, e.g. data=2,fsdp=2 (fsdp shards params and optimizer state; "
            "default: all devices on data)",
    "coordinator": "HOST:PORT of process 0 for a multi-process run (jax.distributed), or auto to "
                   "detect a TPU pod / SLURM job",
    "num_processes": "number of processes of a multi-process run",
    "process_id": "index of this process (0 = the one that writes logs)",
    "init_timeout": "seconds to wait for the coordinator before giving up",
    "eval_interval": "evaluate the val loss (and print a sample) every N steps",
    "eval_iters": "number of fixed val batches per evaluation (at most one per training step "
                  "between evaluations: min(--eval-iters, --eval-interval, --max-iters))",
    "log_interval": "write a metrics row every N steps",
    "hellaswag": "a HellaSwag file (the official jsonl) to score during training: logs "
                 "hellaswag_acc_norm (and acc) to metrics.jsonl (needs the GPT-2 tokenizer)",
    "hellaswag_interval": "score --hellaswag every N steps (and at the end)",
    "sample_tokens": "tokens in the sample printed at each evaluation (0: no samples)",
    "out": "output directory (checkpoints, metrics.jsonl, loss.png, config.json, data cache)",
    "ckpt_interval": "save a checkpoint every N steps (and at the end, and on SIGTERM/SIGINT)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "resume": "continue the run in --out from its newest intact checkpoint (the same flags "
              "required, except where the run lives and the cadence/device flags)",
    "tensorboard": "also write the metrics rows as TensorBoard event files into this folder "
                   "(needs tensorboardX: pip install 'jaxgpt[tracking]')",
    "wandb": "also log the metrics rows to this Weights & Biases project (needs wandb: "
             "pip install 'jaxgpt[tracking]'; WANDB_MODE=offline works without an account)",
    "progress": "show a progress bar (--no-progress to hide it)",
    "deterministic": "GPU: XLA's deterministic kernels, so the same seed gives the same losses "
                     "bit for bit (off by default: about 2x slower on an H200, with cuDNN's fused "
                     "attention off; experiments/gpu_h200.md). CPU runs are deterministic either way",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, named --field-name, defaulting to the dataclass default."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.train",
        description="Train a GPT from scratch. With no flags: the baby model, char-level, on Tiny "
                    "Shakespeare (nanoGPT's CPU recipe), writing to out/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(p, TrainConfig, HELP)
    return p


def parse_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def _main(argv) -> int:
    from jaxgpt import parallel, runtime
    from jaxgpt.training import trainer
    from jaxgpt.training.pretrain import train

    cfg = parse_args(argv)
    if cfg.deterministic:  # before JAX starts its backends
        parallel.deterministic_gpu_ops()
    runtime.enable_compilation_cache()
    summary = train(cfg)
    if summary["stopped_by"]:
        return 128 + signal.Signals[summary["stopped_by"]].value
    if not parallel.is_main():
        return 0
    print(f"done: {summary['step']} steps, val loss {summary['val_loss']:.4f}, "
          f"{summary['ms_per_iter']:.1f} ms/iter, {summary['wall_s']:.1f} s "
          f"({trainer.time_split(summary)}), outputs in {cfg.out}/", file=sys.stderr)
    if summary["sample"]:  # the final evaluation's sample (not generated a second time)
        print(summary["sample"])
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    from jaxgpt.runtime import reexec_with_malloc_tunables

    reexec_with_malloc_tunables(["-m", "jaxgpt.train", *sys.argv[1:]])
    sys.exit(main())
