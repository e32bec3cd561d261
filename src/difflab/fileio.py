"""Crash-safe file writes: write a temp file in the target's folder, fsync, rename over the target.

A reader sees either the old file or the complete new one, never a torn write; a crash leaves at
most a ``.tmp-*`` file behind, which readers ignore (see :func:`is_temp_name`).

Files end with mode 0o666 minus the process umask, as ``open(path, "w")`` makes them: the temp file
is created so (``tempfile.mkstemp`` makes 0o600, which would leave every result unreadable to other
users), and its mode is put back after the writer ran, since some writers replace the file they are
given with a 0o600 one of their own (``safetensors.torch.save_file`` 0.8). :func:`honour_umask` does
the same for a file written in place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def is_temp_name(name: str) -> bool:
    """True for the names this module gives to half-written files and folders."""
    return name.startswith(TEMP_PREFIX)


def make_temp_file(folder: str | os.PathLike, prefix: str) -> Path:
    """Create a new empty file ``folder/prefix<random>`` (O_EXCL) with mode 0o666 & ~umask; return its path.

    ``tempfile.mkstemp`` without its fixed 0o600: the kernel applies the umask to the 0o666 asked for.
    """
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary name {prefix}* in {folder}")


def new_file_mode() -> int:
    """0o666 & ~umask: the mode ``open(path, "w")`` gives a new file. Read from /proc (Linux) so the
    umask is never changed; elsewhere it is set and restored at once (racy only against other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def honour_umask(path: str | os.PathLike, mode: int | None = None) -> None:
    """Give the file at ``path`` the mode of a new file (``mode``, default :func:`new_file_mode`)."""
    mode = new_file_mode() if mode is None else mode
    if os.name != "nt" and (os.stat(path).st_mode & 0o7777) != mode:
        os.chmod(path, mode)


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
    tmp = make_temp_file(path.parent, TEMP_PREFIX + path.name + ".")
    mode = os.stat(tmp).st_mode & 0o7777  # 0o666 & ~umask (and any default ACL), set by the kernel
    try:
        yield tmp
        honour_umask(tmp, mode)
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


def require_new_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse an existing file, or a folder that holds anything: difflab writes only into a folder it starts.

    Raises ValueError naming ``what`` (e.g. ``"--out"``), the path and a few of the entries found.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file, not a folder; name a new folder")
    entries = sorted(e.name for e in p.iterdir()) if p.is_dir() else []
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(f"{what} {p} already holds {shown}; difflab writes only into a new or empty folder "
                         "and never over what is there: name another")
    return p
