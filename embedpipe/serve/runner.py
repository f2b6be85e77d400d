"""Start and stop ``embedpipe serve``: own the data directory, listen, say where.

In order, each step failing with one line and nothing left behind:

1. read the API keys (``keys.KeyRing``: the key file and the key variable; an invalid
   one stops here), and refuse an address other than loopback unless there are keys
   (``check_host``);
2. take ``<data>/server.lock`` (flock): a second server on the same data directory
   stops here with IndexBusy naming the running one (its ``server.json``). The kernel
   drops the lock with the process, so a killed server never blocks the next;
3. open the engine (Qdrant Edge's ``engine.lock``): a CLI command or an application
   holding it stops the server with IndexBusy naming that process; then settle what a
   killed writer left (``ingest.settle``: a documents batch cut short by kill -9 is made
   whole or absent, as the corpus says, before any client can search);
4. bind the socket (port 0: any free one), so the URL written next is the real one;
5. once uvicorn accepts connections, write ``<data>/server.json`` ({url, pid, started,
   version}, atomically, 0600); a stale one (its process gone) is replaced. Its URL is
   one a client on this machine can use: loopback for a wildcard address (0.0.0.0, ::).

SIGTERM and Ctrl-C stop it gracefully: the socket stops accepting, idle connections are
closed, running jobs are told to stop at their next batch boundary (``jobs``: a
migration keeps its checkpoint, an ingest or sync is settled), uvicorn finishes the
requests in flight (a documents batch completes, or never began) and closes their
connections, the jobs are waited for, then ``server.json`` is removed, the engine closed
and the lock released. The wait is bounded by ``[server] shutdown_wait_s``: past it the
server logs what it leaves, removes ``server.json`` and exits 1 at once, as a kill
would; the next start settles the batch it cut short and marks the jobs it cut short
``interrupted``.
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
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from embedpipe._files import FILE_MODE, make_dir, write_json, writing
from embedpipe.errors import ConfigError, IndexBusy
from embedpipe.layout import Layout
from embedpipe.serve.info import ServerInfo, mark_serving, pid_alive, read_info

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.serve.keys import KeyRing

__all__ = ["check_host", "serve"]

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
    from embedpipe.serve.keys import KeyRing

    host = host or settings.server.host
    port = settings.server.port if port is None else port
    keys = KeyRing(settings)
    check_host(host, keys.required, settings)
    layout = Layout(settings.data_dir)
    make_dir(layout.root)
    with _own(layout):
        from embedpipe.engine import close_all

        from embedpipe.engine.edge import build_in_child

        mark_serving()
        build_in_child()  # an HNSW build holds the interpreter: it must not stop searches
        from embedpipe.index import IndexVersions

        try:
            IndexVersions.open(settings)  # the engine is ours now (and earlier data converted)
            _settle(settings)
            sock = _bind(host, port)
            try:
                _run(settings, keys, sock, layout, on_ready)
            finally:
                sock.close()
        finally:
            _forget(layout)
            close_all()


def _settle(settings: Settings) -> None:
    """Settle every index a killed writer left a journal for (``ingest.settle``); one
    that cannot be settled now (its model fails) is logged, and its next ingest retries."""
    from embedpipe.errors import EmbedpipeError
    from embedpipe.ingest import settle, unsettled

    for index in unsettled(settings):
        try:
            said = settle(settings, index)
        except EmbedpipeError as exc:
            log.warning("could not settle index %r (an interrupted write left documents the live "
                        "version and the corpus disagree on): %s", index, str(exc).splitlines()[0])
            continue
        if said:
            log.warning("%s", said)


def check_host(host: str, keyed: bool, settings: Settings) -> bool:
    """Whether ``host`` is loopback only; an address any other machine may reach is
    refused (ConfigError saying how to add keys) unless the server has API keys."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc.strerror})") from None
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not loopback and not keyed:
        raise ConfigError(
            f"--host {host} is not loopback, and listening there needs API keys: add one with "
            f"`embedpipe keys add NAME --index '*' --scope read` (hashed into {settings.key_file}) or "
            f"set ${settings.server.keys_env} (NAME:SCOPES:INDEXES:KEY); or listen on 127.0.0.1")
    return loopback


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
    """The URL a client on this machine uses: a wildcard address is reached on loopback."""
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host.split("%")[0]).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run(settings: Settings, keys: KeyRing, sock: socket.socket, layout: Layout,
         on_ready: Callable[[ServerInfo], None] | None) -> None:
    import uvicorn

    from embedpipe import __version__
    from embedpipe.serve.app import create_app

    info = ServerInfo(url=_url(sock), pid=os.getpid(), version=__version__,
                      started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def announce() -> None:
        server_log = logging.getLogger("uvicorn.error")  # configured by uvicorn: in the server's log
        server_log.info("%s", keys.describe())
        if not loopback:
            server_log.warning("listening on %s: plain HTTP, so API keys cross the network in clear; "
                               "put a TLS-terminating proxy in front", listening)
        write_json(layout.server_info, info.to_dict())
        if on_ready is not None:
            on_ready(info)

    deadline = _Deadline(settings.server.shutdown_wait_s, layout)
    app = create_app(settings, keys)
    jobs = app.state.embedpipe.jobs

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                announce()

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            deadline.start()
            jobs.stop(0)  # each stops at its next batch boundary; waited for below

    host, port = sock.getsockname()[:2]
    listening = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            server_header=False, lifespan="on")
    with _sigterm_stops():
        try:
            Announcing(config).run(sockets=[sock])
        except (KeyboardInterrupt, _Stopped):
            pass  # uvicorn has shut down gracefully; the caller cleans up
        finally:
            _stop_jobs(jobs, deadline)
            deadline.cancel()


def _stop_jobs(jobs: Any, deadline: _Deadline) -> None:
    """Cancel the running jobs and wait for them within what is left of the deadline."""
    left = jobs.stop(deadline.remaining())
    if left:  # the deadline's timer leaves without them
        logging.getLogger("uvicorn.error").warning(
            "stopping: jobs %s have not reached a batch boundary yet", ", ".join(left))


class _Deadline:
    """The bound on a graceful shutdown. uvicorn waits for every request in flight with no
    limit of its own, and even its own limit could not stop a request running in the
    threadpool (a documents batch embedding on a hung upstream): a thread cannot be
    cancelled, and the interpreter would wait for it at exit. Past ``wait_s`` this leaves
    at once (``os._exit``), as a kill -9 would: the engine's write-ahead log keeps what it
    acknowledged, and the next start settles the cut batch (``ingest.settle``)."""

    def __init__(self, wait_s: float, layout: Layout) -> None:
        self.wait_s = wait_s
        self.layout = layout
        self._timer: threading.Timer | None = None
        self._started: float | None = None

    def remaining(self) -> float:
        """Seconds left before it leaves (all of ``wait_s`` before a stop signal)."""
        if self._started is None:
            return self.wait_s
        return max(0.0, self._started + self.wait_s - time.monotonic())

    def start(self) -> None:
        """Called on each stop signal; the first starts the clock."""
        if self._timer is None:
            self._started = time.monotonic()
            self._timer = threading.Timer(self.wait_s, self._leave)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _leave(self) -> None:
        logging.getLogger("uvicorn.error").error(
            "stopping: requests or jobs still running after %g s ([server] shutdown_wait_s); leaving "
            "without them (a documents batch cut short is settled, whole or absent, when the server "
            "starts again; a job cut short is marked interrupted, and its command resumes it)",
            self.wait_s)
        _forget(self.layout)
        os._exit(1)


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
