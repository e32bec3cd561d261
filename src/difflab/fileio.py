"""Crash-safe file writes: write a temp file in the target's folder, fsync, rename over the target.

A reader sees either the old file or the complete new one, never a torn write; a crash leaves at
most a ``.tmp-*`` file behind, which readers ignore (see :func:`is_temp_name`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def is_temp_name(name: str) -> bool:
    """True for the names this module gives to half-written files and folders."""
    return name.startswith(TEMP_PREFIX)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entry table, so a rename inside it survives a power cut (no-op on Windows)."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on a clean exit, fsync it and rename it onto ``path``.

    Whatever writes to the yielded path (``safetensors.torch.save_file``, ``torch.save``, ...)
    becomes visible under ``path`` all at once. On an exception the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
