"""Wall-clock deadlines for OpenAI-protocol requests, enforced under the SDK.

httpx timeouts bound each read, not the request: a server trickling a byte every 50 ms,
or a stream sending SSE keep-alive comments, never trips a 1 s read timeout and can hold
a caller for minutes. Here a :class:`Deadline` bounds the whole request instead:

1. ``scope(deadline)`` makes it the deadline of the requests sent in that block (a
   context variable, so each thread has its own);
2. the HTTP client's request hook clamps the connect, write and read timeouts to the
   time left, so waiting for the response headers ends by the deadline;
3. its response hook wraps the body: the deadline is checked between received chunks,
   and a watchdog thread shuts the connection down when the deadline passes while a
   read is blocked. Either way the caller gets the SDK's own timeout error
   (``openai.APITimeoutError``, or the HTTP library's ``ReadTimeout`` from a stream).

A stream's deadline may be moved later once its first token arrives (``extend_to``):
the first-token limit becomes the whole-request limit on the same connection.

The same hooks drop the ``Authorization`` header of an endpoint configured without a
key: the SDK insists on a key string and would otherwise send a placeholder.
"""

from __future__ import annotations

import contextvars
import heapq
import importlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

__all__ = ["Deadline", "event_hooks", "http_module", "scope"]

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "embedpipe_deadline", default=None)
_EXTENSION = "embedpipe_deadline"  # where the request hook leaves the deadline for the response hook


class Deadline:
    """A point in time a request must be done by (``time.monotonic()`` based)."""

    def __init__(self, seconds: float, what: str) -> None:
        self.start = time.monotonic()
        self.at = self.start + seconds
        self.what = what  # the setting that set it, for messages: "timeout_s = 2"

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def extend_to(self, seconds: float, what: str) -> None:
        """Move the deadline to ``seconds`` after the start (a stream's first token came:
        from now on the whole-request limit applies)."""
        self.at, self.what = self.start + seconds, what


@contextmanager
def scope(deadline: Deadline) -> Iterator[Deadline]:
    """Requests sent in this block (in this thread) end by ``deadline``."""
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


@cache
def http_module() -> Any:
    """The HTTP library the installed openai SDK is built on: httpx, or its fork httpx2
    (openai 3.x). Its exception and stream types are the ones the SDK understands."""
    import openai

    base = next(c for c in openai.DefaultHttpxClient.__mro__
                if not c.__module__.startswith("openai") and c is not object)
    return importlib.import_module(base.__module__.partition(".")[0])


def event_hooks(send_key: bool, deadline_s: float) -> dict[str, list[Callable[[Any], None]]]:
    """``event_hooks`` for the SDK's HTTP client: every request ends within
    ``deadline_s`` unless a ``scope`` sets its deadline, and carries no key header when
    the endpoint has no key (``send_key`` False)."""

    def on_request(request: Any) -> None:
        if not send_key:
            request.headers.pop("Authorization", None)
        deadline = _current.get() or Deadline(deadline_s, f"timeout_s = {deadline_s:g}")
        left = deadline.remaining()
        if left <= 0:
            raise http_module().ReadTimeout(f"{deadline.what} passed before sending", request=request)
        configured = dict(request.extensions.get("timeout") or {})
        # Until the headers arrive every wait ends by the deadline.
        request.extensions["timeout"] = {k: left if v is None else min(v, left) for k, v in configured.items()}
        request.extensions[_EXTENSION] = (deadline, configured)

    def on_response(response: Any) -> None:
        found = response.request.extensions.pop(_EXTENSION, None)
        if found is None:
            return
        deadline, configured = found
        # The body's reads get the configured read timeout back (the dict is the one the
        # connection reads its timeouts from; were it copied, reads stay clamped: stricter).
        response.request.extensions["timeout"].update(configured)
        response.stream = _stream_class()(response.stream, deadline, _socket_of(response))

    return {"request": [on_request], "response": [on_response]}


def _socket_of(response: Any) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


@cache
def _stream_class() -> type:
    """The body wrapper, a subclass of the SDK's HTTP library's ``SyncByteStream``
    (which the library checks for); built on first use so importing embedpipe loads
    no HTTP library."""
    httpx = http_module()

    class DeadlineStream(httpx.SyncByteStream):  # type: ignore[name-defined,misc]
        def __init__(self, inner: Any, deadline: Deadline, sock: socket.socket | None) -> None:
            self._inner, self._deadline, self._sock = inner, deadline, sock
            self._lock = threading.Lock()
            self._closed = self._cut = False
            self._watch = _watchdog().watch(deadline, self._cut_off)

        def __iter__(self) -> Iterator[bytes]:
            try:
                for chunk in self._inner:
                    if self._cut or self._deadline.passed():
                        raise self._timeout()
                    yield chunk
            except httpx.TimeoutException:
                raise
            except Exception:
                if self._cut:  # the watchdog's shutdown surfaced as a read error
                    raise self._timeout() from None
                raise
            if self._cut:  # or as a clean end of a body delimited by the connection
                raise self._timeout()

        @property
        def elapsed(self) -> Any:  # what ``response.elapsed`` reads from its stream
            return getattr(self._inner, "elapsed", None)

        def close(self) -> None:
            with self._lock:  # before the connection can go back to the pool
                self._closed = True
                self._watch.cancel()
            self._inner.close()

        def _cut_off(self) -> None:
            """The watchdog thread: the deadline passed while the body was unread."""
            with self._lock:
                if self._closed or self._sock is None:
                    return
                self._cut = True
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
                except OSError:
                    pass

        def _timeout(self) -> Exception:
            return httpx.ReadTimeout(f"deadline passed ({self._deadline.what})")

    return DeadlineStream


class _Watch:
    __slots__ = ("active", "cut", "deadline")

    def __init__(self, deadline: Deadline, cut: Callable[[], None]) -> None:
        self.deadline, self.cut, self.active = deadline, cut, True

    def cancel(self) -> None:
        self.active = False


class _Watchdog:
    """One daemon thread for every deadline of the process: cheaper than a timer thread
    per request. Entries are re-checked when due, so a deadline moved later is honoured."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline, cut: Callable[[], None]) -> _Watch:
        entry = _Watch(deadline, cut)
        with self._cv:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="embedpipe-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    def _run(self) -> None:
        while True:
            with self._cv:
                due = self._next_due()
            if due is not None and due.active:
                due.cut()

    def _next_due(self) -> _Watch | None:
        """Wait (holding the condition) until an entry is due; pop and return it."""
        while True:
            while self._heap and not self._heap[0][2].active:
                heapq.heappop(self._heap)
            if not self._heap:
                self._cv.wait()
                continue
            at, _, entry = self._heap[0]
            if entry.deadline.at > at:  # moved later: re-queue at its new time
                heapq.heapreplace(self._heap, (entry.deadline.at, next(self._seq), entry))
                continue
            delay = at - time.monotonic()
            if delay > 0:
                self._cv.wait(delay)
                continue
            heapq.heappop(self._heap)
            return entry


@cache
def _watchdog() -> _Watchdog:
    return _Watchdog()
