"""Start and stop ``embedpipe serve``: own the data directory, listen, say where.

In order, each step failing with one line and nothing left behind:

1. refuse any address but loopback (API keys, which other addresses need, are not
   built yet);
2. take ``<data>/server.lock`` (flock): a second server on the same data directory
   stops here with IndexBusy naming the running one (its ``server.json``). The kernel
   drops the lock with the process, so a killed server never blocks the next;
3. open the engine (Qdrant Edge's ``engine.lock``): a CLI command or an application
   holding it stops the server with IndexBusy naming that process;
4. bind the socket (port 0: any free one), so the URL written next is the real one;
5. once uvicorn accepts connections, write ``<data>/server.json`` ({url, pid, started,
   version}, atomically, 0600); a stale one (its process gone) is replaced.

SIGTERM and Ctrl-C stop it gracefully: uvicorn finishes the requests in flight (a
documents batch completes, or never began), then ``server.json`` is removed, the engine
closed and the lock released.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from embedpipe._files import FILE_MODE, make_dir, write_json, writing
from embedpipe.errors import ConfigError, IndexBusy
from embedpipe.layout import Layout
from embedpipe.serve.info import ServerInfo, pid_alive, read_info

if TYPE_CHECKING:
    from embedpipe.config import Settings

__all__ = ["serve"]

log = logging.getLogger(__name__)


class _Stopped(BaseException):
    """SIGTERM, after uvicorn's graceful shutdown: leave by the cleanup path (a BaseException,
    like KeyboardInterrupt, so no `except Exception` on the way swallows it)."""


def serve(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[ServerInfo], None] | None = None,
) -> None:
    """Serve the data directory of ``settings`` until SIGTERM or Ctrl-C (see the module
    docstring). ``on_ready`` is called with what ``server.json`` says once it is written."""
    host = host or settings.server.host
    port = settings.server.port if port is None else port
    _require_loopback(host)
    layout = Layout(settings.data_dir)
    make_dir(layout.root)
    with _own(layout):
        from embedpipe.engine import close_all
        from embedpipe.index import IndexVersions

        try:
            IndexVersions.open(settings)  # the engine is ours now (and earlier data converted)
            sock = _bind(host, port)
            try:
                _run(settings, sock, layout, on_ready)
            finally:
                sock.close()
        finally:
            _forget(layout)
            close_all()


def _require_loopback(host: str) -> None:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc.strerror})") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ConfigError(
            f"--host {host}: embedpipe serve listens on loopback only (127.0.0.1, ::1, "
            "localhost) until it has API keys; put a reverse proxy that authenticates in front "
            "to reach it from elsewhere")


@contextlib.contextmanager
def _own(layout: Layout) -> Iterator[None]:
    """Hold ``server.lock`` for the server's lifetime, or IndexBusy naming its holder."""
    with writing(layout.root):
        fd = os.open(layout.server_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        running = read_info(layout.root)
        if running is not None and pid_alive(running.pid):
            raise IndexBusy(
                f"embedpipe serve is already running for {layout.root} at {running.url} (pid "
                f"{running.pid}, since {running.started}); use it, or stop it (kill -TERM "
                f"{running.pid}) first") from None
        raise IndexBusy(f"another embedpipe serve is starting or stopping for {layout.root}; "
                        "wait a moment and re-run") from None
    try:
        stale = read_info(layout.root)
        if stale is not None:  # its server is gone: it held the lock while it ran
            log.info("removing %s: it names pid %d, which no longer serves this data directory",
                     layout.server_info, stale.pid)
            with writing(layout.root):
                layout.server_info.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use; pick another with --port (0: any "
                              "free port) or stop what holds it") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.set_inheritable(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run(settings: Settings, sock: socket.socket, layout: Layout,
         on_ready: Callable[[ServerInfo], None] | None) -> None:
    import uvicorn

    from embedpipe import __version__
    from embedpipe.serve.app import create_app

    info = ServerInfo(url=_url(sock), pid=os.getpid(), version=__version__,
                      started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def announce() -> None:
        write_json(layout.server_info, info.to_dict())
        if on_ready is not None:
            on_ready(info)

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                announce()

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="info",
                            server_header=False, lifespan="on")
    with _sigterm_stops():
        try:
            Announcing(config).run(sockets=[sock])
        except (KeyboardInterrupt, _Stopped):
            pass  # uvicorn has shut down gracefully; the caller cleans up


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """uvicorn re-raises SIGTERM once it has shut down; turn that into ``_Stopped``, so
    the cleanup runs instead of the process dying on the default handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _forget(layout: Layout) -> None:
    """Remove ``server.json`` if it is this process's (never another server's)."""
    info = read_info(layout.root)
    if info is not None and info.pid == os.getpid():
        with contextlib.suppress(OSError):
            layout.server_info.unlink()
