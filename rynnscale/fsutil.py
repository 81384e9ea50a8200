"""Crash-safe file writes (shared by checkpoints, shard sets, converters and the metrics log) and file checksums.

A reader must never see a half-written file: data goes to a hidden temp file in the same directory
(``.<name>.tmp-<random>``, which shard-set and checkpoint scans skip and clean up), is fsynced, then
renamed over the target (atomic on POSIX), and the directory is fsynced so the rename itself survives
a power loss. The file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask):
``mkstemp`` creates it 0600, which would hide manifests and checkpoint metadata from the other users of
a shared cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere
    set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str is UTF-8 encoded) to ``path``: temp file + fsync + rename + directory fsync."""
    p = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}{TMP_MARK}", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())   # mkstemp's 0600 -> what open() would create
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


class DirectoryLockedError(RuntimeError):
    """Another process holds a directory's lock (``directory_lock``)."""


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str, holder: str, remedy: str, name: str = ".lock"):
    """Hold an exclusive ``fcntl.flock`` on ``directory/name`` (holder's host, pid and start time written in it)
    for the ``with`` block: two jobs writing one directory (a run's checkpoints, a converter's shards) would
    overwrite each other's files. A second one fails at once naming the holder (``what`` says what the directory
    is, ``holder`` what holds it, ``remedy`` what to do). The kernel releases the lock when the holder exits in
    any way, so a stale file is never an obstacle. flock is advisory and per host on older network file system clients: a guard against
    the common mistake, not a distributed lease."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            try:
                h = json.loads(record)
                who = (f"host {h.get('host')!s} pid {h.get('pid')!s}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(h.get('started', 0))))}")
            except (ValueError, TypeError, AttributeError):
                who = f"holder unknown ({record[:200]!r})"
            raise DirectoryLockedError(f"{what} {directory} is in use by another {holder} ({who}; lock {path}); "
                                       f"{remedy}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the flock (the file stays: its content names the last holder)
