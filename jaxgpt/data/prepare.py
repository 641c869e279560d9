"""Tokenize corpora into llm.c token shards: the library behind `python -m jaxgpt.prepare`.

    from jaxgpt.data.prepare import prepare
    manifest = prepare(["books/", "web.jsonl.gz", "hf:roneneldan/TinyStories"], "data/mix",
                       tokenizer="gpt2", workers=2, shard_tokens=100_000_000)

The sources (see `jaxgpt.corpus`) are read in order as one stream of documents; every document
is `<|endoftext|>` followed by its tokens (`encode_ordinary`: special-token text in a document is
plain text), as llm.c's and modded-nanogpt's fineweb scripts write it. The stream is cut into
shards (`jaxgpt.shards` format): the first `val_tokens` tokens (default: a whole shard) are
`val_000000.bin`, then `train_000001.bin`, ... of `shard_tokens` each (the last one shorter);
a document may continue into the next shard. `manifest.json`, written last, lists the sources,
the tokenizer, the document count and the shards in stream order with their sha256.

Workers tokenize chunks of about a megabyte of text in parallel (threads by default: tiktoken's
`encode_to_numpy` releases the GIL; or processes) and the results are written in order, so the
output is the same for any number of workers. Memory is bounded by one shard plus the chunks in
flight (2 per worker), not by the corpus (except a `.json` array file, which is parsed whole).

Resumable: each finished shard is recorded in `DIR/.prepare-state.json` with the stream position
where it ends; a run killed and started again with the same arguments keeps the finished shards
(checked against their sha256), skips their documents without tokenizing them and writes the
rest, byte-identical to an uninterrupted run. A bad input is a ConfigError and removes what the
run wrote; a DIR holding a different preparation is refused.

The char tokenizer's vocabulary is the corpus's distinct characters (sorted, a first pass over
the sources) plus `<|endoftext|>` as the last id (vocab_size = characters + 1).

`tokenizer` may also be a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json,
e.g. one `python -m jaxgpt.tokenizer train` wrote): its byte-level BPE encodes (jaxgpt's
BPETokenizer, the ids of `AutoTokenizer`), its `eos_token` goes before every document, and the
manifest carries the whole tokenizer, so the shards train and sample without the folder. A
vocabulary over 65,536 tokens gets uint32 shards (llm.c's Llama 3 format), else uint16. Pure-
Python BPE holds the GIL: use `backend="processes"` for parallel speed with such a tokenizer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxgpt.config import ConfigError
from jaxgpt.files import WriteError, writing
from jaxgpt.data.corpus import PIECE_CHARS, check_source, iter_units, resolve_sources
from jaxgpt.data.shards import GPT2_INFO, MANIFEST, MAX_SHARD_TOKENS, STATE, load_manifest, make_header, read_header, shard_format
from jaxgpt.files import atomic_write_bytes, atomic_write_json, sha256_file

DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's fineweb.py shard size
CHUNK_CHARS = 1 << 20  # text per worker task
CHUNK_UNITS = 4096  # at most this many documents per worker task
STATE_FORMAT = 1


# ----------------------------------------------------------------------------- encoders


def _fix_surrogates(text: str) -> str:
    # what tiktoken's encode_ordinary does with text that is not valid Unicode (lone surrogates)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Encoder:
    """Text -> token ids for one tokenizer description (`tokenizer_info`); picklable."""

    def __init__(self, info: dict):
        self.info = info
        self.eot = np.array([info["eot_token"]], dtype=np.uint32)
        self.dtype = shard_format(info["vocab_size"])[2]
        if info["type"] == "gpt2":
            from jaxgpt.tokenizers.tokenizer import GPT2Tokenizer
            self.enc = GPT2Tokenizer().enc
            self._np = hasattr(self.enc, "encode_to_numpy")
        elif info["type"] == "bpe":
            from jaxgpt.tokenizers.bpe import BPETokenizer
            self.bpe = BPETokenizer.from_dict(info)
        else:
            self.cps = np.array([ord(c) for c in info["chars"]], dtype=np.uint32)

    def __getstate__(self):
        return {"info": self.info}

    def __setstate__(self, state):
        self.__init__(state["info"])

    def encode(self, text: str) -> np.ndarray:
        if self.info["type"] == "gpt2":
            try:
                if self._np:
                    return self.enc.encode_to_numpy(text, allowed_special=set(),
                                                    disallowed_special=())
                return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)
            except UnicodeEncodeError:
                return self.encode(_fix_surrogates(text))
        if self.info["type"] == "bpe":
            try:
                return np.asarray(self.bpe.encode_ordinary(text), dtype=np.uint32)
            except UnicodeEncodeError:  # lone surrogates: U+FFFD, as for tiktoken
                return self.encode(_fix_surrogates(text))
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:
            cps = np.frombuffer(_fix_surrogates(text).encode("utf-32-le"), dtype=np.uint32)
        return np.searchsorted(self.cps, cps).astype(np.uint32)

    def chunk(self, texts: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of consecutive units (EOT before each document start), and each unit's count."""
        parts, lens = [], np.empty(len(texts), dtype=np.int64)
        for i, (t, s) in enumerate(zip(texts, starts)):
            a = self.encode(t)
            if s:
                parts.append(self.eot)
            parts.append(a)
            lens[i] = len(a) + bool(s)
        toks = np.concatenate(parts).astype(self.dtype) if parts else np.zeros(0, self.dtype)
        return toks, lens


