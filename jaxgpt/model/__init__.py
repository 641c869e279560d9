"""The model: GPTConfig's architecture built as Flax NNX modules (gpt), int8 layers (quant), LoRA adapters (lora)."""
