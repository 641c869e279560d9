"""Model files: jaxgpt.load, orbax checkpoints, Hugging Face / GGUF / nanoGPT conversion, int8 copies on disk."""
