"""Atomic file output: a temp file beside the target, renamed into place only on success,
so an interrupted or failed write never leaves a half-written file. Also the muting of native
libraries' own stderr lines."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import I2EError


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty file next to ``path`` with the mode a plain ``open`` would give it
    (mkstemp's 0600 would survive the rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise I2EError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for writers that take a file name."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; it replaces ``path`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def copy_into_place(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Copy ``source`` to ``output`` atomically."""
    try:
        with atomic_path(output) as tmp:
            shutil.copyfile(source, tmp)
    except OSError as exc:
        raise I2EError(f"cannot write {output}: {exc.strerror}") from None
    return Path(output)


@contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block: native libraries (OpenCV's FFmpeg,
    PyTorch's profiler) print notes there that a user would take for errors, and that would
    break a one-line error or a JSON log. Python exceptions still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
