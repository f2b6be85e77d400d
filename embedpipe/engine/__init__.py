"""The vector engines behind one boundary (``base.Engine``), and the one place that picks.

``connect(settings)`` returns the process's engine for a configuration: Qdrant Edge
under ``<data>/engine`` unless ``qdrant.url`` names a Qdrant server. Engines are shared
per location within a process (Edge lets one process open a shard, and a server
client holds a connection pool); ``close_all`` releases them, as the process ends or
before another process must open the same data directory.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING

from embedpipe.engine.base import Engine, Scored, SpaceInfo
from embedpipe.engine.filters import Typed, Where, where_from

if TYPE_CHECKING:
    from embedpipe.config import Settings

__all__ = ["Engine", "Scored", "SpaceInfo", "Typed", "Where", "close_all", "connect", "where_from"]

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def location(settings: Settings) -> str:
    """What identifies an engine: the server URL, or the Edge folder."""
    from embedpipe.layout import Layout

    return settings.qdrant.url or f"edge:{Layout(settings.data_dir).engine}"


def connect(settings: Settings) -> Engine:
    """The shared engine for ``settings`` (opened on first use)."""
    key = location(settings)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _open(settings)
            if not _engines:
                atexit.register(close_all)  # before interpreter teardown, while imports work
            _engines[key] = engine
        return engine


def _open(settings: Settings) -> Engine:
    if settings.qdrant.url:
        from embedpipe.engine.server import ServerEngine
        from embedpipe.qdrant import connect as qdrant_client

        return ServerEngine(qdrant_client(settings), settings)
    from embedpipe.engine.edge import EdgeEngine
    from embedpipe.layout import Layout

    return EdgeEngine(Layout(settings.data_dir).engine, settings)


def close_all() -> None:
    """Close every engine and client of this process (releases Edge's locks)."""
    from embedpipe.qdrant import close_all as close_clients

    with _lock:
        for engine in _engines.values():
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        _engines.clear()
    close_clients()
