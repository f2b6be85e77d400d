"""A circuit breaker per endpoint: chat backends in the gateway, embedding replicas.

Closed while the endpoint answers; open after ``failures`` consecutive failures, so
callers skip it instead of waiting on it; after ``cooldown_s`` half-open, letting exactly
one request probe it: a success closes it, a failure opens it again.

A call the breaker let through must end in a verdict, or the half-open probe is never
released and every later call is refused. ``attempt()`` guarantees that on every way
out of the call: a return, an exception of any kind, a caller that abandoned a stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Breaker", "Judge"]

# What an exception says about the endpoint: False it failed, True it answered (the
# request was at fault), None neither (our own error, a wrong config): no verdict.
Judge = Callable[[Exception], "bool | None"]


class Breaker:
    """Closed -> open after ``failures`` in a row -> half-open after ``cooldown_s``
    (one probe) -> closed on success, open again on failure."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.failures, self.cooldown_s = failures, cooldown_s
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            if self.state == "open" and time.monotonic() - self.opened_at >= self.cooldown_s:
                self.state, self._probing = "half_open", False
            if self.state == "closed":
                return True
            if self.state == "half_open" and not self._probing:
                self._probing = True  # exactly one request probes
                return True
            return False

    def record(self, ok: bool) -> None:
        with self._lock:
            self._probing = False
            if ok:
                self.state, self.consecutive = "closed", 0
                return
            self.consecutive += 1
            if self.state == "half_open" or self.consecutive >= self.failures:
                self.state, self.opened_at = "open", time.monotonic()

    def release(self) -> None:
        """End a call that proved nothing about the endpoint: the next one may probe."""
        with self._lock:
            self._probing = False

    @contextmanager
    def attempt(self, judge: Judge) -> Iterator[None]:
        """Around one call that ``allow()`` let through: a return records a success, an
        ``Exception`` what ``judge`` says of it, anything else (``GeneratorExit``: the
        caller walked away; ``KeyboardInterrupt``) only releases the probe."""
        try:
            yield
        except Exception as exc:
            verdict = judge(exc)
            if verdict is None:
                self.release()
            else:
                self.record(ok=verdict)
            raise
        except BaseException:
            self.release()
            raise
        self.record(ok=True)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            left = max(0.0, self.cooldown_s - (time.monotonic() - self.opened_at))
            return {"state": self.state, "consecutive_failures": self.consecutive,
                    "retry_in_s": round(left, 3) if self.state == "open" else None}
