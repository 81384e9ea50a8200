"""Crash-safe file writes (shared by checkpoints, shard sets, converters and the metrics log) and file checksums.

A reader must never see a half-written file: data goes to a hidden temp file in the same directory
(``.<name>.tmp-<random>``, which shard-set and checkpoint scans skip and clean up), is fsynced, then
renamed over the target (atomic on POSIX), and the directory is fsynced so the rename itself survives
a power loss.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes renames / creations inside it durable); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str is UTF-8 encoded) to ``path``: temp file + fsync + rename + directory fsync."""
    p = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}{TMP_MARK}", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
