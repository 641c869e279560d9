"""Corpus sources -> a stream of documents, for `jaxgpt.prepare`.

A SOURCE is a text file, a directory (every non-hidden file under it, sorted by path), a glob,
a `.jsonl`/`.json` file of records, a `.parquet` file, any of these compressed (`.gz`, `.zst`),
or a Hugging Face dataset `hf:NAME[:CONFIG][:SPLIT]` (streamed with `datasets`; split defaults to
train). A plain text file is one document; a record (a jsonl line, an element of a json array,
a parquet row, a dataset row) is one document, its text in `text_field`.

Documents are yielded as *units* `(text, doc_start, progress)`: a long document is cut into
pieces of about `piece_chars` characters, so one huge file is still tokenized in parallel and
in bounded memory. Cuts are made only where GPT-2's pre-tokenizer regex (tiktoken's `gpt2`
pattern) and Llama 3's always end a token — just before a space that follows a non-space
character, or a newline that follows a letter or digit (Llama 3 keeps newlines with the
punctuation before them) — so the pieces' tokens, concatenated, are exactly the document's tokens. The cuts
depend only on the text, never on read sizes or worker counts.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Iterator

from jaxgpt.config import ConfigError

PIECE_CHARS = 1 << 20  # a document longer than this is tokenized in pieces of about this size
READ_BYTES = 1 << 20
_GLOB_CHARS = set("*?[")
_COMPRESSION = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_RECORD_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """One input: a file (`path`, `kind`, `compression`) or a Hugging Face dataset (`hf`)."""

    spec: str  # the SOURCE argument it came from
    kind: str  # text | jsonl | json | parquet | hf
    path: str | None = None
    compression: str | None = None  # gzip | zstd | None
    hf: tuple[str, str | None, str] | None = None  # (name, config, split)

    @property
    def label(self) -> str:
        return self.path if self.path is not None else self.spec

    def size(self) -> int:
        return os.path.getsize(self.path) if self.path is not None else 0

    def fingerprint(self) -> dict:
        """What identifies this input for a resumed or repeated preparation."""
        if self.kind == "hf":
            name, config, split = self.hf
            return {"hf": name, "config": config, "split": split}
        st = os.stat(self.path)
        return {"path": self.path, "kind": self.kind, "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------- sources


def _file_source(spec: str, path: str) -> Source:
    path = os.path.abspath(path)
    base, ext = os.path.splitext(path.lower())
    compression = _COMPRESSION.get(ext)
    if compression:
        ext = os.path.splitext(base)[1]
    return Source(spec=spec, kind=_RECORD_KINDS.get(ext, "text"), path=path,
                  compression=compression)


def _dir_files(d: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(out, key=lambda p: os.path.relpath(p, d).split(os.sep))


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise ConfigError(f"bad Hugging Face source {spec!r}; write hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def resolve_sources(specs) -> list[Source]:
    """Expand SOURCE arguments into files (and hf datasets), in order; ConfigError if one is
    missing or matches nothing."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out: list[Source] = []
    for spec in map(str, specs):
        if spec.startswith("hf:"):
            out.append(Source(spec=spec, kind="hf", hf=parse_hf(spec)))
        elif os.path.isfile(spec):
            out.append(_file_source(spec, spec))
        elif os.path.isdir(spec):
            files = _dir_files(spec)
            if not files:
                raise ConfigError(f"source directory {spec} holds no files")
            out.extend(_file_source(spec, f) for f in files)
        elif _GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            files = []
            for m in matches:
                files.extend(_dir_files(m) if os.path.isdir(m) else [m])
            if not files:
                raise ConfigError(f"source {spec} matches no files")
            out.extend(_file_source(spec, f) for f in files)
        else:
            raise ConfigError(f"source not found: {spec}")
    if not out:
        raise ConfigError("no SOURCE given")
    return out


def check_source(src: Source) -> None:
    """Cheap up-front checks (before anything is written): parquet footer and text column,
    the hf dataset opens."""
    if src.kind == "parquet":
        _parquet_file(src)
    elif src.kind == "hf":
        _hf_dataset(src)


# ----------------------------------------------------------------------------- cutting


