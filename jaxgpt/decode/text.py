"""Tokens -> the text a reader should see: the one text stream of chat, the server and the harness.

`TextStream` turns a row's tokens into text pieces as they arrive:

- bytes become text through an incremental UTF-8 decoder (a character split over tokens is
  released once complete; invalid bytes become U+FFFD, as a full decode with errors="replace");
- text that may be the beginning of a stop string is held back until it is known not to be one;
- the first stop string ends the stream: the text before it is released, the rest never is.

The hold-back is linear in the text: each stop string keeps a Knuth-Morris-Pratt state (the
length of its longest prefix that ends the text so far), so a character costs amortized O(1) per
stop string and the held text is never longer than the longest stop string. (Re-searching the
held text for every prefix of every stop string is quadratic: a 100,000-character stop string
made every token cost seconds.)
"""

from __future__ import annotations

import codecs
from typing import Callable


def _failure(s: str) -> list[int]:
    """KMP's prefix function: f[i] = the length of the longest proper prefix of s[:i+1] that is
    also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


def stop_tables(stops) -> list[list[int]]:
    """The stop strings' KMP tables (O(length) each), for a TextStream: made once per request,
    e.g. by the server's request validation off its event loop."""
    return [_failure(s) for s in stops]


class _StopMatcher:
    """Where one stop string stands at the end of the text: `k` characters of it matched."""

    def __init__(self, stop: str, fail: list[int] | None = None):
        self.stop, self.fail, self.k = stop, fail if fail is not None else _failure(stop), 0

    def feed(self, text: str) -> int:
        """Advance over `text`; the index in `text` just past the first full match, or -1."""
        s, f, k = self.stop, self.fail, self.k
        for i, ch in enumerate(text):
            while k and s[k] != ch:
                k = f[k - 1]
            if s[k] == ch:
                k += 1
            if k == len(s):
                self.k = k
                return i + 1
        self.k = k
        return -1


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """token id -> its bytes under `tokenizer` (every jaxgpt tokenizer has decode_bytes), cached."""
    cache: dict[int, bytes] = {}

    def get(token: int) -> bytes:
        b = cache.get(token)
        if b is None:
            b = cache[token] = tokenizer.decode_bytes([token])
        return b
    return get


class TextStream:
    """One row's text: `push(token)` -> the newly released text; `finish()` -> what was held.

    `token_bytes(token)` gives a token's bytes (see `token_bytes(tokenizer)`). `stops`: stop strings (empty ones ignored),
    `tables`: their stop_tables if made already.
    After a stop string, `stopped` is True and `text` is everything before it; later pushes
    release nothing."""

    def __init__(self, token_bytes: Callable[[int], bytes], stops=(), tables=None):
        self.token_bytes = token_bytes
        stops = list(stops)
        self.matchers = [_StopMatcher(s, f) for s, f in zip(stops, tables or [None] * len(stops)) if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # held back: it may be the start of a stop string
        self.text = ""  # released so far
        self.stopped = False

    def push(self, token: int) -> str:
        return self.push_bytes(self.token_bytes(token))

    def push_bytes(self, data: bytes) -> str:
        return self.push_text(self.decoder.decode(data)) if not self.stopped else ""

    def push_text(self, piece: str) -> str:
        """Release what `piece` makes certain: all but a possible stop-string start, or the text
        before the earliest stop string (then the stream is stopped)."""
        if self.stopped or not piece:
            return ""
        if not self.matchers:
            return self._release(piece)
        base = len(self.pending)
        self.pending += piece
        starts = []
        for m in self.matchers:
            end = m.feed(piece)
            if end >= 0:
                starts.append(base + end - len(m.stop))
        if starts:  # the earliest-starting stop string wins, as a search of the text would
            cut = max(min(starts), 0)
            out = self._release(self.pending[:cut])
            self.pending, self.stopped = "", True
            return out
        hold = max(m.k for m in self.matchers)
        cut = len(self.pending) - hold
        out = self._release(self.pending[:cut]) if cut > 0 else ""
        self.pending = self.pending[max(cut, 0):]
        return out

    def finish(self) -> str:
        """The end of the row: release the held text and any incomplete character (U+FFFD)."""
        if self.stopped:
            return ""
        tail = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return self._release(tail) if tail else ""

    def _release(self, s: str) -> str:
        self.text += s
        return s
