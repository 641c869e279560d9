"""The server's counters, gauges and histograms, written as Prometheus text for `GET /metrics`.

No client library: a few thread-safe numbers (the scheduler thread updates them, the event loop
reads them) and the text exposition format (`# HELP`, `# TYPE`, `name{labels} value`, histogram
`_bucket{le=...}` / `_sum` / `_count`).
"""

from __future__ import annotations

import bisect
import threading

# latency buckets in seconds: 1 ms .. 60 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "jaxgpt_"


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: bucket le=x counts values <= x)."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            total += c
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports. `inc`, `set` and `observe` may be called from any thread."""

    COUNTERS = {
        "requests_total": "HTTP generation requests accepted (completions and chat)",
        "requests_rejected_total": "generation requests refused with 429 (queue full)",
        "requests_cancelled_total": "generation requests cancelled (client disconnected or stopped)",
        "requests_finished_total": "sequences (choices) finished, by finish_reason",
        "prompt_tokens_total": "prompt tokens prefilled",
        "generation_tokens_total": "tokens generated",
        "engine_steps_total": "decode engine iterations (one token for every active slot)",
        "bad_requests_total": "requests answered with a 4xx error",
    }
    GAUGES = {
        "requests_running": "sequences decoding in an engine slot now",
        "requests_waiting": "sequences waiting for a free slot",
        "slots_total": "engine slots (--max-batch)",
        "slots_free": "engine slots free now",
    }
    HISTOGRAMS = {
        "time_to_first_token_seconds": "from a request's arrival to its first generated token",
        "inter_token_latency_seconds": "between consecutive tokens of one sequence",
        "engine_step_seconds": "one engine iteration (prefill of joining rows + one decode step)",
        "request_duration_seconds": "from a request's arrival to its last token",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges = {name: 0.0 for name in self.GAUGES}
        self.histograms = {name: Histogram() for name in self.HISTOGRAMS}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        assert name in self.COUNTERS, name
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def set(self, name: str, value: float) -> None:
        assert name in self.GAUGES, name
        with self._lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def value(self, name: str, **labels) -> float:
        """A counter's value (summed over labels not given) or a gauge's; for tests and /health."""
        with self._lock:
            if name in self.gauges:
                return self.gauges[name]
            want = set(labels.items())
            return sum(v for (n, lab), v in self.counters.items() if n == name and want <= set(lab))

    def render(self) -> str:
        """The Prometheus text exposition of everything."""
        lines = []
        with self._lock:
            for name, help_ in self.COUNTERS.items():
                lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} counter"]
                rows = sorted((lab, v) for (n, lab), v in self.counters.items() if n == name)
                if not rows:
                    rows = [((), 0)]
                for lab, v in rows:
                    labels = ",".join(f'{k}="{val}"' for k, val in lab)
                    lines.append(f"{PREFIX}{name}{{{labels}}} {v:g}" if labels else f"{PREFIX}{name} {v:g}")
            for name, help_ in self.GAUGES.items():
                lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} gauge",
                          f"{PREFIX}{name} {self.gauges[name]:g}"]
            for name, help_ in self.HISTOGRAMS.items():
                lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} histogram"]
                lines += self.histograms[name].lines(PREFIX + name)
        return "\n".join(lines) + "\n"
