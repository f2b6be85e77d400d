"""A circuit breaker per endpoint: chat backends in the gateway, embedding replicas.

Closed while the endpoint answers; open after ``failures`` consecutive failures, so
callers skip it instead of waiting on it; after ``cooldown_s`` half-open, letting exactly
one request probe it: a success closes it, a failure opens it again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["Breaker"]


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

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            left = max(0.0, self.cooldown_s - (time.monotonic() - self.opened_at))
            return {"state": self.state, "consecutive_failures": self.consecutive,
                    "retry_in_s": round(left, 3) if self.state == "open" else None}
