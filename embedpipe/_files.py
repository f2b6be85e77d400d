"""Files and folders embedpipe writes under the data directory, and what a failed write means.

* **Private.** The data directory holds the corpus's texts, the usage ledger and the
  gateway's audit log: folders are made 0700 and files 0600, set explicitly after
  creation so the process umask can neither widen nor narrow them. Folders that already
  exist keep their mode (a user may have chosen it).
* **Whole.** Small files are written to a temporary name, then renamed: a crash never
  leaves a half-written file that looks valid. Logs are appended one ``write`` per line
  to a file opened ``O_APPEND``, so concurrent writers never interleave.
* **Said in one line.** A read-only file system, a missing permission or a full disk
  (``OSError`` EROFS / EACCES / EPERM / ENOSPC / EDQUOT, and SQLite's "attempt to write
  a readonly database" / "database or disk is full") become a :class:`DataDirError`
  naming the folder and the fix (:func:`storage_error`, :func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedpipe.errors import DataDirError, DataDirReadOnly, DiskFull

__all__ = ["DIR_MODE", "FILE_MODE", "append_line", "create_private", "make_dir", "open_append",
           "storage_error", "sync_dir", "write_json", "write_text_atomic", "writing"]

DIR_MODE = 0o700
FILE_MODE = 0o600
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

_READ_ONLY = {errno.EROFS: "is on a read-only file system"}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_FULL = {errno.ENOSPC: "no space left on its device", errno.EDQUOT: "disk quota exceeded"}


def storage_error(exc: BaseException, where: Path | str) -> DataDirError | None:
    """The one-line error for a write that failed under ``where`` because the disk is
    read-only, not ours or full; None for any other error (a bug, a missing file)."""
    code = _errno_of(exc)
    target = getattr(exc, "filename", None) or where
    if code == "ioerr":  # SQLite says only "disk I/O error"; the disk itself tells why
        code = "full" if _no_space(Path(target)) else None
    again = "then re-run (an interrupted run resumes where it stopped)"
    if code in _READ_ONLY or code == "readonly":
        return DataDirReadOnly(
            f"{where} is read-only (writing {target}): remount it read-write or point data_dir "
            f"/ EMBEDPIPE_DATA_DIR at a writable folder, {again}; search, status and --dry-run "
            "work on a read-only data directory")
    if code in _DENIED:
        return DataDirReadOnly(
            f"permission denied writing {target} under {where}: run as the user that owns the "
            f"data directory or let this one write it, {again}")
    if code in _FULL or code == "full":
        what = _FULL.get(code, "no space left on its device")  # type: ignore[call-overload]
        return DiskFull(f"{where}: {what} (writing {target}); free some space, {again}")
    return None


def _errno_of(exc: BaseException) -> int | str | None:
    """The errno of an OSError, or "readonly"/"full" for the SQLite errors that mean so."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, sqlite3.OperationalError):
        name = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc).lower()
        # CANTOPEN: SQLite cannot even read a write-ahead-log database on read-only media.
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or "readonly database" in text \
                or "unable to open database file" in text:
            return "readonly"
        if name == "SQLITE_FULL" or "database or disk is full" in text:
            return "full"
        # e.g. creating the -shm index of a write-ahead log on a full disk
        if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
            return "ioerr"
    return None


def _no_space(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) is full."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def writing(where: Path | str) -> Iterator[None]:
    """Turn a read-only, forbidden or full disk under ``where`` into a DataDirError."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        converted = storage_error(exc, where)
        if converted is None:
            raise
        raise converted from exc


def make_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents 0700; existing folders keep their mode."""
    path = Path(path)
    if path.is_dir():
        return path
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    with writing(probe):
        for folder in reversed(missing):
            try:
                os.mkdir(folder, DIR_MODE)
            except FileExistsError:
                continue  # another process made it at the same moment
            os.chmod(folder, DIR_MODE)  # mkdir's mode went through the umask
    return path


def create_private(path: Path) -> int:
    """Create a new file 0600 and return its descriptor (open for writing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def open_append(path: Path, read: bool = False) -> int:
    """A descriptor appending to ``path`` (and readable with ``read``); a new file is 0600."""
    flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_APPEND | _CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(fd, FILE_MODE)
    return fd


def append_line(path: Path, line: bytes) -> None:
    """Append one line in one ``write`` (concurrent appends never interleave)."""
    with writing(path.parent):
        make_dir(path.parent)
        fd = open_append(path)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def write_json(path: Path, data: Any, durable: bool = False) -> Path:
    """Write JSON atomically (a temporary name, then a rename), 0600. ``durable`` also
    survives power loss: the file is synced before the rename and the folder after it."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str), durable)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """Write text atomically (a temporary name, then a rename), 0600; ``durable`` as in
    :func:`write_json`."""
    with writing(path.parent):
        make_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with os.fdopen(create_private(tmp), "w", encoding="utf-8") as fh:
                fh.write(text)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if durable:
                sync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # on a read-only disk even this fails
                tmp.unlink(missing_ok=True)
            raise
    return path


def sync_dir(path: Path) -> None:
    """fsync a folder, so a rename or a new file in it survives power loss."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
