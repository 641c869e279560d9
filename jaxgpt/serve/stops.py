"""Stop strings over streamed text, in time linear in the text and the stop strings.

A streamed choice's text arrives a few characters at a time. `StopScanner.feed(new)` reads
only the new characters: for each stop string it keeps how much of the string the text seen
so far ends with (a Knuth-Morris-Pratt state, advanced with the string's prefix table), so

    hit = scanner.feed(new)   # where the earliest stop string starts (relative to `new`; < 0:
                              # it began in text fed before), or None
    scanner.hold              # characters at the end that may be the start of a stop string

costs O(len(new)) amortized per stop string, whatever the stop strings' lengths; the prefix
tables (O(length) each) are made once per request, by the request's validation off the event
loop (`prefix_tables`). The scheduler (jaxgpt.serve.scheduler.Choice) releases all but the
`hold` last characters and ends the choice at a hit. The same answers as searching the held
text for each string and testing each prefix of it against the text's end, which costs
O(length^2) per token (a 100,000-character stop string slowed every stream 10x).
"""

from __future__ import annotations


def prefix_table(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    q = 0
    for i in range(1, len(s)):
        c = s[i]
        while q and s[q] != c:
            q = fail[q - 1]
        if s[q] == c:
            q += 1
        fail[i] = q
    return fail


def prefix_tables(stops: list[str]) -> list[list[int]]:
    return [prefix_table(s) for s in stops]


class StopScanner:
    """The stop-string state of one stream of text (see the module's docstring)."""

    def __init__(self, stops: list[str], tables: list[list[int]] | None = None):
        self.stops = list(stops)
        self.tables = tables if tables is not None else prefix_tables(self.stops)
        self.state = [0] * len(self.stops)  # per stop: how much of it the text ends with

    @property
    def hold(self) -> int:
        return max(self.state, default=0)

    def feed(self, new: str) -> int | None:
        """Read `new`; the start (relative to `new`) of the earliest stop string that the text
        now contains, or None. (After a hit the scanner is spent: the choice ends there.)"""
        best = None
        for k, (st, fail) in enumerate(zip(self.stops, self.tables)):
            q, n = self.state[k], len(st)
            for i, c in enumerate(new):
                while q and st[q] != c:
                    q = fail[q - 1]
                if st[q] == c:
                    q += 1
                if q == n:  # the first occurrence of this stop string (its earliest start)
                    start = i - n + 1
                    best = start if best is None else min(best, start)
                    q = fail[q - 1]
                    break
            self.state[k] = q
        return best
