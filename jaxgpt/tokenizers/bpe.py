"""BPETokenizer: Hugging Face byte-level BPE for models that are not GPT-2 (SmolLM2, Llama 3,
Qwen2, ...), its vocabulary, merges and special tokens from a GGUF file's metadata or a
tokenizer.json folder, and the readers of tokenizer.json's pre-tokenizer, normalizer and
post-processor sections.

The algorithm is Hugging Face `tokenizers`' exactly: added (special) tokens are cut out of the
text first; each remaining segment is pre-tokenized by the model's split regex; each piece is
mapped byte by byte through GPT-2's bytes_to_unicode alphabet and merged by BPE: the adjacent
pair with the lowest merge rank first (leftmost on ties), one merge at a time, until no pair
has a rank. (tiktoken instead ranks a concatenation by its token id, which can differ.)
"""

from __future__ import annotations

import json
import unicodedata

from jaxgpt.config import ConfigError
from jaxgpt.tokenizers.bytelevel import (_BEHAVIORS, _BYTE_TO_CHAR, _CHAR_TO_BYTE, _GGUF_PRE_SPLITS,
                                         _HF_GPT2_SPLIT, _NORMALIZERS, EOT, _has_unassigned,
                                         _is_word_char, _is_ws, _split_step)

_INF = 1 << 62


