"""The part every loopback test server shares: a ``ThreadingHTTPServer`` on 127.0.0.1,
served from a daemon thread, started and stopped once (``with`` or ``start``/``stop``).

Each server (``openai_server.LoopbackOpenAI``, ``hub_server.LoopbackHub``) brings its own
handler class and a service object holding its config and counters; the handler reaches
the service as ``self.server.service``.
"""

from __future__ import annotations

import copy
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

__all__ = ["CountingService", "LoopbackServer"]

Self = TypeVar("Self", bound="LoopbackServer")


class CountingService:
    """Thread-safe counters of a loopback service: ``self._counters`` (made by
    ``_zero_counters``), guarded by ``self._lock``, which the service also holds while it
    changes counters in place."""

    _lock: threading.Lock
    _counters: dict[str, Any]

    @staticmethod
    def _zero_counters() -> dict[str, Any]:
        raise NotImplementedError

    def bump(self, name: str, amount: int = 1, key: int | str | None = None) -> None:
        with self._lock:
            if key is None:
                self._counters[name] += amount
            else:
                self._counters[name][key] = self._counters[name].get(key, 0) + amount

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._counters)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = self._zero_counters()
            self._counters_reset()

    def _counters_reset(self) -> None:
        """What else a reset clears (under the lock)."""


class _HTTPServer(ThreadingHTTPServer):
    # A client holding a keep-alive socket, or a connection held on purpose (a timeout
    # fault), never blocks shutdown.
    daemon_threads = True
    service: Any


class LoopbackServer:
    """Serve ``handler`` with ``service`` on ``127.0.0.1:port`` (0: any free port)."""

    handler: type[BaseHTTPRequestHandler]
    thread_name = "loopback"

    def __init__(self, service: Any, *, port: int = 0) -> None:
        self._service = service
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running; call start() or use it in a with block")
        return self._httpd.server_address[1]

    def start(self: Self) -> Self:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self.handler)
        self._httpd.service = self._service
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=self.thread_name, daemon=True,
        )
        self._thread.start()
        return self

    def _before_stop(self) -> None:
        """What a server does before it stops listening (e.g. release held requests)."""

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._before_stop()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def configure(self, **changes: Any) -> None:
        """Change config fields atomically (validated)."""
        self._service.configure(**changes)

    def counters(self) -> dict[str, Any]:
        """A snapshot of what the server received and answered (see its module docstring)."""
        return self._service.counters()

    def reset_counters(self) -> None:
        self._service.reset_counters()

    def __enter__(self: Self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