_WORKER: Encoder | None = None


def _init_worker(info: dict) -> None:
    global _WORKER
    _WORKER = Encoder(info)


def _work(texts, starts):
    return _WORKER.chunk(texts, starts)


def char_info(sources, text_field: str, piece_chars: int = PIECE_CHARS) -> dict:
    """The char tokenizer of these sources: sorted distinct characters + EOT as the last id."""
    chars: set[str] = set()
    for text, _, _ in iter_units(sources, text_field, piece_chars):
        chars.update(text)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in chars):  # lone surrogates become U+FFFD
        chars = {c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF} | {"\ufffd"}
    s = "".join(sorted(chars))
    if len(s) + 1 > 65536:
        raise ConfigError(f"the corpus has {len(s)} distinct characters; a char vocabulary "
                          "must fit uint16 shards (65,535 characters + <|endoftext|>)")
    return {"type": "char", "name": "char", "chars": s, "vocab_size": len(s) + 1,
            "eot_token": len(s)}


def bpe_info(folder) -> dict:
    """The tokenizer description of a Hugging Face tokenizer folder: its whole BPE (to_dict),
    named by the folder, with its eos token as the end-of-text token."""
    from jaxgpt.tokenizers.tokenizer import load_tokenizer_dir

    tok = load_tokenizer_dir(folder)
    if tok.eot_token is None:
        raise ConfigError(f"{folder}: tokenizer_config.json declares no eos_token; prepare puts "
                          "it before every document")
    return {**tok.to_dict(), "name": os.path.basename(os.path.normpath(str(folder))),
            "vocab_size": int(tok.vocab_size), "eot_token": int(tok.eot_token)}


def _tokenizer_key(tokenizer: str):
    """What --tokenizer is in the resume config: the name, or a folder's tokenizer by content."""
    if tokenizer in ("gpt2", "char"):
        return tokenizer
    if not os.path.isdir(str(tokenizer)):
        raise ConfigError(f"unknown tokenizer {tokenizer!r}; choose gpt2, char or a tokenizer "
                          "folder (tokenizer.json)")
    info = bpe_info(tokenizer)
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return {"bpe": digest}, info


# ----------------------------------------------------------------------------- pipeline


@dataclass
class _Chunk:
    u0: int  # index of its first unit in the stream
    texts: list = field(default_factory=list)
    starts: list = field(default_factory=list)
    docs: int = 0
    pos: int = 0  # input bytes consumed after it
    chars: int = 0