class BPETokenizer:
    """Hugging Face byte-level BPE from plain data: `tokens` (the vocabulary by id, spelled in the
    bytes_to_unicode alphabet; None for an unused id), `merges` ("a b" strings or (a, b) pairs,
    best first), `added` (added tokens: dicts with id, content, special and optionally lstrip,
    rstrip, single_word, normalized), `pre` (the pre-tokenizer as steps: {"split": PATTERN,
    "behavior": ..., "invert": ...} or {"prefix_space": True}; default ByteLevel's GPT-2 split),
    `normalizer` (None or a list of NFC/NFD/NFKC/NFKD). Build one with from_gguf_metadata or
    from_hf_folder; to_dict / tokenizer_from_dict save and rebuild it."""

    name = "bpe"

    def __init__(self, tokens, merges, *, added=(), pre=None, normalizer=None, bos_token=None,
                 eos_token=None, add_bos=False, ignore_merges=False, unk_token=None,
                 fuse_unk=False, chat_template=None):
        self.tokens = [None if t is None else str(t) for t in tokens]
        self.merges = [m if isinstance(m, str) else (str(m[0]), str(m[1])) for m in merges]
        self.added = [self._added_entry(a) for a in added]
        self.pre = [dict(s) for s in (pre if pre is not None else [{"split": _HF_GPT2_SPLIT}])]
        self.normalizer = list(normalizer or [])
        self.ignore_merges, self.fuse_unk = bool(ignore_merges), bool(fuse_unk)
        self.unk_token = None if unk_token is None else int(unk_token)
        self.bos_token = None if bos_token is None else int(bos_token)
        self.eot_token = None if eos_token is None else int(eos_token)
        self.add_bos = bool(add_bos)
        # the model's Jinja chat template (GGUF tokenizer.chat_template, tokenizer_config.json),
        # as transformers keeps it with the tokenizer; jaxgpt.templates renders it ("model")
        self.chat_template = chat_template if isinstance(chat_template, str) else None

        vocab = {}
        for i, t in enumerate(self.tokens):
            if t is not None:
                vocab[t] = i                       # a repeated spelling: the later id, as HF
        self._vocab = vocab
        ids = [a["id"] for a in self.added]
        self.vocab_size = max([len(self.tokens), *(i + 1 for i in ids)])
        self.special_tokens = {a["content"]: a["id"] for a in self.added if a["special"]}
        self.added_tokens = {a["content"]: a["id"] for a in self.added}

        # merges: (left id * stride + right id) -> rank << 32 | merged id
        stride = self._stride = max(len(self.tokens), 1)
        pairs = {}
        for rank, m in enumerate(self.merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            ia, ib, iab = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if ia is None or ib is None or iab is None:
                missing = a if ia is None else b if ib is None else a + b
                raise ConfigError(f"BPE merge {rank} ({a!r} {b!r}) uses {missing!r}, which is not "
                                  "in the vocabulary")
            pairs[ia * stride + ib] = rank << 32 | iab
        self._pairs = pairs

        # decoding: id -> bytes (tokenizers' ByteLevel decoder: a token all in the byte
        # alphabet is those bytes; any other token is its own UTF-8)
        table = [b""] * self.vocab_size
        for i, t in enumerate(self.tokens):
            if t is not None:
                table[i] = self._token_bytes(t)
        for a in self.added:
            table[a["id"]] = self._token_bytes(a["content"])
        self._id_bytes = table

        for n in self.normalizer:
            if n not in _NORMALIZERS:
                raise ConfigError(f"normalizer {n!r} is not supported (supported: "
                                  f"{', '.join(_NORMALIZERS)})")
        self._steps = [self._make_step(s) for s in self.pre]
        self._fast_split = (self._steps[0] if len(self._steps) == 1 and "split" in self.pre[0]
                            and self.pre[0].get("behavior", "isolated") == "isolated" else None)
        raw = [a for a in self.added if not (a["normalized"] and self.normalizer)]
        norm = [a for a in self.added if a["normalized"] and self.normalizer]
        self._raw_matcher, self._norm_matcher = self._matcher(raw), self._matcher(norm)
        self._cache: dict[str, tuple] = {}

    # ---- construction helpers ----

    @staticmethod
    def _added_entry(a) -> dict:
        if not isinstance(a, dict):                       # compact form: [id, content, special]
            a = {"id": a[0], "content": a[1], "special": a[2]}
        return {"id": int(a["id"]), "content": str(a["content"]),
                "special": bool(a.get("special", True)), "lstrip": bool(a.get("lstrip", False)),
                "rstrip": bool(a.get("rstrip", False)),
                "single_word": bool(a.get("single_word", False)),
                "normalized": bool(a.get("normalized", False))}

    @staticmethod
    def _token_bytes(t: str) -> bytes:
        try:
            return bytes(_CHAR_TO_BYTE[c] for c in t)
        except KeyError:
            return t.encode("utf-8")

    @staticmethod
    def _make_step(step: dict):
        if step.get("prefix_space"):
            return lambda s, exact=False: [s if s.startswith(" ") else " " + s]
        if "split" in step:
            behavior = step.get("behavior", "isolated")
            if behavior not in _BEHAVIORS:
                raise ConfigError(f"split behavior {behavior!r} is not supported")
            return _split_step(step["split"], behavior, bool(step.get("invert", False)))
        raise ConfigError(f"unknown pre-tokenizer step {json.dumps(step)[:80]}")

    @staticmethod
    def _matcher(added):
        """A regex finding the added tokens, leftmost-longest (as tokenizers' Aho-Corasick)."""
        if not added:
            return None
        import regex
        by_content = {a["content"]: a for a in added if a["content"]}
        alts = sorted(by_content, key=len, reverse=True)
        return regex.compile("|".join(map(regex.escape, alts))), by_content

    # ---- encoding ----

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; the special-token strings in it become their ids unless
        `allow_special=False` (then they are plain text). Never adds a bos (see `add_bos`)."""
        out: list[int] = []
        for seg, tid in self._cut(text, self._raw_matcher, allow_special):
            if tid is not None:
                out.append(tid)
                continue
            for n in self.normalizer:
                seg = unicodedata.normalize(n, seg)
            for seg2, tid2 in self._cut(seg, self._norm_matcher, allow_special):
                if tid2 is not None:
                    out.append(tid2)
                else:
                    self._encode_segment(seg2, out)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text, allow_special=False)

    def _cut(self, text, matcher, allow_special):
        """(text, None) and (None, id) pieces: `text` cut at the added tokens it contains."""
        if matcher is None or not text:
            return [(text, None)] if text else []
        rx, by_content = matcher
        out, start = [], 0
        for m in rx.finditer(text):
            a, b = m.span()
            tok = by_content[m.group()]
            if tok["special"] and not allow_special:
                continue
            if tok["single_word"] and ((a > 0 and _is_word_char(text[a - 1]))
                                       or (b < len(text) and _is_word_char(text[b]))):
                continue
            if tok["lstrip"]:
                while a > start and _is_ws(text[a - 1]):
                    a -= 1
            if tok["rstrip"]:
                while b < len(text) and _is_ws(text[b]):
                    b += 1
            if start < a:
                out.append((text[start:a], None))
            out.append((None, tok["id"]))
            start = b
        if start < len(text):
            out.append((text[start:], None))
        return out

    def _encode_segment(self, seg: str, out: list) -> None:
        exact = _has_unassigned(seg)
        if self._fast_split is not None:
            pieces = self._fast_split(seg, exact)
        else:
            pieces = [seg]
            for step in self._steps:
                pieces = [q for p in pieces for q in step(p, exact) if q]
        cache = self._cache
        for p in pieces:
            ids = cache.get(p)
            if ids is None:
                ids = self._bpe(p.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR))
                if len(cache) >= 100_000:
                    cache.clear()
                cache[p] = ids
            out += ids

    def _bpe(self, word: str) -> tuple:
        """HF's BPE on one pre-token (in the byte alphabet): merge the lowest-rank adjacent pair,
        the leftmost of equals, until no pair has a rank."""
        vocab = self._vocab
        if self.ignore_merges and word in vocab:
            return (vocab[word],)
        ids = []
        unk = self.unk_token
        for c in word:
            i = vocab.get(c)
            if i is None:
                if unk is None:
                    continue                        # HF drops a character it has no token for
                if self.fuse_unk and ids and ids[-1] == unk:
                    continue
                i = unk
            ids.append(i)
        n = len(ids)
        if n < 2:
            return tuple(ids)
        if n > 256:
            return self._bpe_heap(ids)
        get, stride = self._pairs.get, self._stride
        pv = [get(ids[i] * stride + ids[i + 1], _INF) for i in range(n - 1)]
        while pv:
            best = min(pv)
            if best == _INF:
                break
            i = pv.index(best)
            new = best & 0xFFFFFFFF
            ids[i] = new
            del ids[i + 1], pv[i]
            if i:
                pv[i - 1] = get(ids[i - 1] * stride + new, _INF)
            if i < len(pv):
                pv[i] = get(new * stride + ids[i + 1], _INF)
        return tuple(ids)

    def _bpe_heap(self, ids: list) -> tuple:
        """The same merges for a long piece, in O(n log n): tokenizers' heap of (rank, position)."""
        import heapq

        get, stride = self._pairs.get, self._stride
        n = len(ids)
        sym = list(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = [(v, i) for i in range(n - 1)
                if (v := get(sym[i] * stride + sym[i + 1])) is not None]
        heapq.heapify(heap)
        while heap:
            v, i = heapq.heappop(heap)
            if sym[i] is None or (j := nxt[i]) == -1 or get(sym[i] * stride + sym[j]) != v:
                continue                                  # an expired entry
            new = v & 0xFFFFFFFF
            sym[i], sym[j] = new, None
            k = nxt[i] = nxt[j]
            if k != -1:
                prv[k] = i
                if (w := get(new * stride + sym[k])) is not None:
                    heapq.heappush(heap, (w, i))
            if (p := prv[i]) != -1 and (w := get(sym[p] * stride + new)) is not None:
                heapq.heappush(heap, (w, p))
        return tuple(s for s in sym if s is not None)

    # ---- decoding ----

    def decode_bytes(self, ids) -> bytes:
        table, n = self._id_bytes, self.vocab_size
        return b"".join([table[i] for i in map(int, ids) if 0 <= i < n])

    def vocab_bytes(self) -> list[bytes]:
        """Each id's bytes (jaxgpt.grammar matches tokens by them); special tokens (and ids
        without a token) are b"": they spell no text."""
        special = set(self.special_tokens.values())
        return [b"" if i in special else b for i, b in enumerate(self._id_bytes)]

    def decode(self, ids) -> str:
        """The text of `ids` (special tokens as their text), invalid UTF-8 replaced by U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- saving ----

    def to_dict(self) -> dict:
        d = {"type": "bpe", "tokens": self.tokens,
             "merges": [m if isinstance(m, str) else (" ".join(m) if " " not in m[0] + m[1]
                                                     else list(m)) for m in self.merges],
             "added": [[a["id"], a["content"], a["special"]]
                       if not (a["lstrip"] or a["rstrip"] or a["single_word"] or a["normalized"])
                       else a for a in self.added],
             "bos": self.bos_token, "eos": self.eot_token, "add_bos": self.add_bos}
        if self.pre != [{"split": _HF_GPT2_SPLIT}]:
            d["pre"] = self.pre
        for key, value in (("normalizer", self.normalizer), ("ignore_merges", self.ignore_merges),
                           ("unk", self.unk_token), ("fuse_unk", self.fuse_unk),
                           ("chat_template", self.chat_template)):
            if value:
                d[key] = value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        return cls(d["tokens"], d["merges"], added=d.get("added", ()), pre=d.get("pre"),
                   normalizer=d.get("normalizer"), bos_token=d.get("bos"),
                   eos_token=d.get("eos"), add_bos=d.get("add_bos", False),
                   ignore_merges=d.get("ignore_merges", False), unk_token=d.get("unk"),
                   fuse_unk=d.get("fuse_unk", False), chat_template=d.get("chat_template"))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, {len(self.merges)} merges, "
                f"{len(self.special_tokens)} special, eot={self.eot_token})")

    # ---- sources ----

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "BPETokenizer":
        """From a GGUF file's metadata (key -> value), as transformers' GGUF loader builds it:
        `tokenizer.ggml.model` must be 'gpt2' (byte-level BPE); a token the file spells outside
        the byte alphabet is respelled as its UTF-8 bytes; CONTROL tokens (type 3) spelled in the
        alphabet become special, USER_DEFINED ones (type 4) plain added tokens, and so do the bos,
        eos, unk and pad tokens (special), and <|endoftext|> if the vocabulary has it. (A
        GGUFFile from jaxgpt.formats.gguf.read_gguf is taken too: its `.metadata`.)"""
        meta = getattr(meta, "metadata", meta)
        model = _meta_str(meta.get("tokenizer.ggml.model"))
        if model != "gpt2":
            kind = {"llama": "SentencePiece", "t5": "Unigram", "bert": "WordPiece",
                    "rwkv": "RWKV"}.get(model or "", "")
            raise ConfigError(f"GGUF tokenizer model {model!r}{f' ({kind})' if kind else ''} is not "
                              "supported; jaxgpt reads byte-level BPE ('gpt2') tokenizers only")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ConfigError("GGUF metadata has no tokenizer.ggml."
                              f"{'tokens' if tokens is None else 'merges'}; cannot build its BPE")
        tokens = [_meta_str(t) for t in tokens]
        merges = [_meta_str(m) for m in merges]
        types = meta.get("tokenizer.ggml.token_type")
        types = [] if types is None else [int(t) for t in types]
        pre_name = _meta_str(meta.get("tokenizer.ggml.pre")) or "default"
        if pre_name not in _GGUF_PRE_SPLITS:
            raise ConfigError(f"GGUF pre-tokenizer {pre_name!r} is not supported (supported: "
                              f"{', '.join(sorted(_GGUF_PRE_SPLITS))})")
        alphabet = set(_CHAR_TO_BYTE)
        spelled = [t if set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode())
                   for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        added: dict[str, dict] = {}
        for t, ty in zip(tokens, types):
            if ty == 3 and set(t) <= alphabet:
                added[t] = {"id": vocab[t], "content": t, "special": True}
        for t, ty in zip(tokens, types):
            if ty == 4 and t in vocab and t not in added:
                added[t] = {"id": vocab[t], "content": t, "special": False}
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id")
               for k in ("bos", "eos", "unknown", "padding")}
        named = [tokens[int(i)] for i in ids.values() if i is not None and 0 <= int(i) < len(tokens)]
        for t in named + [EOT]:
            if t in vocab:
                added[t] = {"id": vocab[t], "content": t, "special": True}
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
        return cls(spelled, merges, added=sorted(added.values(), key=lambda a: a["id"]),
                   pre=None if _GGUF_PRE_SPLITS[pre_name] == _HF_GPT2_SPLIT
                   else [{"split": _GGUF_PRE_SPLITS[pre_name]}],
                   bos_token=ids["bos"], eos_token=ids["eos"], add_bos=bool(add_bos),
                   chat_template=_meta_str(meta.get("tokenizer.chat_template")))

    @classmethod
    def from_hf_folder(cls, path) -> "BPETokenizer":
        """From a Hugging Face folder's tokenizer.json (+ tokenizer_config.json,
        special_tokens_map.json): a BPE model with a byte-level pre-tokenizer."""
        from pathlib import Path

        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ConfigError(f"{folder}: no tokenizer.json")
        try:
            spec = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{tj}: cannot read it ({e})") from None
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins
            p = folder / name
            if p.is_file():
                try:
                    cfg.update(json.loads(p.read_text(encoding="utf-8")))
                except ValueError as e:
                    raise ConfigError(f"{p}: not JSON ({e})") from None
        return cls._from_hf_spec(spec, cfg, str(tj))

    @classmethod
    def _from_hf_spec(cls, spec: dict, cfg: dict, where: str) -> "BPETokenizer":
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ConfigError(f"{where}: the tokenizer model is {model.get('type')!r}; jaxgpt "
                              "reads byte-level BPE tokenizers only")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise ConfigError(f"{where}: BPE {key} {model[key]!r} is not supported")
        if model.get("byte_fallback"):
            raise ConfigError(f"{where}: a BPE with byte_fallback (SentencePiece-style) is not "
                              "byte-level; not supported")
        if model.get("dropout"):
            raise ConfigError(f"{where}: BPE dropout {model['dropout']} is not supported")
        pre = _hf_pre_steps(spec.get("pre_tokenizer"), where)
        normalizer = _hf_normalizers(spec.get("normalizer"), where)
        dec = spec.get("decoder")
        decs = dec.get("decoders", []) if dec and dec.get("type") == "Sequence" else [dec]
        if not decs or any(not d or d.get("type") != "ByteLevel" for d in decs):
            raise ConfigError(f"{where}: decoder {json.dumps(dec)[:60]} is not byte-level; "
                              "not supported")

        vocab = model.get("vocab") or {}
        size = max(vocab.values(), default=-1) + 1
        tokens = [None] * size
        for t, i in vocab.items():
            tokens[int(i)] = t
        added = [{k: a[k] for k in ("id", "content", "special", "lstrip", "rstrip",
                                    "single_word", "normalized") if k in a}
                 for a in spec.get("added_tokens") or ()]
        by_content = {a["content"]: int(a["id"]) for a in added}

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            if not isinstance(value, str):
                return None
            if value in by_content:
                return by_content[value]
            return vocab.get(value, vocab.get("".join(_BYTE_TO_CHAR[b] for b in value.encode())))

        bos, eos = token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and _hf_post_adds(spec.get("post_processor"), bos)
        unk = model.get("unk_token")
        return cls(tokens, model.get("merges") or [], added=added, pre=pre, normalizer=normalizer,
                   bos_token=bos, eos_token=eos, add_bos=bool(add_bos),
                   ignore_merges=bool(model.get("ignore_merges")),
                   unk_token=None if unk is None else vocab.get(unk),
                   fuse_unk=bool(model.get("fuse_unk")), chat_template=_hf_chat_template(cfg))


def _hf_chat_template(cfg: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones ("default" wins)."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default", next(iter(named.values()), None))
    return t if isinstance(t, str) else None


def _meta_str(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8")
    return None if v is None else str(v)


def _hf_pre_steps(pt, where: str) -> list[dict]:
    """A tokenizer.json pre_tokenizer as BPETokenizer steps; it must contain a ByteLevel."""
    if pt is None:
        raise ConfigError(f"{where}: no pre_tokenizer, so not byte-level; not supported")
    items = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    steps, byte_level = [], False
    for p in items:
        kind = p.get("type")
        if kind == "ByteLevel":
            byte_level = True
            if p.get("add_prefix_space"):
                steps.append({"prefix_space": True})
            if p.get("use_regex", True):
                steps.append({"split": _HF_GPT2_SPLIT})
        elif kind == "Split":
            pat = p.get("pattern") or {}
            if "Regex" in pat:
                rx = pat["Regex"]
            elif "String" in pat:
                import regex
                rx = regex.escape(pat["String"])
            else:
                raise ConfigError(f"{where}: Split pattern {json.dumps(pat)[:60]} is not supported")
            behavior = {"Isolated": "isolated", "Removed": "removed",
                        "MergedWithPrevious": "merged_with_previous",
                        "MergedWithNext": "merged_with_next",
                        "Contiguous": "contiguous"}.get(p.get("behavior"))
            if behavior is None:
                raise ConfigError(f"{where}: Split behavior {p.get('behavior')!r} is not supported")
            step = {"split": rx}
            if behavior != "isolated":
                step["behavior"] = behavior
            if p.get("invert"):
                step["invert"] = True
            steps.append(step)
        elif kind == "Digits":
            steps.append({"split": r"\p{N}" if p.get("individual_digits") else r"\p{N}+"})
        else:
            raise ConfigError(f"{where}: pre-tokenizer {kind!r} is not supported (byte-level "
                              "BPE: Sequence of Split / Digits / ByteLevel)")
    if not byte_level:
        raise ConfigError(f"{where}: the pre-tokenizer has no ByteLevel step, so it is not "
                          "byte-level BPE; not supported")
    return steps


def _hf_normalizers(n, where: str) -> list[str]:
    if n is None:
        return []
    items = n.get("normalizers", []) if n.get("type") == "Sequence" else [n]
    out = []
    for x in items:
        if x.get("type") not in _NORMALIZERS:
            raise ConfigError(f"{where}: normalizer {x.get('type')!r} is not supported "
                              f"(supported: {', '.join(_NORMALIZERS)})")
        out.append(x["type"])
    return out


def _hf_post_adds(pp, bos: int) -> bool:
    """Whether a tokenizer.json post_processor puts the bos token first in a single sequence."""
    if not pp:
        return False
    if pp.get("type") == "Sequence":
        return any(_hf_post_adds(p, bos) for p in pp.get("processors", []))
    if pp.get("type") == "TemplateProcessing":
        single = pp.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"].get("id")
            ids = (pp.get("special_tokens", {}).get(name) or {}).get("ids") or []
            return bos in ids
    return False
