"""Grammars that constrain decoding (structured outputs): JSON Schema, any JSON, a regex, a
choice list, an EBNF grammar, compiled once against a tokenizer's vocabulary.

    g = compile_grammar(lm.tokenizer, lm.config.vocab_size, json_schema={"type": "object", ...})
    engine.add(Request(prompt, 200, grammar=g, stop=[eot]))    # every output parses and validates

The masks come from xgrammar (chosen over llguidance by the mask time per step on SmolLM2's
49,152-token vocabulary: docs/serving.md "Structured outputs"). A `Grammar` makes one `Matcher`
per row: before each step the engine asks it for the row's allowed tokens (`fill`: one bit per
id in an int32 [N, ceil(V / 32)] array, applied to the logits inside the jitted step by
jaxgpt.decode.sampling.adjust_logits), after it hands it the token picked (`accept`), and ends the row
when it is `done`. Tokens are matched by their bytes (each tokenizer's `vocab_bytes()`:
tiktoken's GPT-2, the byte-level BPE of GGUF / tokenizer.json models, char vocabularies);
special tokens spell no text, so no grammar ever admits them except as the row's stop tokens,
once the grammar is complete.

JSON is generated on one line with ", " and ": " separators (no free whitespace: a small model
left free to indent can pad forever); object properties in the schema's order; with a JSON
Schema, properties the schema does not name are not generated (OpenAI's strict mode).
xgrammar (and torch, which it imports) load on the first grammar compiled, not with jaxgpt.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Sequence

from jaxgpt.config import ConfigError

_LOCK = threading.Lock()
_COMPILERS: dict[tuple, tuple] = {}  # (id(tokenizer), vocab_size) -> (weakref, compiler, stop ids)


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise ConfigError("constrained decoding needs xgrammar: pip install xgrammar "
                          "(or pip install -e '.[serve]')") from None
    return xgrammar


def vocab_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes of each of the model's `vocab_size` ids (ids past the tokenizer's vocabulary,
    padding rows of the embedding: b"", never generated)."""
    if not hasattr(tokenizer, "vocab_bytes"):
        raise ConfigError(f"the {type(tokenizer).__name__} tokenizer cannot spell its tokens as "
                          "bytes, which a grammar needs")
    table = list(tokenizer.vocab_bytes())[:vocab_size]
    return table + [b""] * (vocab_size - len(table))


def _compiler(tokenizer, vocab_size: int):
    """xgrammar's compiler for this tokenizer and model width (made once per tokenizer)."""
    with _LOCK:  # (the server compiles in worker threads)
        return _make_compiler(tokenizer, vocab_size)


def _make_compiler(tokenizer, vocab_size: int):
    key = (id(tokenizer), int(vocab_size))
    hit = _COMPILERS.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1], hit[2]
    xgr = _xgr()
    eot = getattr(tokenizer, "eot_token", None)
    stop = [eot] if eot is not None and eot < vocab_size else []
    info = xgr.TokenizerInfo(vocab_bytes(tokenizer, vocab_size), xgr.VocabType.RAW,
                             vocab_size=int(vocab_size), stop_token_ids=stop or None)
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    try:
        ref = weakref.ref(tokenizer, lambda _, key=key: _COMPILERS.pop(key, None))
    except TypeError:  # (a tokenizer without weakref support: kept for the process)
        ref = lambda t=tokenizer: t  # noqa: E731
    _COMPILERS[key] = (ref, compiler, stop)
    return compiler, stop


_LOOSE_CHARS = r'[^\"\\\r\n]'  # xgrammar 0.2.9's character class for length-bounded strings
_JSON_CHARS = r'[^\0-\x1f\"\\\r\n]'  # what JSON allows unescaped (as its other strings use)


def json_grammar(schema):
    """xgrammar's grammar of JSON valid against `schema` (a dict or JSON text), one line with
    ", " / ": " separators. Its strings with a maxLength / minLength admit raw control
    characters (U+0000-U+001F), which JSON forbids unescaped (json.loads and pydantic refuse
    them): those character classes are narrowed to what JSON allows."""
    xgr = _xgr()
    text = schema if isinstance(schema, str) else json.dumps(schema)
    ebnf = str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
    return xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_CHARS, _JSON_CHARS))


def ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal (JSON's escapes, which xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose sentences are exactly `choices`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError("a choice list must hold at least one non-empty string")
    return "root ::= " + " | ".join(ebnf_literal(c) for c in dict.fromkeys(choices))


class Grammar:
    """A grammar compiled for one tokenizer's vocabulary; `matcher(stop)` starts a row."""

    def __init__(self, compiled, stop: list[int], description: str):
        self.compiled, self.default_stop, self.description = compiled, stop, description

    def __repr__(self) -> str:
        return f"Grammar({self.description})"

    def matcher(self, stop: Sequence[int] = ()) -> "Matcher":
        """A fresh matcher for one row; `stop`: the ids that may end the row once the grammar is
        complete (default: the tokenizer's end-of-text). Without any, the row ends as soon as
        the grammar is complete."""
        xgr = _xgr()
        stop = [int(t) for t in stop] or self.default_stop
        return Matcher(xgr.GrammarMatcher(self.compiled, override_stop_tokens=stop or None,
                                          terminate_without_stop_token=not stop), bool(stop))


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, m, has_stop: bool):
        self._m, self._has_stop = m, has_stop

    def fill(self, mask, row: int) -> None:
        """Write the allowed next tokens into mask[row] (int32 bits, see adjust_logits)."""
        self._m.fill_next_token_bitmask(mask, row)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False if the grammar does not allow it (the state is unchanged)."""
        return self._m.accept_token(int(token))

    @property
    def done(self) -> bool:
        """The grammar is complete and has taken its stop token (or needs none): nothing more."""
        return self._m.is_terminated() or (not self._has_stop and self._m.is_completed())


def compile_grammar(tokenizer, vocab_size: int, *, json_schema=None, json_object: bool = False,
                    regex: str | None = None, choice: Sequence[str] | None = None,
                    ebnf: str | None = None) -> Grammar:
    """Compile exactly one of: `json_schema` (a dict or its JSON text), `json_object` (any JSON
    object), `regex`, `choice` (a list of strings), `ebnf` (xgrammar's EBNF, rule `root`).
    ConfigError (with xgrammar's reason) for a schema or pattern it cannot compile."""
    given = [n for n, v in (("json_schema", json_schema), ("json_object", json_object or None),
                            ("regex", regex), ("choice", choice), ("ebnf", ebnf)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one grammar (json_schema, json_object, regex, choice, ebnf); "
                          f"got {', '.join(given) or 'none'}")
    compiler, stop = _compiler(tokenizer, vocab_size)
    try:
        if json_schema is not None:
            compiled = compiler.compile_grammar(json_grammar(json_schema))
        elif json_object:
            compiled = compiler.compile_grammar(json_grammar({"type": "object"}))
        elif regex is not None:
            compiled = compiler.compile_regex(regex)
        elif choice is not None:
            compiled = compiler.compile_grammar(choice_ebnf(choice))
        else:
            compiled = compiler.compile_grammar(ebnf)
    except ConfigError:
        raise
    except Exception as e:  # xgrammar's RuntimeError / InvalidJSONError: the user's input
        raise ConfigError(f"cannot compile the {given[0].replace('_', ' ')}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return Grammar(compiled, stop, given[0])


def compile_tool_calls(tokenizer, vocab_size: int, functions: Sequence[tuple[str, dict]],
                       max_calls: int = 1) -> Grammar:
    """A grammar of 1 to `max_calls` tool-call blocks (jaxgpt.serve.tools' format), one per line:

        <tool_call>
        {"name": NAME, "arguments": {...}}
        </tool_call>

    NAME one of `functions` [(name, JSON Schema of its parameters)], the arguments valid
    against that function's schema."""
    if not functions:
        raise ConfigError("a tool-call grammar needs at least one function")
    xgr = _xgr()
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params or {"type": "object"}},
              "required": ["name", "arguments"]} for name, params in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    compiler, stop = _compiler(tokenizer, vocab_size)
    try:
        call = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
                                  json_grammar(schema),
                                  xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
        sep = xgr.Grammar.from_ebnf('root ::= "\\n"')
        options = [xgr.Grammar.concat(*([call] + [sep, call] * k)) for k in range(max(1, max_calls))]
        compiled = compiler.compile_grammar(options[0] if len(options) == 1 else xgr.Grammar.union(*options))
    except Exception as e:
        raise ConfigError(f"cannot compile the tools' parameter schemas: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return Grammar(compiled, stop, f"tool calls ({', '.join(n for n, _ in functions)})")
