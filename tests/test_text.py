"""The one text stream (jaxgpt.decode.text) against an independent reference, and the one way of
running many requests (jaxgpt.decode.batch) against each request decoded alone."""

import random

import numpy as np
import pytest

from jaxgpt.decode.text import TextStream


def reference(text: str, pieces: list[bytes], stops: list[str]):
    """What a reader should get after each piece, from the whole text (quadratic, obvious): the
    characters complete so far, cut before the earliest stop string, minus the longest tail that
    is a proper prefix of some stop string (nothing held back once the row ends)."""
    stops = [s for s in stops if s]
    ends = np.cumsum([len(c.encode()) for c in text]).tolist()
    out, n = [], 0
    for k, piece in enumerate(pieces):
        n += len(piece)
        seen = text[:sum(e <= n for e in ends)]
        hits = [seen.find(s) for s in stops if s in seen]
        if hits:
            out.append(seen[:min(hits)])
            return out, True
        final = k == len(pieces) - 1
        hold = 0 if final else max([j for s in stops for j in range(1, len(s)) if seen.endswith(s[:j])], default=0)
        out.append(seen[:len(seen) - hold])
    return out, False


@pytest.mark.parametrize("seed", range(40))
def test_stream_equals_the_whole_text_reference(seed):
    rng = random.Random(seed)
    alphabet = ["a", "b", "ab", "é", "€", "😀", " ", "\n"]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    data = text.encode()
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12)))) if len(data) > 1 else []
    pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])] if data else [b""]
    stops = ["".join(rng.choice(alphabet[:4]) for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(0, 3))]
    want, stopped = reference(text, pieces, stops)
    s = TextStream(lambda t: pieces[t], stops)
    got = []
    for i in range(len(pieces)):
        s.push(i)
        got.append(s.text)
        if s.stopped:
            break
    if not s.stopped:
        s.finish()
        got[-1] = s.text
    assert got == want, (pieces, stops)
    assert s.stopped == stopped


def test_hold_back_is_bounded_by_the_longest_stop_string():
    """A 100,000-character stop string: the held text never exceeds it, the released text is
    everything that cannot start it, and a late full match still stops the stream."""
    stop = "x" * 99_999 + "y"
    s = TextStream(lambda t: b"x" * 1000, [stop])
    for i in range(150):
        s.push(i)
        assert len(s.pending) <= len(stop) - 1
    assert s.text == "x" * (150_000 - 99_999)
    s2 = TextStream(lambda t: t.encode() if isinstance(t, str) else b"x" * 1000, [stop])
    for i in range(100):
        s2.push(i)
    s2.push_text("y tail")
    assert s2.stopped and s2.text == "x" * (100_000 - 99_999)


def test_earliest_starting_stop_string_wins_within_one_piece():
    s = TextStream(lambda t: b"", ["bc", "abcd"])
    assert s.push_text("zabcde") == "z" and s.stopped


def test_run_requests_equals_each_request_alone():
    """More requests than slots, mixed lengths and settings: every row's tokens == its solo run."""
    from jaxgpt.config import GPTConfig
    from jaxgpt.decode.batch import run_requests
    from jaxgpt.decode.engine import Engine, Request
    from jaxgpt.model.gpt import GPT
    from flax import nnx

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=97),
                rngs=nnx.Rngs(0))

    def make():
        r = np.random.RandomState(1)
        return [Request(r.randint(0, 97, r.randint(1, 12)).tolist(), [5, 0, 8, 3, 6][i],
                        temperature=[0.0, 0.8][i % 2], top_k=[None, 5][i % 2], seed=i, stop=(3,))
                for i in range(5)]
    solo, one = make(), Engine(model, slots=1)
    for r in solo:
        run_requests(one, [r])
    done = []
    batched = run_requests(Engine(model, slots=2), make(), on_done=lambda i, r: done.append(i))
    assert sorted(done) == list(range(5))
    assert [r.finish_reason for r in batched][1] == "length" and batched[1].tokens == []
    for a, b in zip(solo, batched):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