def _chunks(units, skip_units: int, counts: dict):
    """Group units into worker tasks, after skipping the first `skip_units` (a resume)."""
    u = 0
    chunk = None
    for text, start, pos in units:
        if u < skip_units:
            counts["docs"] += start
            counts["pos"] = pos
            u += 1
            continue
        if chunk is None:
            chunk = _Chunk(u0=u)
        chunk.texts.append(text)
        chunk.starts.append(start)
        chunk.docs += start
        chunk.chars += len(text)
        chunk.pos = pos
        u += 1
        if chunk.chars >= CHUNK_CHARS or len(chunk.texts) >= CHUNK_UNITS:
            yield chunk
            chunk = None
    if u < skip_units:
        raise ConfigError(f"the sources hold fewer documents than the finished shards recorded "
                          f"({u} < {skip_units} pieces); were they changed?")
    if chunk is not None:
        yield chunk


def _encoded(chunks, info: dict, workers: int, backend: str):
    """(chunk, tokens, lens) in stream order, at most 2 * workers chunks in flight."""
    if workers == 1:
        enc = Encoder(info)
        for c in chunks:
            yield (c, *enc.chunk(c.texts, c.starts))
        return
    if backend == "threads":
        from concurrent.futures import ThreadPoolExecutor
        enc = Encoder(info)
        ex = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        submit = lambda c: ex.submit(enc.chunk, c.texts, c.starts)  # noqa: E731
        get = lambda f: f.result()  # noqa: E731
        close = lambda: ex.shutdown(wait=True, cancel_futures=True)  # noqa: E731
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(info,))
        submit = lambda c: pool.apply_async(_work, (c.texts, c.starts))  # noqa: E731
        get = lambda r: r.get()  # noqa: E731

        def close():
            pool.terminate()
            pool.join()
    pending = deque()
    try:
        for c in chunks:
            pending.append((c, submit(c)))
            if len(pending) >= 2 * workers:
                c0, f = pending.popleft()
                yield (c0, *get(f))
        while pending:
            c0, f = pending.popleft()
            yield (c0, *get(f))
    finally:
        close()


