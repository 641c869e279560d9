"""Structured outputs in the engine (jaxgpt.grammar): over a dozen JSON Schemas every constrained
output parses and validates (jsonschema, an independent validator); regex and choice rows match;
a grammar row and a free row decoded in one batch each equal their solo runs; presence /
frequency penalties and logit_bias equal a numpy reference over the model's own logits; the
tool-call parser splits streamed text as it splits the whole; lm.generate(json_schema=...).
A tiny random GPT-2-shaped model (2 layers, 32 wide) with GPT-2's real vocabulary: its tokens are
noise, so every valid output is the grammar's doing."""

import json
import re

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from jaxgpt.formats.load import LoadedModel  # noqa: E402
from jaxgpt.config import GPTConfig  # noqa: E402
from jaxgpt.decode.engine import Engine, Request  # noqa: E402
from jaxgpt.decode.grammar import compile_grammar  # noqa: E402
from jaxgpt.model.gpt import GPT  # noqa: E402
from jaxgpt.serve.tools import ToolCallParser, call_text, split_calls  # noqa: E402
from jaxgpt.tokenizers.tokenizer import GPT2Tokenizer  # noqa: E402

EOT = 50256
V = 50257

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"]},
    {"enum": ["red", "green", "blue"]},
    {"type": "boolean"},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "boolean"}]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 4}},
     "required": ["ok"]},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 5}},
                                "required": ["id"]}, "minItems": 1, "maxItems": 2},
    {"const": "fixed"},
    {"type": "null"},
    {"type": "object", "properties": {"tag": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 10, "maximum": 20}},
     "required": ["tag", "n"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def lm():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V)
    return LoadedModel(GPT(cfg, seed=0), GPT2Tokenizer(), {"source": "tiny"})


@pytest.fixture(scope="module")
def engine(lm):
    return Engine(lm.model, slots=4, max_len=64)


def run(engine, requests):
    for r in requests:
        engine.add(r)
    engine.run()
    return requests


def text(tok, r):
    return tok.decode([t for t in r.tokens if t != EOT])


@pytest.mark.slow
def test_every_constrained_output_parses_and_validates(lm, engine):
    tok, prompt = lm.tokenizer, lm.tokenizer.encode("JSON:")
    reqs = [Request(prompt, 40, temperature=1.0, seed=i,
                    grammar=compile_grammar(tok, V, json_schema=s), stop=[EOT])
            for i, s in enumerate(SCHEMAS)]
    for i in range(0, len(reqs), engine.slots):
        run(engine, reqs[i:i + engine.slots])
    for s, r in zip(SCHEMAS, reqs):
        assert r.finish_reason == "stop" and r.tokens[-1] == EOT, (s, text(tok, r))
        jsonschema.validate(json.loads(text(tok, r)), s)
    # the free model writes no JSON at all: the grammar did it
    free = run(engine, [Request(prompt, 12, temperature=1.0, seed=0)])[0]
    with pytest.raises(ValueError):
        json.loads(text(tok, free))


@pytest.mark.slow
def test_json_object_regex_and_choice_rows(lm, engine):
    tok, prompt = lm.tokenizer, lm.tokenizer.encode("Answer:")
    choices = ["yes", "no", "maybe not"]
    reqs = run(engine, [
        # (free-form keys: the noise model rarely closes a string; a bias on '"' and '}' ends it
        # sooner, and the mask still keeps it JSON)
        Request(prompt, 40, temperature=1.0, seed=1, grammar=compile_grammar(tok, V, json_object=True),
                stop=[EOT], logit_bias={tok.encode('"')[0]: 8.0, tok.encode("}")[0]: 8.0}),
        Request(prompt, 40, temperature=1.0, seed=2, grammar=compile_grammar(tok, V, regex=r"[0-9]{3}-[a-c]{2}"), stop=[EOT]),
        Request(prompt, 40, temperature=1.0, seed=3, grammar=compile_grammar(tok, V, choice=choices), stop=[EOT]),
        Request(prompt, 40, temperature=0.0, seed=4, grammar=compile_grammar(tok, V, choice=choices), stop=[EOT])])
    assert isinstance(json.loads(text(tok, reqs[0])), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text(tok, reqs[1]))
    assert text(tok, reqs[2]) in choices and text(tok, reqs[3]) in choices
    assert all(r.finish_reason == "stop" for r in reqs)


