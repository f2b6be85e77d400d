"""Rate-limit arithmetic: header parsing, backoff, and the token bucket (on a fake clock)."""

from __future__ import annotations

import random

import pytest

from embedpipe.ratelimit import BURST_S, RateLimiter, _Bucket, backoff_delay, parse_duration, retry_after


@pytest.mark.parametrize(
    "text, seconds",
    [("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02), ("1h2m3s", 3723.0), ("0.25", 0.25), ("bogus", None)],
)
def test_openai_reset_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_prefers_milliseconds_then_seconds() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after({}) is None


def test_backoff_honours_the_hint_and_otherwise_grows_with_jitter() -> None:
    rng = random.Random(1)
    hinted = [backoff_delay(0, 0.5, 30, hint_s=2.0, rng=rng) for _ in range(50)]
    assert all(2.0 <= d <= 2.2 for d in hinted)
    assert backoff_delay(0, 0.5, 30, hint_s=100.0, rng=rng) <= 33.0  # capped
    late = [backoff_delay(6, 0.5, 30, rng=rng) for _ in range(200)]
    early = [backoff_delay(0, 0.5, 30, rng=rng) for _ in range(200)]
    assert max(early) <= 0.5 and max(late) <= 30 and sum(late) > sum(early) * 10


def test_bucket_refills_at_the_rate_and_admits_an_oversized_request_when_full() -> None:
    bucket = _Bucket(per_minute=600)  # 10 per second, capacity BURST_S seconds' worth
    assert bucket.capacity == pytest.approx(10 * BURST_S)
    t0 = bucket.stamp
    assert bucket.wait_for(60, t0) == 0.0
    bucket.take(60)
    assert bucket.wait_for(5, t0) == pytest.approx(0.5)  # empty: 5 tokens take half a second
    assert bucket.wait_for(5, t0 + 0.5) == pytest.approx(0.0)
    # A request bigger than the bucket waits for a full bucket, then leaves it in debt.
    assert bucket.wait_for(500, t0 + 0.5) == pytest.approx((60 - 5) / 10)
    bucket.level = bucket.capacity
    bucket.take(500)
    assert bucket.wait_for(1, bucket.stamp) == pytest.approx((500 - 60 + 1) / 10)


def test_limiter_pause_holds_every_caller_and_headers_can_impose_it() -> None:
    limiter = RateLimiter()
    assert limiter.acquire(10) == 0.0  # no budgets: never waits
    limiter.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "50ms"})
    assert limiter.acquire(1) > 0.0
    assert RateLimiter(tokens_per_minute=60_000).request_token_cap == int(1000 * BURST_S)


def test_a_refused_request_gives_its_budget_back() -> None:
    limiter = RateLimiter(tokens_per_minute=600)  # capacity 60 tokens
    limiter.acquire(60)
    bucket = limiter._tokens
    assert bucket is not None and bucket.level == pytest.approx(0, abs=0.5)
    limiter.refund(60)
    assert bucket.level == pytest.approx(60, abs=0.5)
    limiter.refund(60)
    assert bucket.level <= bucket.capacity  # never above a full bucket


def test_unparseable_retry_after_is_ignored() -> None:
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after-ms": "x", "retry-after": "2"}) == 2.0


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "lots"])
def test_a_malformed_remaining_header_is_treated_as_absent(value: str) -> None:
    limiter = RateLimiter()
    limiter.observe({"x-ratelimit-remaining-tokens": value, "x-ratelimit-reset-tokens": "20s",
                     "x-ratelimit-remaining-requests": value, "x-ratelimit-reset-requests": "20s"})
    assert limiter.acquire(1) == 0.0  # no pause learnt from it, and no crash


@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_a_non_finite_retry_after_is_no_hint(value: str) -> None:
    assert retry_after({"retry-after": value}) is None
    assert retry_after({"retry-after-ms": value, "retry-after": "2"}) == 2.0
    assert parse_duration(value) is None


def test_try_acquire_never_waits_and_says_how_long_it_would() -> None:
    """The server's per-key use: a whole minute's burst, then the wait, nothing taken."""
    limiter = RateLimiter(requests_per_minute=3, burst_s=60)  # 3 at once, then one per 20 s
    assert [limiter.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    bucket = limiter._requests
    assert bucket is not None and bucket.capacity == 3
    wait = limiter.try_acquire()
    assert 19.0 < wait <= 20.0  # one request refills in 20 s
    assert bucket.level == pytest.approx(0, abs=0.05)  # a refusal takes nothing
    bucket.stamp -= 20.0  # as if 20 s went by
    assert limiter.try_acquire() == 0.0
    assert limiter.try_acquire() > 0.0


def test_the_default_burst_is_a_few_seconds() -> None:
    assert RateLimiter(requests_per_minute=600)._requests.capacity == pytest.approx(10 * BURST_S)  # type: ignore[union-attr]
    assert RateLimiter(requests_per_minute=600, burst_s=60)._requests.capacity == 600  # type: ignore[union-attr]
