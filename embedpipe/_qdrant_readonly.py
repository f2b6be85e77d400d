"""Qdrant local storage on a read-only data directory: searched, never changed.

qdrant-client's local mode cannot open a folder it may not write: it opens its lock file
for writing, and embedpipe keeps its SQLite files in write-ahead-log mode, which SQLite
cannot even read on read-only media (it must create the ``-shm`` index beside them). So
when the folder is read-only, embedpipe copies it to a temporary folder, opens the copy,
and hands out a client that answers reads and refuses every write with
DataDirReadOnly: ``search``, ``status`` and dry runs work, and nothing can pretend to
have written. The copy is removed when the client is closed.

It costs the storage's size on the temporary folder's disk, once per process; local
mode holds every point in memory anyway, so it is meant for small indexes. A folder
another machine writes while it is copied may be copied mid-change: a snapshot read.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from embedpipe._files import storage_error, writing

__all__ = ["ReadOnlyQdrant", "open_read_only", "writable"]

log = logging.getLogger(__name__)

# Client methods that only read; anything else is refused.
READS = frozenset({
    "collection_exists", "count", "discover", "facet", "get_aliases", "get_collection",
    "get_collection_aliases", "get_collections", "info", "query_batch_points", "query_points",
    "query_points_groups", "recommend", "retrieve", "scroll", "search", "search_batch",
    "search_groups",
})


def writable(path: Path) -> bool:
    """Whether this process may write ``path`` (the nearest existing folder when it does
    not exist yet), and its lock file. Root passes permission bits, not a read-only mount."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    lock = probe / ".lock"
    return os.access(probe, os.W_OK) and (not lock.exists() or os.access(lock, os.W_OK))


class ReadOnlyQdrant:
    """A QdrantClient over a copy of read-only storage that refuses every write."""

    def __init__(self, client: Any, origin: Path, copy: Path) -> None:
        self._client = client
        self._origin = origin
        self._copy = copy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in READS or not callable(attr):
            return attr
        return self._refuse

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        refused = OSError(errno.EROFS, os.strerror(errno.EROFS), str(self._origin))
        raise storage_error(refused, self._origin) from None  # type: ignore[misc]

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            shutil.rmtree(self._copy, ignore_errors=True)


def open_read_only(path: Path) -> ReadOnlyQdrant:
    """Open a read-only copy of the local storage at ``path`` (empty when it does not exist)."""
    from qdrant_client import QdrantClient

    copy = Path(tempfile.mkdtemp(prefix="embedpipe-qdrant-read-only-"))
    storage = copy / "storage"
    try:
        with writing(copy):  # a full temporary disk is one line too
            if path.is_dir():
                shutil.copytree(path, storage, ignore=shutil.ignore_patterns(".lock"))
            client = QdrantClient(path=str(storage))
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    log.info("%s is read-only: searching a copy of it in %s", path, copy)
    return ReadOnlyQdrant(client, path, copy)