class _Writer:
    """Cuts the token stream into shards; records each finished one in the state file."""

    def __init__(self, out: str, state: dict, shard_tokens: int, val_tokens: int, on_shard):
        self.out, self.state = out, state
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.on_shard = on_shard
        self.dtype = shard_format(state["tokenizer"]["vocab_size"])[2]
        self.buf = np.empty(max(shard_tokens, val_tokens), dtype=self.dtype)
        self.fill = 0
        self.drop = 0  # tokens of the first unit already in the last kept shard (resume)

    @property
    def index(self) -> int:
        return len(self.state["shards"])

    def _cap_split(self) -> tuple[int, str]:
        if self.index == 0 and self.val_tokens > 0:
            return self.val_tokens, "val"
        return self.shard_tokens, "train"

    def add(self, toks: np.ndarray, lens: np.ndarray, u0: int) -> None:
        pos = 0
        if self.drop:
            pos = min(self.drop, len(toks))
            self.drop -= pos
        cum = None
        while pos < len(toks):
            cap, _ = self._cap_split()
            n = min(cap - self.fill, len(toks) - pos)
            self.buf[self.fill:self.fill + n] = toks[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == cap:
                if cum is None:
                    cum = np.concatenate([[0], np.cumsum(lens)])
                k = int(np.searchsorted(cum, pos, side="right")) - 1
                self._flush(end=[u0 + k, int(pos - cum[k])])

    def _flush(self, end) -> None:
        _, split = self._cap_split()
        name = f"{split}_{self.index:06d}.bin"
        toks = self.buf[:self.fill]
        header = make_header(self.fill, self.dtype).tobytes()
        h = hashlib.sha256(header)
        body = memoryview(toks).cast("B")
        h.update(body)
        atomic_write_bytes(os.path.join(self.out, name), [header, body])
        entry = {"file": name, "split": split, "tokens": int(self.fill), "sha256": h.hexdigest()}
        self.state["shards"].append({**entry, "end": end})
        atomic_write_json(os.path.join(self.out, STATE), self.state)
        self.fill = 0
        if self.on_shard is not None:
            self.on_shard({**entry, "index": self.index - 1})

    def finish(self, n_units: int) -> None:
        if self.fill:
            self._flush(end=[n_units, 0])


def _valid_prefix(out: str, shards: list[dict]) -> list[dict]:
    """The recorded shards that are still on disk intact, up to the first that is not."""
    kept = []
    for s in shards:
        p = os.path.join(out, s["file"])
        try:
            if read_header(p) != s["tokens"] or sha256_file(p) != s["sha256"]:
                break
        except (ConfigError, OSError):
            break
        kept.append(s)
    return kept


def _diff(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return k
    return "?"


def _remove_tmp(out: str) -> None:
    for p in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        base = os.path.basename(p)
        if base.startswith((".train_", ".val_", f".{MANIFEST}.", f".{STATE}.")):
            os.unlink(p)


def _cleanup(out: str, created: bool) -> None:
    """After a bad input: remove every file of this preparation (nothing half-written)."""
    st = os.path.join(out, STATE)
    try:
        with open(st) as f:
            shards = json.load(f).get("shards", [])
    except (OSError, ValueError):
        shards = []
    for s in shards:
        try:
            os.unlink(os.path.join(out, s["file"]))
        except OSError:
            pass
    try:
        os.unlink(st)
    except OSError:
        pass
    _remove_tmp(out)
    if created:
        try:
            os.rmdir(out)
        except OSError:
            pass


def prepare(sources, out, tokenizer: str = "gpt2", workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, val_tokens: int | None = None,
            text_field: str = "text", backend: str = "auto", progress: bool = False,
            on_shard=None, piece_chars: int = PIECE_CHARS, log=None) -> dict:
    """Tokenize `sources` into llm.c shards under `out`; returns the manifest (a dict).

    `val_tokens`: tokens of the first (val) shard; None = a whole shard, 0 = no val shard.
    `on_shard(entry)` is called after each shard is written and recorded. A second call with
    the same arguments returns the existing manifest; after a kill it resumes (module doc).
    """
    key = _tokenizer_key(str(tokenizer))
    key, bpe = key if isinstance(key, tuple) else (key, None)
    if int(workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if backend not in ("auto", "threads", "processes"):
        raise ConfigError(f"unknown backend {backend!r}; choose auto, threads or processes")
    if backend == "auto":  # a folder's BPE is Python (holds the GIL); tiktoken releases it
        backend = "processes" if bpe is not None and int(workers) > 1 else "threads"
    if not 1 <= int(shard_tokens) <= MAX_SHARD_TOKENS:
        raise ConfigError(f"--shard-tokens must be in 1..{MAX_SHARD_TOKENS}, got {shard_tokens}")
    val_tokens = int(shard_tokens) if val_tokens is None else int(val_tokens)
    if not 0 <= val_tokens <= MAX_SHARD_TOKENS:
        raise ConfigError(f"--val-tokens must be in 0..{MAX_SHARD_TOKENS}, got {val_tokens}")
    if not text_field:
        raise ConfigError("--text-field must not be empty")
    workers, shard_tokens = int(workers), int(shard_tokens)
    log = log or (lambda msg: None)
    out = os.path.abspath(str(out))

    specs = [str(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    srcs = resolve_sources(specs)
    for s in srcs:
        check_source(s)
    config = {"format": STATE_FORMAT, "inputs": [s.fingerprint() for s in srcs],
              "tokenizer": key, "shard_tokens": shard_tokens, "val_tokens": val_tokens,
              "text_field": text_field, "piece_chars": int(piece_chars)}

    # what is already in `out`?
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a directory")
    state = None
    if os.path.isdir(out):
        manifest = load_manifest(out)
        if manifest is not None:
            if manifest.get("config") != config:
                raise ConfigError(f"--out {out} already holds a different preparation "
                                  f"({_diff(manifest.get('config') or {}, config)} differs); "
                                  "choose another --out or remove it")
            for s in manifest["shards"]:
                if read_header(os.path.join(out, s["file"])) != s["tokens"]:
                    raise ConfigError(f"shard {s['file']} in {out} disagrees with its manifest")
            log(f"{out} already holds this preparation ({len(manifest['shards'])} shards)")
            return manifest
        st = os.path.join(out, STATE)
        if os.path.exists(st):
            try:
                with open(st) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = None  # a damaged state file: start over
            if state is not None and state.get("config") != config:
                raise ConfigError(f"--out {out} holds an unfinished different preparation "
                                  f"({_diff(state.get('config') or {}, config)} differs); "
                                  "choose another --out or remove it")
        elif glob.glob(os.path.join(glob.escape(out), "*.bin")):
            raise ConfigError(f"--out {out} already holds .bin files that are not from this "
                              "preparation; choose another --out")

    created = not os.path.exists(out)
    try:
        if state is not None:
            kept = _valid_prefix(out, state["shards"])
            state["shards"] = kept
            info = state["tokenizer"]
            log(f"resuming {out}: {len(kept)} finished shards kept")
        else:
            info = (bpe if bpe is not None else dict(GPT2_INFO) if tokenizer == "gpt2"
                    else char_info(srcs, text_field, piece_chars))
            state = {"config": config, "tokenizer": info, "shards": []}
        with writing(out):
            os.makedirs(out, exist_ok=True)
        _remove_tmp(out)
        atomic_write_json(os.path.join(out, STATE), state)
        return _run(srcs, specs, out, state, config, info, workers, backend, progress,
                    on_shard, log)
    except WriteError:  # a full disk: the finished shards stay, and a rerun resumes after them
        raise
    except ConfigError:
        _cleanup(out, created)
        raise


def _run(srcs, specs, out, state, config, info, workers, backend, progress, on_shard, log):
    shard_tokens, val_tokens = config["shard_tokens"], config["val_tokens"]
    writer = _Writer(out, state, shard_tokens, val_tokens, on_shard)
    skip_units, drop = state["shards"][-1]["end"] if state["shards"] else (0, 0)
    writer.drop = drop
    counts = {"docs": 0, "pos": 0}
    n_tokens = sum(s["tokens"] for s in state["shards"]) - drop

    total = None if any(s.kind == "hf" for s in srcs) else sum(s.size() for s in srcs)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
               disable=not progress, mininterval=0.5, smoothing=0.1)
    t0, docs_run, toks_run, last = time.perf_counter(), 0, 0, 0.0
    units = iter_units(srcs, config["text_field"], config["piece_chars"])
    n_units = skip_units
    try:
        for chunk, toks, lens in _encoded(_chunks(units, skip_units, counts), info, workers,
                                          backend):
            writer.add(toks, lens, chunk.u0)
            n_units = chunk.u0 + len(chunk.texts)
            n_tokens += len(toks)
            docs_run += chunk.docs
            toks_run += len(toks)
            bar.update(max(0, chunk.pos - bar.n))
            now = time.perf_counter()
            if progress and now - last > 0.5:
                el = max(now - t0, 1e-9)
                bar.set_postfix_str(f"{docs_run / el:,.0f} docs/s, {toks_run / el:,.0f} tok/s, "
                                    f"{len(state['shards'])} shards", refresh=False)
                last = now
        n_units = max(n_units, skip_units)
        if total is not None:
            bar.update(max(0, total - bar.n))
    finally:
        bar.close()
    documents = counts["docs"] + docs_run
    if documents == 0:
        raise ConfigError("the sources hold no documents")
    if val_tokens > 0 and n_tokens <= val_tokens:
        raise ConfigError(f"the corpus gives {n_tokens} tokens, all of them in the validation "
                          f"shard (--val-tokens {val_tokens}); pass a smaller --val-tokens")
    writer.finish(n_units)
    shards = [{k: s[k] for k in ("file", "split", "tokens", "sha256")} for s in state["shards"]]
    magic, version, dtype = shard_format(info["vocab_size"])
    manifest = {
        "format": "llm.c token shards: 256 x int32 header (magic, version, token count), "
                  f"then {dtype.name} tokens",
        "magic": magic, "version": version,
        "sources": specs,
        "tokenizer": info,
        "documents": int(documents),
        "tokens": int(sum(s["tokens"] for s in shards)),
        "shard_tokens": shard_tokens, "val_tokens": val_tokens,
        "text_field": config["text_field"],
        "shards": shards,
        "config": config,
    }
    atomic_write_json(os.path.join(out, MANIFEST), manifest)
    os.unlink(os.path.join(out, STATE))
    n_val = sum(s["tokens"] for s in shards if s["split"] == "val")
    log(f"prepared {documents:,} documents, {manifest['tokens']:,} tokens "
        f"({n_val:,} val) in {len(shards)} shards: {os.path.join(out, MANIFEST)}")
    return manifest
