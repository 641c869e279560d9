"""`python -m jaxgpt.grpo`: flags -> GRPOConfig -> jaxgpt.training.grpo.run_grpo -> a closing line. Bad input
(records, reward functions) is one line and exit status 2 (jaxgpt.cli.run)."""

import argparse
import sys

from jaxgpt.cli import run
from jaxgpt.cli.flags import MODEL_SOURCES, start_run, early_status, tuning_parser
from jaxgpt.cli.sft import HELP as SFT_HELP
from jaxgpt.training.grpo import LOSS_TYPES, GRPOConfig, run_grpo

HELP = {**SFT_HELP,
        "ckpt": "the base model: " + MODEL_SOURCES,
        "prompts": "training prompts, a JSON list or JSONL of {prompt, ...}: prompt is text or chat "
                   "messages (rendered with --template); every other field is passed to the reward "
                   "functions by name, one value per completion (TRL's convention)",
        "reward": "reward functions MODULE:FUNCTION (a module on the path or a file.py), "
                  "comma-separated; each f(prompts, completions, completion_ids, **columns) -> "
                  "list of floats (None: not applicable)",
        "reward_weights": "comma-separated weights of the reward functions (default: all 1)",
        "eval_prompts": "held-out prompts: greedy completions scored at step 0, every "
                        "--eval-interval and at the end (eval_reward rows; eval_completions.jsonl)",
        "group_size": "completions sampled per prompt (G); advantages are relative to the group",
        "max_new_tokens": "longest completion in tokens",
        "temperature": "sampling temperature of the rollouts (the log-probs use logits / temperature)",
        "top_p": "nucleus sampling of the rollouts (default: off)",
        "top_k": "top-k sampling of the rollouts (default: off)",
        "epsilon": "clip range of the policy ratio: [1 - epsilon, 1 + epsilon-high]",
        "epsilon_high": "upper clip (default: --epsilon)",
        "beta": "weight of the KL to the reference (TRL's k3 estimator); 0 loads no reference",
        "kl_correction": "multiply the KL term by the policy ratio (TRL's use_bias_correction_kl, "
                         "its default): the unbiased reverse-KL gradient",
        "loss_type": f"aggregation of the token losses, TRL's names: {', '.join(LOSS_TYPES)}",
        "scale_rewards": "group: divide advantages by the group's std (+1e-4); none: do not",
        "batch_size": "prompts per optimizer step (each sampled --group-size times)",
        "max_iters": "optimizer steps",
        "lr": "peak learning rate (default: 1e-6 full, 1e-5 LoRA)",
        "seed": "seed of the prompt order, the rollouts (one stream per row) and the LoRA init",
        "template": "chat template for chat prompts (default: the model's own, else alpaca)",
        "out": "output folder: checkpoints/ (the trained model of a full run), the LoRA adapter, "
               "metrics.jsonl (TRL's metric names), loss.png, eval_completions.jsonl, summary.json",
        "resume": "continue the GRPO run in --out from its newest intact checkpoint (same flags)",
        "force": "replace a non-empty --out",
        "log_interval": "write a training metrics row every N steps",
        "eval_interval": "score --eval-prompts every N steps",
        "steps_per_call": "must be 1: every step samples with the weights the last step left"}


def build_parser() -> argparse.ArgumentParser:
    import jaxgpt.training.grpo

    return tuning_parser("python -m jaxgpt.grpo", jaxgpt.training.grpo.__doc__, GRPOConfig, HELP)


def _main(argv) -> int:
    
    cfg = GRPOConfig(**vars(build_parser().parse_args(argv)))
    start_run(cfg)
    s = run_grpo(cfg)
    if (status := early_status(s)) is not None:
        return status
    if s["before"] is not None:
        print(f"held-out reward {s['before']['eval_reward']:.4f} -> {s['after']['eval_reward']:.4f}",
              file=sys.stderr)
    tps = s["rollout_tokens"] / max(s["rollout_seconds"], 1e-9)
    print(f"done: {s['steps']} steps; rollouts {s['rollout_tokens']} tokens at {tps:.1f} tokens/s; "
          f"metrics in {cfg.out}/metrics.jsonl", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
