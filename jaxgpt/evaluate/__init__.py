"""Evaluation: the one scorer of continuations, perplexity, HellaSwag."""
