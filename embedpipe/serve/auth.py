"""Who may ask what: the API-key check of ``embedpipe serve`` (keys: ``serve.keys``).

A server that started without keys (loopback only) lets every request through, as
before. A server with keys checks each request in two places:

1. :class:`Authenticate`, an ASGI middleware outside everything else, before any body is
   read: ``Authorization: Bearer <key>`` must name a known key (else 401 with
   ``WWW-Authenticate: Bearer``), and the key must be inside its requests per minute
   (else 429 with ``Retry-After``; one token bucket per key, ``ratelimit.RateLimiter``).
   The key is then the request's :class:`Grant`. A refused request's body is read and
   dropped first (up to ``max_body_bytes``) so the client sees the answer, not a reset.
2. Each route asks its grant for the scope and index it needs (``Grant.require``):
   403 names the scope or index missing. An index is checked before it is looked up,
   so a key cannot learn which other indexes exist.

Open without a key: ``/healthz`` (a load balancer's probe; without a valid key it says
only ``{"status": "ok"}``), ``/docs`` and ``/openapi.json`` (the API's description, the
same for every server and holding no data; the docs' "Authorize" button sends a key to
the routes it tries). Every other path, unknown ones too, needs a key.

Logs name keys by name and hash prefix, never the key.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from embedpipe.errors import AccessError, AuthenticationRequired, EmbedpipeError, RateLimited
from embedpipe.ratelimit import RateLimiter
from embedpipe.serve.errors import drain, response_of

if TYPE_CHECKING:
    from embedpipe.config import ServerSettings
    from embedpipe.serve.keys import ApiKey, KeyRing

__all__ = ["OPEN_PATHS", "Authenticate", "Grant", "GrantDep"]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})
HEALTH_PATH = "/healthz"
GRANT = "embedpipe.grant"  # the ASGI scope entry the middleware leaves for the routes
MINUTE_BURST_S = 60.0  # a key's bucket holds a whole minute: "3 per minute" admits 3 at once


@dataclass(frozen=True)
class Grant:
    """What a request may do: ``key`` is None on a server without keys (everything) or
    for an anonymous ``/healthz``; ``anonymous`` marks the latter."""

    key: ApiKey | None = None
    anonymous: bool = False

    def require(self, scope: str, index: str | None = None, *, every_index: bool = False,
                what: str = "") -> None:
        """AccessDenied (403) unless the key has ``scope`` (and ``index``, or every index)."""
        if self.key is None and not self.anonymous:
            return
        if self.key is None:  # pragma: no cover - only /healthz is let through anonymously
            raise AuthenticationRequired("this route needs an API key")
        try:
            self.key.require(scope, index, every_index=every_index, what=what)
        except AccessError as exc:
            log.warning("refused (sha256 %s): %s", self.key.sha256[:12], str(exc).split(";")[0])
            raise

    def may(self, scope: str, index: str | None = None) -> bool:
        """Whether it may (for lists: indexes a key may not use are left out)."""
        if self.key is None:
            return not self.anonymous
        return self.key.may(scope, index)


OPEN = Grant()
ANONYMOUS = Grant(anonymous=True)
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>` "
                     "(the openai SDK's api_key). Needed once the server has keys.")


async def grant_of(request: Request,
                   _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Grant:
    """The request's grant (the bearer dependency only puts the key in the OpenAPI schema,
    so /docs can send it). A keyed server reached without the middleware fails closed."""
    grant = request.scope.get(GRANT)
    if grant is None:
        keys = request.app.state.embedpipe.keys
        if keys.required:
            raise AuthenticationRequired("this server needs an API key")
        return OPEN
    return grant  # type: ignore[no-any-return]


GrantDep = Annotated[Grant, Depends(grant_of)]


class Authenticate:
    """The middleware of step 1 (see the module docstring)."""

    def __init__(self, app: ASGIApp, keys: KeyRing, server: ServerSettings) -> None:
        self.app = app
        self.keys = keys
        self.server = server
        self._limiters: dict[str, RateLimiter | None] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            key = self.keys.identify(Headers(scope=scope).get("authorization"))
            if path != HEALTH_PATH:
                self._spend(key)
        except EmbedpipeError as exc:
            if path == HEALTH_PATH and not isinstance(exc, RateLimited):
                scope[GRANT] = ANONYMOUS
                await self.app(scope, receive, send)
                return
            await self._drain(scope, receive)
            await response_of(exc)(scope, receive, send)
            return
        scope[GRANT] = Grant(key)
        await self.app(scope, receive, send)

    def _spend(self, key: ApiKey) -> None:
        """Take one request from the key's bucket, or RateLimited with the wait."""
        with self._lock:
            if key.sha256 not in self._limiters:
                per_minute = self.server.rate_limit_of(key.name)
                self._limiters[key.sha256] = (
                    RateLimiter(requests_per_minute=per_minute, burst_s=MINUTE_BURST_S) if per_minute else None)
            limiter = self._limiters[key.sha256]
        wait = limiter.try_acquire() if limiter is not None else 0.0
        if wait > 0:
            limit = self.server.rate_limit_of(key.name)
            seconds = max(1, math.ceil(wait))  # Retry-After says the same
            log.info("API key %s is over its %d requests per minute", key.tag, limit)
            raise RateLimited(f"API key {key.name!r} is over its {limit} requests per minute "
                              f"([server] rate_limit_per_minute, rate_limits); retry in {seconds} s",
                              retry_after_s=seconds)

    async def _drain(self, scope: Scope, receive: Receive) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.server.max_body_bytes:
            return  # more than the server would ever read: the client gets the answer or a reset
        await drain(receive, more=True, limit=self.server.max_body_bytes)
