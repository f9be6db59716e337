"""Files written atomically: a reader sees the old file or the new one, never half of one.

Every file the project writes for others to read (run folder, data cache, checkpoints,
results, certificates) goes through :func:`write_bytes`: a temporary file in the same folder,
its mode set, written, flushed to disk, renamed over the target, and the folder flushed too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (its folder is created if missing).

    Parameters
    ----------
    path : Path
        The file to write or replace.
    data : bytes
        Its whole new content.
    mode : int, optional
        Its permission bits, set before any byte is written (``0o600``: private to this user),
        whatever the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes`."""
    write_bytes(path, text.encode("utf-8"), mode)
