"""Write failures as one line: a full disk, a missing permission, a read-only file system.

`writing(path)` turns an OSError raised while writing `path` into a WriteError, a ConfigError, so
every CLI prints `error: cannot write PATH: No space left on device` and exits with status 2.
`write_error(path, e)` does the same for an exception from a library that wraps the OSError
(orbax's checkpoint writes raise ValueError / RuntimeError around TensorStore's message, some
from a background thread), and gives None for anything that is not a failed write, which then
keeps its traceback as the bug it is. The writers themselves stay atomic (a temporary file or
folder renamed into place, jaxgpt.data.shards.atomic_write_bytes / jaxgpt.formats.checkpoint.atomic_dir), so
a failed write leaves the previous file, shard or checkpoint as it was.
"""

from __future__ import annotations

import os
import re
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
