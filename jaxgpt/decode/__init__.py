"""Decoding: the one Engine (sampling, prefill, decode steps, slots, the fused generate), text samples and chat sessions on top of it."""
