"""Staying inside a provider's rate limits, and backing off when we did not.

One :class:`RateLimiter` per hosted profile and process is shared by every request in
flight. It holds two token buckets (requests and tokens per minute) and a pause the
server can impose: a 429's ``Retry-After`` (or ``retry-after-ms``) or an exhausted
``x-ratelimit-remaining-*`` header stops *every* worker until the reset, not just the
one that was told, so the fleet does not keep hammering a limit it already hit.

``embedpipe serve`` uses the same limiter the other way round, one per API key, with a
full minute's burst: :meth:`RateLimiter.try_acquire` never waits, it says how long the
caller would have to, which becomes the 429's ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import threading
import time
from collections.abc import Mapping

__all__ = ["RateLimiter", "backoff_delay", "parse_duration", "retry_after"]

# Buckets hold a few seconds of budget: providers enforce per-minute limits over
# short windows, so a full minute's burst at start-up would only earn 429s.
BURST_S = 6.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _number(value: str | None) -> float | None:
    """A header's number, or None when it is not a finite one: a malformed header
    (``inf``, ``nan``, ``1e999``, text) is treated as absent, never as a crash."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_duration(value: str) -> float | None:
    """OpenAI's reset durations (``"6m0s"``, ``"1.5s"``, ``"20ms"``) in seconds."""
    value = value.strip()
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        number = _number(value)
        return None if number is None else max(0.0, number)
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``Retry-After``."""
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return max(0.0, ms / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:  # an HTTP date
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # neither seconds nor a date: ignore the hint, back off as usual
    if when.tzinfo is None:
        import datetime as dt

        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(
    attempt: int, base_s: float, max_s: float, hint_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """How long to wait before retry ``attempt`` (0-based).

    The server's hint wins (plus up to 10% jitter so waiting workers do not return in
    lockstep); without one, exponential backoff with full jitter.
    """
    rng = rng or random
    if hint_s is not None:
        return min(max_s, hint_s) * (1 + 0.1 * rng.random())
    return rng.uniform(0, min(max_s, base_s * 2**attempt))


class _Bucket:
    """A token bucket refilled continuously; a request larger than the bucket may pass
    when the bucket is full, leaving it in debt, so nothing is unsatisfiable. It holds
    ``burst_s`` seconds of budget (at least one)."""

    def __init__(self, per_minute: float, burst_s: float = BURST_S) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait_for(self, amount: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets plus server-imposed pauses.

    ``burst_s``: how many seconds of budget the buckets hold; a provider's limiter keeps
    a few (``BURST_S``), a server's per-key limiter a whole minute (60: "3 per minute"
    admits 3 at once, then one every 20 s)."""

    def __init__(self, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 burst_s: float = BURST_S) -> None:
        self._requests = _Bucket(requests_per_minute, burst_s) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute, burst_s) if tokens_per_minute else None
        self._paused_until = 0.0
        self._lock = threading.Lock()

    @property
    def request_token_cap(self) -> int | None:
        """The largest request the token budget admits without going into debt."""
        return int(self._tokens.capacity) if self._tokens else None

    def try_acquire(self, tokens: int = 0) -> float:
        """Take a request of ``tokens`` from the budgets if it fits now and return 0.0;
        else take nothing and return the seconds until it would fit. Never waits."""
        with self._lock:
            now = time.monotonic()
            delay = max(0.0, self._paused_until - now)
            for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                if bucket is not None:
                    delay = max(delay, bucket.wait_for(amount, now))
            if delay > 0:
                return delay
            for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                if bucket is not None:
                    bucket.take(amount)
            return 0.0

    def acquire(self, tokens: int) -> float:
        """Block until a request of ``tokens`` fits the budgets; returns seconds waited."""
        waited = 0.0
        while True:
            delay = self.try_acquire(tokens)
            if delay <= 0:
                return waited
            time.sleep(min(delay, 1.0))
            waited += min(delay, 1.0)

    def refund(self, tokens: int) -> None:
        """Give back the budget of a request the server refused (a 429 is not counted
        against the server's own limit, so it must not be against ours either)."""
        with self._lock:
            for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
                if bucket is not None:
                    bucket.level = min(bucket.capacity, bucket.level + amount)

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (a 429's Retry-After, an exhausted budget)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from a successful response's ``x-ratelimit-*`` headers."""
        for kind in ("tokens", "requests"):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is None or reset is None:
                continue  # absent or malformed ("inf"): nothing learnt
            seconds = parse_duration(reset)
            if remaining < 1 and seconds:
                # The reset is when the bucket is *full* again (up to a minute); the next
                # request needs far less, so wait a bounded slice of it.
                self.pause(min(seconds, 1.0))
