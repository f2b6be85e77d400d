"""embedpipe's errors as HTTP statuses, and one JSON error body for every failure.

Every error answers ``{"error": {"type", "message", "param"}}``: ``type`` is the
embedpipe error class (``IndexNotFound``, ``InputError``...) or ``InvalidRequest`` for
a body that does not fit the schema, ``message`` is the one line the CLI would print,
``param`` the request field at fault when there is one. The OpenAI SDK reads
``error.message`` from the same shape. A bug answers 500 ``InternalError`` with no
detail; its traceback goes to the server's log, never to the client. Nothing here
logs a request body.

The statuses (the first class that matches wins, so subclasses come first):
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpipe import errors as e

__all__ = ["BodyLimit", "STATUS", "Unexpected", "drain", "error_response", "headers_of", "install",
           "response_of", "status_of"]

log = logging.getLogger(__name__)

STATUS: tuple[tuple[type[e.EmbedpipeError], int], ...] = (
    (e.AuthenticationRequired, 401),  # with WWW-Authenticate: Bearer
    (e.AccessDenied, 403),
    (e.RateLimited, 429),  # with Retry-After
    (e.KeyFileInvalid, 503),  # the server's key file turned invalid; its keys wait for a fix
    (e.RequestTooLarge, 413),
    (e.IndexNotFound, 404),
    (e.DocumentNotFound, 404),
    (e.JobNotFound, 404),
    (e.UnknownProfile, 404),  # OpenAI answers an unknown model 404 too
    (e.SovereigntyError, 403),  # policy refused a hosted model; nothing was sent
    (e.ConfigError, 400),  # an invalid index name, a profile the index is not on
    (e.InputError, 400),
    (e.ChatRequestRejected, 400),
    (e.IndexBusy, 409),
    (e.JobCancelled, 409),
    (e.FingerprintMismatch, 409),
    (e.NoAdapter, 503),  # the live model is gone and no adapter stands in: search is down
    (e.MigrationError, 409),
    (e.NoBackendAvailable, 503),
    (e.GatewayError, 502),  # StreamInterrupted before any byte went out
    (e.ModelDeprecated, 410),
    (e.ProviderError, 502),
    (e.ModelError, 500),  # weights missing or not what the profile says: the server's setup
    (e.ShardUnreadable, 503),  # `embedpipe rebuild` mends it
    (e.QdrantUnavailable, 503),
    (e.PrefectUnavailable, 503),
    (e.ServerUnavailable, 503),
    (e.DataDirError, 507),
    (e.EmbedpipeError, 500),
)
__doc__ = (__doc__ or "") + "\n".join(f"    {cls.__name__:<22} {code}" for cls, code in STATUS) + "\n"


def status_of(exc: e.EmbedpipeError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def headers_of(exc: e.EmbedpipeError) -> dict[str, str] | None:
    """The headers an error's status calls for: a 401's challenge, a 429's wait."""
    if isinstance(exc, e.AuthenticationRequired):
        return {"WWW-Authenticate": 'Bearer realm="embedpipe"'}
    if isinstance(exc, e.RateLimited):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return None


def response_of(exc: e.EmbedpipeError) -> JSONResponse:
    """The one error body for an embedpipe error, with its status and headers."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return error_response(status_of(exc), type(exc).__name__, message, headers=headers_of(exc))


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


_UNION_MEMBERS = {"str", "int", "float", "bool", "none"}


def _field(loc: tuple[Any, ...]) -> str | None:
    """``("body", "documents", 3, "text")`` as ``documents[3].text``."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "path", "query") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _UNION_MEMBERS or str(part).startswith(("function-", "list[", "dict[", "literal[")):
            continue  # pydantic's name for a member of a union, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


async def _embedpipe_error(request: Request, exc: e.EmbedpipeError) -> JSONResponse:
    status = status_of(exc)
    if status >= 500:  # the type only: a message can quote what the request sent
        log.warning("%s %s answered %d %s", request.method, request.url.path, status, type(exc).__name__)
    return response_of(exc)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return error_response(400, "InvalidRequest", f"the body is not valid JSON ({reason})")
    param = _field(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return error_response(400, "InvalidRequest", f"{param or 'body'}: {message}{suffix}", param)


_HTTP_TYPES = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "HTTPError"), message,
                          headers=getattr(exc, "headers", None))


async def _storage(request: Request, exc: OSError) -> JSONResponse:
    """An OSError no layer converted: a read-only or full disk is still one line."""
    from embedpipe._files import storage_error

    converted = storage_error(exc, request.app.state.embedpipe.settings.data_dir)
    if converted is None:
        return await _internal(request, exc)
    return await _embedpipe_error(request, converted)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "InternalError", "internal error; the server's log has the details")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the one error body."""
    app.add_exception_handler(e.EmbedpipeError, _embedpipe_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(OSError, _storage)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)


class Unexpected:
    """A bug answers 500 ``InternalError`` (its traceback in the server's log) and the
    client's connection stays open: left to Starlette's last-resort handler, the error is
    raised on to uvicorn, which closes the connection under a client that may be about to
    reuse it. Once a response has started (a stream) there is nothing to answer with: the
    error goes on and the connection closes, which a streaming client must see."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            await error_response(500, "InternalError", "internal error; the server's log has the "
                                 "details")(scope, receive, send)


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413, before it is held in memory: at
    once when ``Content-Length`` says so, else as soon as the bytes received pass the limit.

    The rest of the body is read and dropped first (up to ``DRAIN_BYTES``): a server that
    answers and closes while the client is still sending makes the client's next write
    fail with a reset, and the client would never see the 413."""

    DRAIN_BYTES = 256 * 2**20

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, more=True)
            await error_response(413, "RequestTooLarge", self._message())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._drain(receive, more=message.get("more_body", False))
                raise HTTPException(413, self._message())  # FastAPI passes it on as it is
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return (f"the request body is over [server] max_body_bytes = {self.max_bytes:,}; send "
                "smaller batches or raise the limit")

    async def _drain(self, receive: Receive, more: bool) -> None:
        await drain(receive, more, self.DRAIN_BYTES)


async def drain(receive: Receive, more: bool, limit: int) -> None:
    """Read and drop the rest of a request body (up to ``limit`` bytes) before answering
    without it, so a client still sending reads the answer instead of a reset."""
    dropped = 0
    while more and dropped < limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        more = message.get("more_body", False)