def test_grammar_row_and_free_row_in_one_batch_equal_their_solo_runs(lm, engine):
    tok = lm.tokenizer
    g = compile_grammar(tok, V, json_schema=SCHEMAS[0])
    make = lambda: [Request(tok.encode("A person:"), 30, temperature=0.9, top_p=0.95, seed=7, grammar=g, stop=[EOT]),
                    Request(tok.encode("Once upon a time"), 20, temperature=0.8, seed=8, stop=[EOT])]
    solo = [run(engine, [r])[0].tokens for r in make()]
    together = [r.tokens for r in run(engine, make())]
    assert together == solo
    assert engine._matchers == [None] * engine.slots and not engine._biased.any()  # slots freed clean


def _reference(lm, prompt, n, bias, presence, frequency):
    """Greedy decoding by hand: the full forward's last logits + bias - penalties, argmax."""
    ids, counts = list(prompt), {}
    for _ in range(n):
        padded = ids + [0] * (lm.config.block_size - len(ids))  # one shape: one compile (causal:
        logits = lm.logits(padded)[len(ids) - 1].astype(np.float64)  # the padding is not seen)
        for t, b in bias.items():
            logits[t] += b
        for t, c in counts.items():
            logits[t] -= c * frequency + presence
        t = int(np.argmax(logits))
        ids.append(t)
        counts[t] = counts.get(t, 0) + 1
    return ids[len(prompt):]


@pytest.mark.slow
def test_penalties_and_logit_bias_equal_a_reference(lm, engine):
    tok = lm.tokenizer
    prompt = tok.encode("The cat sat on the mat and the")
    plain = run(engine, [Request(prompt, 12, temperature=0.0)])[0].tokens
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself: penalties have work to do
    cases = [({}, 1.5, 0.0), ({}, 0.0, 1.0), ({plain[0]: -100.0, 262: 5.0}, 0.5, 0.5)]
    reqs = run(engine, [Request(prompt, 12, temperature=0.0, logit_bias=b, presence_penalty=p,
                                frequency_penalty=f) for b, p, f in cases])
    for (b, p, f), r in zip(cases, reqs):
        assert r.tokens == _reference(lm, prompt, 12, b, p, f)
    assert reqs[0].tokens != plain
    forced = run(engine, [Request(prompt, 5, temperature=1.0, seed=3, logit_bias={1234: 100.0})])[0]
    assert forced.tokens == [1234] * 5


@pytest.mark.slow  # (engines of other slot counts: compiles of their own)
def test_lm_generate_with_a_json_schema(lm):
    schema = SCHEMAS[4]
    out = lm.generate("A point:", 40, json_schema=schema, temperature=0.0)
    jsonschema.validate(json.loads(out[len("A point:"):]), schema)
    ids = lm.generate([lm.tokenizer.encode("x")] * 2, 30, choice=["alpha", "beta"], temperature=1.0)
    assert ids.shape == (2, 31)
    for row in ids:
        new = [t for t in row[1:].tolist() if t != EOT]
        assert lm.tokenizer.decode(new) in ("alpha", "beta")


