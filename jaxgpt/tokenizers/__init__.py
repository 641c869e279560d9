"""Tokenizers (char, GPT-2 via tiktoken, HF byte-level BPE) and chat templates."""
