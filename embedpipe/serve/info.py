"""``<data>/server.json``: where the server that owns a data directory listens.

The server writes it (atomically, 0600) once it accepts connections and removes it when
it stops cleanly. A file whose ``pid`` is gone was left by a server that was killed; the
next server replaces it. The file only says where to go: ownership itself is the
``server.lock`` flock the server holds (see ``runner``), which the kernel releases with
the process, so a killed server never blocks the next one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedpipe.layout import Layout

__all__ = ["ServerInfo", "mark_serving", "pid_alive", "read_info", "running_server", "serving"]

_serving = False  # set in the server's own process: it never goes through a server


@dataclass(frozen=True)
class ServerInfo:
    """What ``server.json`` holds."""

    url: str  # e.g. http://127.0.0.1:8765
    pid: int
    started: str  # ISO 8601, UTC
    version: str  # embedpipe's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_info(data_dir: Path) -> ServerInfo | None:
    """``server.json`` as written, or None when it is absent or unreadable."""
    try:
        raw = json.loads(Layout(Path(data_dir)).server_info.read_text(encoding="utf-8"))
        return ServerInfo(url=str(raw["url"]), pid=int(raw["pid"]), started=str(raw["started"]),
                          version=str(raw["version"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_server(data_dir: Path) -> ServerInfo | None:
    """The server ``server.json`` names, if its process is alive (None: no server)."""
    info = read_info(data_dir)
    return info if info is not None and pid_alive(info.pid) else None


def mark_serving() -> None:
    """Called by ``embedpipe serve``: this process owns the data directory itself, so the
    library in it must not send its work to a server (itself, or ``[server] url``)."""
    global _serving
    _serving = True


def serving() -> bool:
    """Whether this process is ``embedpipe serve``."""
    return _serving
