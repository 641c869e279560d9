"""Files written whole or not at all, and write failures as one line: the one place jaxgpt writes.

`atomic_write_bytes` / `atomic_write` / `atomic_write_json` (a temporary file, fsynced, renamed into
place), `atomic_dir` (a temporary folder renamed into place), `check_writable` (the out-folder
policy: absent or empty, unless --force), `check_permission`, `sha256_file`.

Write failures: a full disk, a missing permission, a read-only file system.

`writing(path)` turns an OSError raised while writing `path` into a WriteError, a ConfigError, so
every CLI prints `error: cannot write PATH: No space left on device` and exits with status 2.
`write_error(path, e)` does the same for an exception from a library that wraps the OSError
(orbax's checkpoint writes raise ValueError / RuntimeError around TensorStore's message, some
from a background thread), and gives None for anything that is not a failed write, which then
keeps its traceback as the bug it is. The writers themselves stay atomic (a temporary file or
folder renamed into place: atomic_write_bytes / atomic_dir below), so
a failed write leaves the previous file, shard or checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from jaxgpt.config import ConfigError

# how TensorStore / orbax spell the causes in the text of the errors they wrap
_CAUSES = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|"
                     r"Read-only file system|File too large|Input/output error|Operation not permitted")


class WriteError(ConfigError):
    """A file or folder that could not be written (its path and the cause, in one line)."""


def _chain(e: BaseException, depth: int = 0):
    """e, then its causes and contexts (and an exception group's members), depth-first."""
    if e is None or depth > 20:
        return
    yield e
    for sub in getattr(e, "exceptions", ()):  # ExceptionGroup
        yield from _chain(sub, depth + 1)
    yield from _chain(e.__cause__ or e.__context__, depth + 1)


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError | None:
    """A WriteError naming `path` if `e` (or what it wraps) is a failed write, else None."""
    for x in _chain(e):
        if isinstance(x, WriteError):
            return x
        if isinstance(x, OSError) and x.errno is not None:
            return WriteError(f"cannot write {path}: {x.strerror or os.strerror(x.errno)}")
    for x in _chain(e):
        found = _CAUSES.search(str(x))
        if found:
            return WriteError(f"cannot write {path}: {found.group(0)}")
    return None


@contextmanager
def writing(path: str | os.PathLike):
    """Inside the block, a failed write (any OSError, or a library's error wrapping one) becomes
    a WriteError naming `path`; every other error passes through unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        err = write_error(Path(path), e)
        if err is None:
            raise
        raise err from None


def atomic_write_bytes(path, chunks) -> None:
    """Write `chunks` (bytes-likes) to `path` via a tmp file + os.replace: all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path), open(tmp, "wb") as f:  # a full disk: WriteError naming `path`
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so readers see the old content or the whole new one, never a part (a failed
    write leaves no temporary file and is a one-line WriteError)."""
    atomic_write_bytes(path, [data])


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, [(json.dumps(obj, indent=1) + "\n").encode()])


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    """Yield a temporary sibling of `out` to write into; on success it is renamed to `out`.

    A failure inside the block removes the temporary directory, so nothing is left behind.
    An existing non-empty `out` is refused unless `force`, then replaced only once all is written.
    """
    out = Path(out)
    check_writable(out, force)
    with writing(out):  # a full disk, no permission: one line naming `out` (jaxgpt.files)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with writing(out):
            yield tmp
            if out.exists() and (out.is_file() or any(out.iterdir())):
                # swap: move the old output aside, move the new one in, then delete the old one
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "x"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old.parent)
            else:
                os.replace(tmp, out)  # replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(out: str | Path, force: bool = False, hint: str = "") -> None:
    """The out-folder policy of every command that writes one: ConfigError unless `out` is
    absent, an empty directory, or `force` is set (`hint`: what else the user may do)."""
    out = Path(out)
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty{hint}; pass --force to replace it")


def check_permission(out: str | Path) -> None:
    """Fail early (before anything is written) if `out` cannot be created or written."""
    out = probe = Path(out)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {out} is not writable")
