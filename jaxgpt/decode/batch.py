"""Many requests through the one Engine: the offline counterpart of the server's scheduler.

`run_requests(engine, requests)` keeps the engine's slots full: requests wait in order, each
takes a slot as one frees, every step advances all rows at once (continuous batching), and
`on_done(i, request)` is called as request i ends. The harness's `generate_until`, SFT's
before/after answers and other offline uses decode through it; the server's
jaxgpt.serve.scheduler is the same loop on a thread fed by HTTP requests.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

from jaxgpt.decode.engine import Engine, Request


def run_requests(engine: Engine, requests: Sequence[Request],
                 on_done: Callable[[int, Request], None] | None = None) -> list[Request]:
    """Decode every request (in order of arrival into free slots) until all have ended; returns
    them, each with its `tokens` and `finish_reason`."""
    waiting = deque(enumerate(requests))
    live: dict[int, Request] = {}

    def reap():
        for i in [i for i, r in live.items() if r.done]:
            r = live.pop(i)
            if on_done is not None:
                on_done(i, r)

    while waiting or engine.busy:
        while waiting and engine.free_slots:
            i, r = waiting.popleft()
            engine.add(r)
            live[i] = r
        reap()  # (a request for 0 tokens ends in add)
        if engine.busy:
            engine.step()
        reap()
    reap()
    return list(requests)
