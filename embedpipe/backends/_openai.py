"""What every OpenAI-protocol call shares: the client, the sovereignty rule, and the one
retry loop (embeddings now, chat generation later).

The SDK's own retries are switched off (``max_retries=0``) so this loop is the only
one: it owns the rate limiter, honours ``Retry-After``/``retry-after-ms``, backs off
exponentially with jitter on 429, 5xx, timeouts, connection errors and malformed
bodies, and gives up after ``limits.max_retries`` with a reason. Errors a retry cannot
fix (a refused key, a retired model, a wrong base_url) are raised at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from embedpipe.errors import ConfigError, ModelDeprecated, ProviderError, SovereigntyError
from embedpipe.ratelimit import RateLimiter, backoff_delay, retry_after

if TYPE_CHECKING:
    import openai

    from embedpipe.profiles import Profile

__all__ = [
    "Attempt",
    "MalformedResponse",
    "ReplicasDown",
    "RequestFailed",
    "call_with_retries",
    "check_sovereignty",
    "deprecated_error",
    "limiter_for",
    "make_client",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_limiters: dict[tuple[str, str], RateLimiter] = {}
_limiters_lock = threading.Lock()


class MalformedResponse(Exception):
    """A body that parsed but is not what the protocol promises (bad base64, no data)."""


class RequestFailed(Exception):
    """A request that cannot succeed (retries exhausted, or refused for its content).

    Not an ``EmbedpipeError``: the caller turns it into per-document failures with
    ``reason``, the rest of the work goes on.
    """

    def __init__(self, reason: str, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        # The server refused this request's content (400/413/422, "request too large"):
        # a smaller request may pass, the same one never will.
        self.refused = refused


def endpoint(profile: Profile) -> str:
    return profile.base_url or "https://api.openai.com/v1"


def check_sovereignty(profile: Profile, sovereign: bool) -> None:
    """Refuse a hosted profile in sovereign mode, before any text could be sent."""
    if sovereign and profile.is_hosted:
        raise SovereigntyError(
            f"sovereign mode is on: profile {profile.name!r} would send text to {endpoint(profile)}; "
            "use a local profile, or set self_hosted = true on a profile whose base_url is "
            "your own server"
        )


def api_key(profile: Profile, env: Mapping[str, str] | None = None) -> str:
    """The key from ``$<api_key_env>``; a missing key fails before any work starts."""
    env = os.environ if env is None else env
    if not profile.api_key_env:
        return "unused"  # a server that takes no key; the SDK insists on a string
    key = env.get(profile.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"profile {profile.name!r} needs an API key in ${profile.api_key_env}; export it "
            f"(or set api_key_env = \"\" under [profiles.{profile.name}] for a server without keys)"
        )
    return key


def make_client(profile: Profile, base_url: str | None = None, key_env: str | None = None) -> openai.OpenAI:
    """An SDK client for the profile's endpoint (or one of its replicas) with the SDK's
    own retries off."""
    import openai

    if key_env is not None:
        profile = profile.model_copy(update={"api_key_env": key_env})
    return openai.OpenAI(
        api_key=api_key(profile),
        base_url=base_url or profile.base_url,
        max_retries=0,
        timeout=profile.limits.timeout_s,
    )


class ReplicasDown(Exception):
    """Every endpoint of a profile failed this round or has its breaker open (retried)."""


def limiter_for(profile: Profile) -> RateLimiter:
    """One limiter per endpoint and model in this process, shared by every caller."""
    limits = profile.limits
    key = (endpoint(profile), profile.model, limits.requests_per_minute, limits.tokens_per_minute)
    with _limiters_lock:
        limiter = _limiters.get(key)
        if limiter is None:
            limiter = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute)
            _limiters[key] = limiter
        return limiter


def deprecated_error(profile: Profile, detail: str = "") -> ModelDeprecated:
    """The error for a model the provider no longer serves, naming the way out."""
    replacement = profile.deprecation.replacement
    fix = (
        f"run `embedpipe migrate --to {replacement}`"
        if replacement
        else "pick a profile from `embedpipe models` and run `embedpipe migrate --to PROFILE`"
    )
    why = f" ({detail})" if detail else ""
    return ModelDeprecated(
        f"{endpoint(profile)} no longer serves model {profile.model!r} of profile "
        f"{profile.name!r}{why}; {fix}"
    )


@dataclass
class Attempt:
    """What one call_with_retries spent: tries made and seconds waited on limits."""

    tries: int = 0
    waited_s: float = 0.0


def call_with_retries(
    profile: Profile,
    send: Callable[[], T],
    tokens: int,
    limiter: RateLimiter,
    attempt: Attempt | None = None,
    max_retries: int | None = None,
) -> T:
    """Run ``send`` under the rate limits, retrying what a retry can fix.

    Raises ``RequestFailed`` when retries run out or the server refuses the request's
    content, and an ``EmbedpipeError`` for what no retry fixes.
    """
    import openai

    limits = profile.limits
    retries = limits.max_retries if max_retries is None else max_retries
    attempt = attempt or Attempt()
    last = ""
    for n in range(retries + 1):
        attempt.waited_s += limiter.acquire(tokens)
        attempt.tries += 1
        hint: float | None = None
        try:
            return send()
        except openai.RateLimitError as exc:
            if _code(exc) == "insufficient_quota":
                raise ProviderError(
                    f"{endpoint(profile)} says the account's quota is exhausted (429 "
                    "insufficient_quota); add credit or raise the limit, then re-run"
                ) from None
            if "request too large" in _message(exc).lower():
                raise RequestFailed(f"HTTP 429 {_message(exc)}", refused=True) from None
            if limits.refund_refused:
                limiter.refund(tokens)
            hint = retry_after(exc.response.headers)
            if hint is not None and hint > limits.max_wait_s:
                raise RequestFailed(
                    f"HTTP 429 rate limited and told to wait {hint:,.0f} s, over max_wait_s = "
                    f"{limits.max_wait_s:g} (a daily limit?); re-run later"
                ) from None
            if hint is not None:
                limiter.pause(hint)
            last = f"HTTP 429 rate limited: {_message(exc)}"
        except openai.APITimeoutError:
            last = f"timed out after {limits.timeout_s:g} s"
        except openai.APIConnectionError as exc:
            last = f"connection failed ({_cause(exc)})"
        except openai.APIStatusError as exc:
            last = _classify_status(profile, exc)
        except _malformed_types() as exc:
            last = f"malformed response ({type(exc).__name__})"
        except ReplicasDown as exc:
            last = str(exc)
        if n < retries:
            delay = backoff_delay(n, limits.backoff_base_s, limits.backoff_max_s, hint)
            log.debug("%s: %s; retry %d in %.2fs", profile.name, last, n + 1, delay)
            time.sleep(delay)
            attempt.waited_s += delay
    raise RequestFailed(f"gave up after {retries + 1} tries: {last}")


def _classify_status(profile: Profile, exc: Any) -> str:
    """A retry reason for 5xx and 408/409; raise for what retrying cannot fix."""
    status = exc.status_code
    if status in (401, 403):
        raise ProviderError(
            f"{endpoint(profile)} refused the API key in ${profile.api_key_env} (HTTP {status}); "
            "set a valid key and re-run"
        ) from None
    code, message = _code(exc), _message(exc)
    if status == 410 or code in ("model_not_found", "model_deprecated") or (
        status == 404 and "model" in message.lower()
    ):
        raise deprecated_error(profile, f"HTTP {status} {code or ''}".strip()) from None
    if status == 404:
        raise ProviderError(
            f"{endpoint(profile)} has no such endpoint (HTTP 404); check base_url "
            "(OpenAI-compatible servers usually end in /v1)"
        ) from None
    if status >= 500 or status in (408, 409):
        return f"HTTP {status}: {message}"
    raise RequestFailed(f"refused by the server (HTTP {status}): {message}", refused=True)


def _body(exc: Any) -> Mapping[str, Any]:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return body["error"]
    return body if isinstance(body, Mapping) else {}


def _code(exc: Any) -> str | None:
    code = getattr(exc, "code", None) or _body(exc).get("code")
    return str(code) if code else None


def _message(exc: Any) -> str:
    text = str(_body(exc).get("message") or getattr(exc, "message", "") or exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause else type(exc).__name__


def _malformed_types() -> tuple[type[BaseException], ...]:
    import json

    import openai

    return (json.JSONDecodeError, openai.APIResponseValidationError, UnicodeDecodeError,
            MalformedResponse)
