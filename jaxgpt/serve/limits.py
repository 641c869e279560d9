"""The server's per-request caps (a light module: the CLI reads their defaults for --help
without importing the engine)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # as the engine computes (jaxgpt.decode.steps.TOP_LOGPROBS)


@dataclass(frozen=True)
class Limits:
    """Per-request caps, each a `python -m jaxgpt.serve` flag (docs/serving.md); a request over
    one is a 400 naming the field."""

    max_choices: int = 128  # --max-choices: prompts x n
    max_prompt_tokens: int = 65536  # --max-prompt-tokens: summed over a request's prompts
    max_stops: int = MAX_STOP  # --max-stops: stop strings per request
    max_stop_chars: int = 1024  # --max-stop-chars: characters of one stop string
    max_logprobs: int = MAX_TOP_LOGPROBS  # --max-logprobs: logprobs / top_logprobs
    template_seconds: float = 2.0  # --template-timeout: a model's own Jinja chat template
    template_chars: int = 1 << 22  # its rendered prompt, in characters