def _last_cut(s: str, lo: int, hi: int) -> int:
    """Largest i in [lo, hi] (lo >= 1) where a token always ends: s[i] is ' ' and s[i-1] is not
    whitespace, or s[i] is '\\n' and s[i-1] a letter or digit; -1 if none. Newlines first."""
    for sep in ("\n", " "):
        j = s.rfind(sep, lo, hi + 1)
        while j >= lo and _no_cut(s, j):
            j = s.rfind(sep, lo, j)
        if j >= lo:
            return j
    return -1


def _no_cut(s: str, j: int) -> bool:
    return not s[j - 1].isalnum() if s[j] == "\n" else s[j - 1].isspace()


def _first_cut(s: str, lo: int) -> int:
    """Smallest i >= lo that is a cut; -1 if none in s."""
    best = -1
    for sep in ("\n", " "):
        j = s.find(sep, lo)
        while j != -1 and _no_cut(s, j):
            j = s.find(sep, j + 1)
        if j != -1 and (best == -1 or j < best):
            best = j
    return best


def next_cut(s: str, piece_chars: int, final: bool) -> int:
    """Where to end the next piece of `s` (the rest of a document), or -1 for "need more text".

    Rule (a function of the text only): the last cut in [piece/2, piece]; else the last in
    [1, piece/2); else the first after piece; with nothing left to read, the whole rest.
    """
    if len(s) <= piece_chars:
        return len(s) if final else -1
    j = _last_cut(s, max(1, piece_chars // 2), piece_chars)
    if j < 0:
        j = _last_cut(s, 1, max(1, piece_chars // 2) - 1)
    if j < 0:
        j = _first_cut(s, piece_chars + 1)
    if j < 0:
        return len(s) if final else -1
    return j


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces as `next_cut` rules (one piece when it is short)."""
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        rest = text[start:]
        j = next_cut(rest, piece_chars, final=True)
        pieces.append(rest[:j])
        start += j
    return pieces


# ----------------------------------------------------------------------------- reading


def _open_binary(src: Source):
    """(binary stream of the decompressed bytes, the raw file whose tell() is the progress)."""
    try:
        raw = open(src.path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read {src.path}: {e.strerror or e}") from None
    if src.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if src.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise ConfigError(f"{src.path} is zstd-compressed: pip install zstandard "
                              "(or jaxgpt[data])") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=READ_BYTES), raw
    return raw, raw


def _read_errors(src: Source):
    """Exception types that mean a corrupt or truncated (compressed) file."""
    errs = [EOFError, zlib.error, gzip.BadGzipFile, OSError]
    if src.compression == "zstd":
        try:
            import zstandard
            errs.append(zstandard.ZstdError)
        except ImportError:
            pass
    return tuple(errs)


def _corrupt(src: Source, e: Exception) -> ConfigError:
    what = {"gzip": "gzip", "zstd": "zstd"}.get(src.compression, "")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{src.path}: corrupt or truncated {what + ' ' if what else ''}file ({msg})")


def _iter_text(src: Source, base: int, piece_chars: int) -> Iterator[tuple[str, bool, int]]:
    f, raw = _open_binary(src)
    errs = _read_errors(src)
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    buf, first, nbytes = "", True, 0
    with f, raw:
        while True:
            try:
                block = f.read(READ_BYTES)
            except errs as e:
                raise _corrupt(src, e) from None
            final = not block
            try:
                buf += dec.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{src.path} is not UTF-8 text (byte {nbytes + e.start})") \
                    from None
            nbytes += len(block)
            while True:
                j = next_cut(buf, piece_chars, final)
                if j < 0 or (final and j == 0 and not first):
                    break
                piece, buf = buf[:j], buf[j:]
                yield piece, first, base + raw.tell()
                first = False
                if final and not buf:
                    break
            if final:
                if first:  # an empty file: one empty document
                    yield "", True, base + raw.tell()
                return


def _text_of(rec, field: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if field not in rec:
        keys = ", ".join(list(map(str, rec))[:8]) or "none"
        raise ConfigError(f"{where}: record has no {field!r} field (its fields: {keys}); "
                          "choose one with --text-field")
    t = rec[field]
    if not isinstance(t, str):
        raise ConfigError(f"{where}: field {field!r} is {type(t).__name__}, not a string")
    return t


def _records(texts, piece_chars: int):
    """Units of an iterable of (text, progress): each text is one document."""
    for text, pos in texts:
        for i, piece in enumerate(split_text(text, piece_chars)):
            yield piece, i == 0, pos


def _iter_jsonl(src: Source, field: str, base: int):
    f, raw = _open_binary(src)
    errs = _read_errors(src)
    with f, raw:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except errs as e:
                raise _corrupt(src, e) from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{src.path}:{lineno}: not valid JSON ({e})") from None
            yield _text_of(rec, field, f"{src.path}:{lineno}"), base + raw.tell()


def _iter_json(src: Source, field: str, base: int):
    """A .json file: a JSON array of records, one object, or JSON Lines under a .json name."""
    f, raw = _open_binary(src)
    errs = _read_errors(src)
    with f, raw:
        try:
            data = f.read()
        except errs as e:
            raise _corrupt(src, e) from None
    end = base + len(data) if src.compression is None else base + src.size()
    try:
        obj = json.loads(data)
    except ValueError as e:
        if data.lstrip()[:1] == b"{":  # maybe JSON Lines named .json
            yield from _iter_jsonl(src, field, base)
            return
        raise ConfigError(f"{src.path}: not valid JSON ({e})") from None
    if isinstance(obj, dict):
        yield _text_of(obj, field, f"{src.path}"), end
    elif isinstance(obj, list):
        for i, rec in enumerate(obj):
            yield _text_of(rec, field, f"{src.path}: record {i}"), end
    else:
        raise ConfigError(f"{src.path}: expected a JSON array of records, got {type(obj).__name__}")


def _parquet_file(src: Source):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{src.path} is parquet: pip install pyarrow") from None
    try:
        if src.compression:
            f, raw = _open_binary(src)
            with f, raw:
                data = f.read()
            import pyarrow as pa
            pf = pq.ParquetFile(pa.BufferReader(data))
        else:
            pf = pq.ParquetFile(src.path)
    except ConfigError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a bad footer or magic
        raise _corrupt(src, e) from None
    return pf


def _iter_parquet(src: Source, field: str, base: int):
    pf = _parquet_file(src)
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{src.path}: no {field!r} column (its columns: "
                          f"{', '.join(names[:8])}); choose one with --text-field")
    total = max(1, pf.metadata.num_rows)
    size, row = src.size(), 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            col = batch.column(0)
            for t in col.to_pylist():
                if not isinstance(t, str):
                    raise ConfigError(f"{src.path}: row {row}: {field!r} is "
                                      f"{'null' if t is None else type(t).__name__}, not a string")
                row += 1
                yield t, base + size * row // total
    except ConfigError:
        raise
    except Exception as e:
        raise _corrupt(src, e) from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host answers (skipped behind a proxy: assume it does)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    u = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, TypeError):
        return False


def _hf_dataset(src: Source):
    name, config, split = src.hf
    if "datasets" not in sys.modules and not os.environ.get("HF_HUB_OFFLINE") \
            and not _hub_reachable():
        # no network: let `datasets` use only its local cache, so an uncached dataset fails at
        # once with one line instead of half a minute of retry warnings
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{src.spec}: reading Hugging Face datasets needs the `datasets` "
                          "package: pip install 'jaxgpt[data]'") from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot open Hugging Face dataset {src.spec} (offline or unknown?): "
                          f"{type(e).__name__}: {first[:300]}") from None


def _iter_hf(src: Source, field: str, base: int):
    ds = _hf_dataset(src)
    pos = base
    it = iter(ds)
    i = 0
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"reading Hugging Face dataset {src.spec} failed at row {i}: "
                              f"{type(e).__name__}: {first[:300]}") from None
        t = _text_of(rec, field, f"{src.spec}: row {i}")
        pos += len(t)
        i += 1
        yield t, pos


def iter_units(sources: list[Source], text_field: str = "text",
               piece_chars: int = PIECE_CHARS) -> Iterator[tuple[str, bool, int]]:
    """(text piece, starts a document, progress in input bytes) for all sources in order."""
    base = 0
    for src in sources:
        if src.kind == "text":
            units = _iter_text(src, base, piece_chars)
        else:
            reader = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet,
                      "hf": _iter_hf}[src.kind]
            units = _records(reader(src, text_field, base), piece_chars)
        pos = base
        for unit in units:
            pos = unit[2]
            yield unit
        base = max(pos, base + src.size())  # hf sources count their text's characters