def test_tool_call_parser_streams_as_it_splits_the_whole():
    answer = ("Let me check. " + call_text("get_weather", {"city": "Paris"}) + "\n"
              + call_text("add", '{"a": 1, "b": 2}') + "\n<tool_call>not json</tool_call> bye")
    content, calls = split_calls(answer)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert content.startswith("Let me check. ") and "not json" in content and content.endswith(" bye")
    for size in (1, 3, 7):
        p = ToolCallParser()
        events = [e for i in range(0, len(answer), size) for e in p.feed(answer[i:i + size])] + p.finish()
        assert "".join(v for k, v in events if k == "content") == content
        assert [json.loads(v["function"]["arguments"]) for k, v in events if k == "call"] == \
            [{"city": "Paris"}, {"a": 1, "b": 2}]
    assert split_calls("plain <tool_call") == ("plain <tool_call", [])  # a tag that never opened
    # a call the model did not close (it stopped right after the JSON) is still a call
    assert split_calls('<tool_call>\n{"name": "f", "arguments": {}}')[1][0]["function"]["name"] == "f"


def test_bounded_strings_refuse_raw_control_characters(lm):
    """xgrammar 0.2.9 lets a maxLength string hold raw U+0000-U+001F (invalid JSON: pydantic and
    json.loads refuse it; met through openai's `parse`); jaxgpt.grammar narrows the class."""
    tok = lm.tokenizer
    g = compile_grammar(tok, V, json_schema={"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 5}}, "required": ["a"]})
    for text, ok in [('{"a": "ab\x0b"}', False), ('{"a": "a\tb"}', False), ('{"a": "abc"}', True)]:
        m = g.matcher([EOT])
        assert all(m.accept(t) for t in tok.encode(text)) == ok, text
        json.loads(text) if ok else pytest.raises(ValueError, json.loads, text)


@pytest.mark.slow  # (engines of other slot counts: compiles of their own)
def test_one_slot_greedy_screen_keeps_the_constraint_and_bias(lm):
    """A one-slot engine picks greedy tokens through the int8 head screen; with a grammar and a
    bias it must pick what the full head picks from the adjusted logits."""
    tok = lm.tokenizer
    g = compile_grammar(tok, V, json_schema=SCHEMAS[4])
    bias = {tok.encode("5")[0]: 3.0}
    make = lambda: Request(tok.encode("A point:"), 30, temperature=0.0, grammar=g, stop=[EOT], logit_bias=bias)
    screened = Engine(lm.model, slots=1, max_len=64)
    assert screened.screen is not None
    a = run(screened, [make()])[0]
    b = run(Engine(lm.model, slots=1, max_len=64, fast_decode=False), [make()])[0]
    assert a.tokens == b.tokens and a.finish_reason == "stop"
    jsonschema.validate(json.loads(text(tok, a)), SCHEMAS[4])


def test_every_tokenizer_spells_its_vocabulary_as_bytes():
    """vocab_bytes(), what a grammar matches tokens by: GPT-2's equals tiktoken's bytes (its
    <|endoftext|> empty: special tokens spell no text); a byte-level BPE's equals its own
    decode_bytes (special tokens empty); a char vocabulary's is each character's UTF-8."""
    from jaxgpt.tokenizers.bpe import BPETokenizer
    from jaxgpt.tokenizers.bytelevel import bytes_to_unicode
    from jaxgpt.tokenizers.tokenizer import CharTokenizer

    gpt2 = GPT2Tokenizer()
    vb = gpt2.vocab_bytes()
    assert len(vb) == V and vb[EOT] == b"" and b"".join(vb[t] for t in gpt2.encode(" héllo wörld")) == " héllo wörld".encode()
    alphabet = bytes_to_unicode()
    bpe = BPETokenizer([alphabet[b] for b in range(256)] + [alphabet[104] + alphabet[105]], [(alphabet[104], alphabet[105])],
                       added=[{"id": 257, "content": "<|im_end|>", "special": True}])
    vb = bpe.vocab_bytes()
    assert vb[:256] == [bytes([b]) for b in range(256)] and vb[256] == b"hi" and vb[257] == b""
    assert CharTokenizer("aé\n").vocab_bytes() == [b"a", "é".encode(), b"\n"]
    g = compile_grammar(CharTokenizer("ab,"), 3, regex=r"(ab,)+")  # no end-of-text: ends when complete
    m = g.matcher()
    assert all(m.accept(t) for t in CharTokenizer("ab,").encode("ab,")) and m.done
