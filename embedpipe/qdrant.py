"""Opening qdrant-client: a Qdrant server (the server engine), or local mode (the stand-in
for a server in tests and benchmarks); errors converted here.

Local mode allows one client per folder and per process (it holds a lock file), so
clients are shared through a small per-process cache keyed by location.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from embedpipe.errors import QdrantUnavailable

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from embedpipe.config import Settings

__all__ = ["close_all", "connect", "prefer_wal"]

log = logging.getLogger(__name__)

_clients: dict[str, QdrantClient] = {}
_lock = threading.Lock()


def _location(settings: Settings) -> str:
    return settings.qdrant.url or f"path:{settings.qdrant_path}"


def connect(settings: Settings) -> QdrantClient:
    """The shared client for the configured Qdrant; fails with a clear error if unreachable."""
    key = _location(settings)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _open(settings)
            if not _clients:
                # Close before interpreter teardown: qdrant-client's __del__ fails noisily then.
                atexit.register(close_all)
            _clients[key] = client
        return client


def _open(settings: Settings) -> QdrantClient:
    from qdrant_client import QdrantClient

    q = settings.qdrant
    if q.url:
        api_key = q.api_key.get_secret_value() if q.api_key else None
        if api_key:  # the same rule as for model endpoints: no key in clear text
            from embedpipe.backends._openai import check_key_transport

            check_key_transport(q.url, "the Qdrant connection", "[qdrant]", q.allow_insecure_key)
        client = QdrantClient(
            url=q.url, api_key=api_key, timeout=math.ceil(q.timeout_s), check_compatibility=False
        )
        try:
            client.get_collections()
        except Exception as exc:  # noqa: BLE001 - any transport error means unreachable
            client.close()
            reason = type(exc).__name__
            raise QdrantUnavailable(
                f"cannot reach Qdrant at {q.url} ({reason}); start the server or fix "
                "qdrant.url / EMBEDPIPE_QDRANT_URL (unset it to use the embedded Qdrant Edge)"
            ) from None  # the transport error can echo request headers; keep it out
        return client
    path = settings.qdrant_path
    from embedpipe._files import make_dir, writing
    from embedpipe._qdrant_readonly import open_read_only, writable

    if not writable(path):  # reads still work, from a copy; writes are refused
        return open_read_only(path)  # type: ignore[return-value]
    make_dir(path)
    try:
        with writing(path):
            client = QdrantClient(path=str(path))
    except RuntimeError as exc:
        from embedpipe.errors import IndexBusy

        # Busy, not broken: another process holds the folder; exit 75, try again later.
        raise IndexBusy(
            f"Qdrant local storage {path} is in use by another process ({exc}); wait for it to "
            "finish, or run a Qdrant server and set qdrant.url for concurrent access"
        ) from exc
    prefer_wal(settings)  # collections made before embedpipe set it, or by another tool
    return client


def prefer_wal(settings: Settings, collection: str | None = None) -> None:
    """Put local-mode collections' SQLite files (one, or all) in write-ahead-log mode.

    Qdrant local mode commits every point on its own. In SQLite's default rollback
    journal each commit creates, syncs and deletes a journal file; with a write-ahead
    log it appends to one file and syncs that: just as durable (``synchronous`` stays
    FULL), and about a third of the wall time and under half the CPU of the writer
    thread, which shares the cores with the model (``bench/qdrant_journal.py``). The
    mode is stored in the file, so setting it once is enough, and Qdrant's own open
    connection follows it from its next write. Best effort: a file laid out otherwise,
    or busy, is left as it is.
    """
    if settings.qdrant.url:
        return
    root = settings.qdrant_path / "collection"
    folders = [root / collection] if collection else sorted(root.glob("*"))
    for folder in folders:
        _set_wal(folder / "storage.sqlite")


def _set_wal(path: Path) -> None:
    if not path.is_file():
        return
    try:
        # Private like the rest of the data directory; SQLite gives its -wal and -shm
        # files the database's mode.
        os.chmod(path, 0o600)
    except OSError:
        pass  # not ours to change, or read-only: left as it is
    try:
        con = sqlite3.connect(path, timeout=0.5)
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.debug("left %s in its journal mode: %s", path, exc)


def close_all() -> None:
    """Close every cached client (releases local-mode locks)."""
    with _lock:
        for client in _clients.values():
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        _clients.clear()
