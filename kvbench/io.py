"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from kvbench.errors import KvbenchError


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A new file gets the usual permissions (0o666 less the umask, applied by the kernel when the
    temp file is created); a replaced file keeps its mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if path.exists():
            os.fchmod(fd, path.stat().st_mode & 0o7777)
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """OSError naming `path` unless a file can be written there now: not a folder, its folder
    made (if missing) and writable, probed by creating and removing a temp file in it."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a folder")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OSError(f"cannot write {path}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """ValueError naming `flag` where `path` cannot be a folder because it, or a folder above it,
    is a file; checked before any work whose results go there."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking == path:
        raise KvbenchError(f"{flag} {path} is a file; give a folder")
    if blocking is not None:
        raise KvbenchError(f"{flag} {path}: {blocking} is a file; give a folder")
    return path


def remove_stale_temp_files(paths: list[Path], older_than_s: float) -> list[Path]:
    """Remove the `write_atomic` temp files among `paths` last modified more than
    `older_than_s` ago (a killed writer's: a live write renames its file within seconds)."""
    removed = []
    for tmp in paths:
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed
