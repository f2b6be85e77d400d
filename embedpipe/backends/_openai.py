"""The one OpenAI-protocol layer, shared by embeddings (``hosted``) and chat (``gateway``).

* **Clients**: ``make_client`` builds every SDK client, with the SDK's own retries off
  and a wall-clock deadline on every request (``_deadline``: ``timeout_s`` bounds the
  whole request, however slowly the bytes come).
* **Keys**: ``read_key`` is the one key rule. An endpoint gets a key only from the
  variable its ``api_key_env`` names; left unset, OpenAI itself (no ``base_url``) reads
  ``$OPENAI_API_KEY`` and any other server gets no key at all, so the OpenAI key never
  reaches a server that was not meant to have it. A key is never sent in clear text
  (``http://``) to a host other than this machine unless ``allow_insecure_key = true``
  says so. Replicas follow the rule with their own ``base_url`` and ``api_key_env``.
* **Errors**: ``classify`` says what any failure of a call means (timeout, connection,
  HTTP status, malformed body), in our words; each caller decides what to do with it.
  ``endpoint_judge`` turns it into a circuit-breaker verdict (``Breaker.attempt``).
* **Retries** (embeddings): ``call_with_retries`` owns the rate limiter, honours
  ``Retry-After``/``retry-after-ms``, backs off exponentially with jitter on 429, 5xx,
  timeouts, connection errors and malformed bodies, and gives up after
  ``limits.max_retries`` with a reason. Errors a retry cannot fix (a refused key, a
  retired model, a wrong base_url) are raised at once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from embedpipe.backends._deadline import Deadline, scope
from embedpipe.errors import ConfigError, KeyRefused, ModelDeprecated, ProviderError, SovereigntyError
from embedpipe.ratelimit import RateLimiter, backoff_delay, retry_after

if TYPE_CHECKING:
    import openai

    from embedpipe.profiles import Profile, Replica

__all__ = [
    "OPENAI_URL",
    "Attempt",
    "Deadline",
    "Failure",
    "MalformedResponse",
    "ReplicasDown",
    "RequestFailed",
    "call_with_retries",
    "check_key_transport",
    "check_sovereignty",
    "classify",
    "deprecated_error",
    "endpoint_judge",
    "key_env_for",
    "key_in_clear",
    "limiter_for",
    "make_client",
    "profile_client",
    "read_key",
    "scope",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"

_limiters: dict[tuple[Any, ...], RateLimiter] = {}
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


class ReplicasDown(Exception):
    """Every endpoint of a profile failed this round or has its breaker open (retried)."""


def endpoint(profile: Profile) -> str:
    return profile.base_url or OPENAI_URL


def check_sovereignty(profile: Profile, sovereign: bool) -> None:
    """Refuse a hosted profile in sovereign mode, before any text could be sent."""
    if sovereign and profile.is_hosted:
        raise SovereigntyError(
            f"sovereign mode is on: profile {profile.name!r} would send text to {endpoint(profile)}; "
            "use a local profile, or set self_hosted = true on a profile whose base_url is "
            "your own server"
        )


# --- the key rule ------------------------------------------------------------------------


def key_env_for(base_url: str | None, api_key_env: str | None) -> str | None:
    """The variable holding an endpoint's key, or None for no key: the one named by
    ``api_key_env`` ("" names none); unset, ``OPENAI_API_KEY`` for OpenAI itself only."""
    if api_key_env is not None:
        return api_key_env.strip() or None
    return None if base_url else DEFAULT_KEY_ENV


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_in_clear(url: str, allowed: bool) -> bool:
    """Whether a key sent to ``url`` would cross the network in clear text (``http://``
    to a host other than this machine) without ``allow_insecure_key`` saying so."""
    return not allowed and urlsplit(url).scheme.lower() == "http" and not is_loopback(url)


def check_key_transport(url: str, owner: str, table: str, allowed: bool) -> None:
    """Refuse to send a key in clear text, unless ``allow_insecure_key = true`` under
    ``table`` says the network is trusted."""
    if not key_in_clear(url, allowed):
        return
    raise ConfigError(
        f"{owner} would send its API key in clear text to {url} (plain http to another "
        f"machine); use https, or set allow_insecure_key = true under {table} if that "
        "network is yours"
    )


def read_key(
    owner: str, table: str, base_url: str | None, api_key_env: str | None,
    allow_insecure: bool = False, env: Mapping[str, str] | None = None,
) -> str | None:
    """The key to send to ``base_url`` (None: none) by the key rule above; a key that
    should be there and is not fails before any work starts."""
    name = key_env_for(base_url, api_key_env)
    if name is None:
        return None
    check_key_transport(base_url or OPENAI_URL, owner, table, allow_insecure)
    key = (os.environ if env is None else env).get(name, "").strip()
    if not key:
        raise ConfigError(
            f"{owner} needs an API key in ${name}; export it (or set api_key_env = \"\" "
            f"under {table} for a server without keys)"
        )
    return key


# --- clients -----------------------------------------------------------------------------


def make_client(
    base_url: str | None, key: str | None, timeout_s: float, connect_timeout_s: float | None = None,
) -> openai.OpenAI:
    """An SDK client for one endpoint: no SDK retries, every request bounded by a
    ``timeout_s`` wall-clock deadline (unless a ``scope`` sets another), and no
    ``Authorization`` header at all when ``key`` is None."""
    import openai

    from embedpipe.backends._deadline import event_hooks

    hooks = event_hooks(send_key=key is not None, deadline_s=timeout_s)
    return openai.OpenAI(
        # The SDK needs a string; the request hook drops the header it would make of it.
        api_key=key or "unused",
        # Explicit even for OpenAI: unset, the SDK would follow $OPENAI_BASE_URL and the
        # key rule would judge the wrong host.
        base_url=base_url or OPENAI_URL,
        max_retries=0,
        timeout=openai.Timeout(timeout_s, connect=connect_timeout_s or timeout_s),
        http_client=openai.DefaultHttpxClient(event_hooks=hooks),
    )


def profile_client(profile: Profile, replica: Replica | None = None) -> openai.OpenAI:
    """The client for a profile's endpoint, or one of its replicas (its own key rule)."""
    table = f"[profiles.{profile.name}]"
    if replica is None:
        key = read_key(f"profile {profile.name!r}", table, profile.base_url, profile.api_key_env,
                       profile.allow_insecure_key)
        return make_client(profile.base_url, key, profile.limits.timeout_s)
    key = read_key(f"replica {replica.base_url} of profile {profile.name!r}",
                   f"that replica in {table} replicas", replica.base_url, replica.api_key_env,
                   replica.allow_insecure_key)
    return make_client(replica.base_url, key, profile.limits.timeout_s)


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


# --- what a failure means ------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A failed OpenAI-protocol call, classified once for every caller."""

    kind: str  # "timeout", "connection", "malformed", "replicas_down" or "http_<status>"
    reason: str  # in our words: never the server's text, which can quote the request
    status: int | None = None
    code: str | None = None  # the error body's code ("model_not_found", "insufficient_quota")
    detail: str = ""  # the server's message, first line (embedding reports name it)

    @property
    def retryable(self) -> bool:
        """The same request may succeed later or at another endpoint of the same model."""
        status = self.status
        return status is None or status == 429 or status >= 500 or status in (408, 409)

    @property
    def refused(self) -> bool:
        """The request's own fault: any endpoint would refuse it too."""
        return self.status in (400, 413, 422)

    @property
    def model_gone(self) -> bool:
        return self.status == 410 or self.code in ("model_not_found", "model_deprecated") or (
            self.status == 404 and "model" in self.detail.lower())


_STATUS_WORDS = {401: "API key refused", 403: "API key refused", 404: "model or endpoint not found",
                 429: "rate limited"}


def classify(exc: BaseException, limit: str = "") -> Failure | None:
    """What ``exc`` says about the call, or None when it is not a protocol failure (our
    own error, a config error): those are raised as they are. ``limit`` names the
    deadline for a timeout's reason (``"timeout_s = 2"``)."""
    import openai

    from embedpipe.backends._deadline import http_module

    httpx = http_module()
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return Failure("timeout", f"timed out ({limit})" if limit else "timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Failure("connection", f"connection failed ({_cause(exc)})")
    if isinstance(exc, httpx.HTTPError):  # a stream's read failing under the SDK
        return Failure("connection", f"connection failed ({type(exc).__name__})")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        why = _STATUS_WORDS.get(status, "server error" if status >= 500 else "refused")
        return Failure(f"http_{status}", f"HTTP {status}: {why}", status, _code(exc), _message(exc))
    if isinstance(exc, MalformedResponse):
        return Failure("malformed", f"malformed response ({exc})")
    if isinstance(exc, _malformed_types()):
        return Failure("malformed", f"malformed response ({type(exc).__name__})")
    if isinstance(exc, ReplicasDown):
        return Failure("replicas_down", str(exc))
    if isinstance(exc, openai.APIError):  # e.g. an error event inside a stream
        return Failure("malformed", f"the server reported an error ({type(exc).__name__})")
    return None


def endpoint_judge(exc: Exception) -> bool | None:
    """A breaker verdict (``Breaker.attempt``): False when the endpoint failed (timeout,
    connection, 429, 5xx, malformed body), True when it answered but refused the request,
    None when the error says nothing about it (a wrong dimension, a wrong config)."""
    failure = classify(exc)
    if failure is None:
        return None
    return not failure.retryable


# --- retries (embeddings) ------------------------------------------------------------------


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
    limits = profile.limits
    retries = limits.max_retries if max_retries is None else max_retries
    attempt = attempt or Attempt()
    last = ""
    for n in range(retries + 1):
        attempt.waited_s += limiter.acquire(tokens)
        attempt.tries += 1
        try:
            return send()
        except Exception as exc:
            failure = classify(exc, f"timeout_s = {limits.timeout_s:g}")
            if failure is None:
                raise
            hint = _settle(profile, failure, exc, limiter, tokens)
            last = f"{failure.reason}: {failure.detail}" if failure.detail else failure.reason
        if n < retries:
            delay = backoff_delay(n, limits.backoff_base_s, limits.backoff_max_s, hint)
            log.debug("%s: %s; retry %d in %.2fs", profile.name, last, n + 1, delay)
            time.sleep(delay)
            attempt.waited_s += delay
    raise RequestFailed(f"gave up after {retries + 1} tries: {last}")


def _settle(profile: Profile, failure: Failure, exc: Exception, limiter: RateLimiter,
            tokens: int) -> float | None:
    """Raise what a retry cannot fix; otherwise the seconds the server asked us to wait."""
    limits = profile.limits
    if failure.status == 429:
        if failure.code == "insufficient_quota":
            raise ProviderError(
                f"{endpoint(profile)} says the account's quota is exhausted (429 "
                "insufficient_quota); add credit or raise the limit, then re-run") from None
        if "request too large" in failure.detail.lower():
            raise RequestFailed(f"HTTP 429 {failure.detail}", refused=True) from None
        if limits.refund_refused:
            limiter.refund(tokens)
        hint = retry_after(exc.response.headers)  # type: ignore[attr-defined]
        if hint is not None and hint > limits.max_wait_s:
            raise RequestFailed(
                f"HTTP 429 rate limited and told to wait {hint:,.0f} s, over max_wait_s = "
                f"{limits.max_wait_s:g} (a daily limit?); re-run later") from None
        if hint is not None:
            limiter.pause(hint)
        return hint
    if failure.status is None or failure.retryable:
        return None
    if failure.status in (401, 403):
        var = key_env_for(profile.base_url, profile.api_key_env) or "(no key configured)"
        raise KeyRefused(
            f"{endpoint(profile)} refused the API key in ${var} (HTTP {failure.status}); "
            "set a valid key and re-run") from None
    if failure.model_gone:
        raise deprecated_error(profile, f"HTTP {failure.status} {failure.code or ''}".strip()) from None
    if failure.status == 404:
        raise ProviderError(
            f"{endpoint(profile)} has no such endpoint (HTTP 404); check base_url "
            "(OpenAI-compatible servers usually end in /v1)") from None
    raise RequestFailed(
        f"refused by the server (HTTP {failure.status}): {failure.detail}", refused=True) from None


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

    return (json.JSONDecodeError, openai.APIResponseValidationError, UnicodeDecodeError)
