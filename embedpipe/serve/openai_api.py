"""The OpenAI protocol: ``/v1/embeddings``, ``/v1/chat/completions`` and ``/v1/models``.

Embeddings: ``model`` is a profile name, or ``index:<name>`` for the model an index is
pinned to (its embedder is checked against the fingerprint the index's live version
records, so the vectors are of that index's space). Every answer carries the
fingerprint, in the ``X-Embedpipe-Fingerprint`` header and the ``fingerprint`` field.
``encoding_format = "base64"`` is the vectors' little-endian float32 bytes, as OpenAI
sends them. ``input_type = "query"`` applies the profile's query prompt instead of its
document prompt (an extension; OpenAI's own models have no prompts).

With API keys: embeddings need the read scope, for ``index:<name>`` on that index, for
a profile name on every index (``*``: a key kept to some indexes uses their own models);
chat needs the chat scope; the model list any valid key (it lists only the indexes the
key may read).

Chat goes through the gateway, with its route, fallback, breakers, policy and audit;
``model`` is accepted but the route picks the backend, and the reply names the one that
answered (``model``, the ``X-Embedpipe-Backend`` header, ``embedpipe.backend``). A
stream is routed before its first byte goes out, so "no backend can answer" is still a
503; a failure after that ends the stream with an ``error`` event and no ``[DONE]``
(the OpenAI SDK raises it), since a half-told answer is never replayed elsewhere.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from embedpipe.errors import EmbedpipeError, InputError, ProviderError, RequestTooLarge
from embedpipe.serve.app import ERRORS, State
from embedpipe.serve.auth import GrantDep
from embedpipe.serve.schemas import ChatRequest, EmbeddingsRequest, EmbeddingsResponse
from embedpipe.serve.state import INDEX_MODEL

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.gateway import ChatResult, ChatStream

__all__ = ["router"]

FINGERPRINT_HEADER = "X-Embedpipe-Fingerprint"
BACKEND_HEADER = "X-Embedpipe-Backend"

router = APIRouter(prefix="/v1", tags=["openai"])


# --- embeddings ---------------------------------------------------------------------------


@router.post("/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
def embeddings(body: EmbeddingsRequest, state: State, grant: GrantDep) -> JSONResponse:
    """OpenAI-compatible embeddings of a profile's model or of an index's own model."""
    if body.model.startswith(INDEX_MODEL):
        grant.require("read", body.model[len(INDEX_MODEL):], what="embeddings")
    else:
        grant.require("read", every_index=True, what=f"embeddings with profile {body.model!r}")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise InputError("input: no texts; send a string or a non-empty list of strings")
    limit = state.settings.server.max_batch
    if len(texts) > limit:
        raise RequestTooLarge(f"input: {len(texts)} texts in one request, over [server] "
                              f"max_batch = {limit}")
    for number, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"input[{number}]: empty text; every input needs some text")
    embedder, fingerprint = state.embedder(body.model)
    dims = embedder.profile.dims
    if body.dimensions is not None and body.dimensions != dims:
        raise InputError(f"dimensions: {body.model} makes {dims}-dimensional vectors, not "
                         f"{body.dimensions} (a shortened vector is another space)")
    if body.input_type == "query":
        vectors, tokens = embedder.embed_queries(texts), None
    else:
        batch = embedder.embed_documents(texts)
        if batch.failed:
            row, reason = next(iter(batch.failed.items()))
            raise ProviderError(f"input[{row}] could not be embedded with {embedder.profile.name!r}: {reason}")
        vectors, tokens = batch.vectors, batch.tokens
    if tokens is None:
        tokens = sum(embedder.count_tokens(texts))
    content = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": body.model,
        "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)},
        "fingerprint": fingerprint,
        "profile": embedder.profile.name,
    }
    # A JSONResponse as it is: FastAPI's encoder would walk every float one by one.
    return JSONResponse(content, headers={FINGERPRINT_HEADER: fingerprint})


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    import numpy as np

    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()  # type: ignore[no-any-return]


# --- models ---------------------------------------------------------------------------------


@router.get("/models")
def models(state: State, grant: GrantDep) -> dict[str, Any]:
    """Embedding profiles, each live index the key may read (``index:<name>``) and the
    chat backends."""
    from embedpipe.index import IndexVersions
    from embedpipe.status import profile_status

    settings = state.settings
    cards = [_card(p["name"], "embedding", {k: p[k] for k in (
        "provider", "model", "hosted", "dims", "fingerprint", "usable", "deprecation", "live_indexes")})
        for p in profile_status(settings)]
    versions = IndexVersions.open(settings)
    aliases = versions.aliases()
    for version in versions.versions():
        if aliases.get(version.index) == version.collection and grant.may("read", version.index):
            cards.append(_card(f"{INDEX_MODEL}{version.index}", "embedding", {
                "profile": version.profile, "dims": version.dims, "fingerprint": version.fingerprint}))
    for name in settings.chat.route:
        backend = settings.chat.backends[name]
        cards.append(_card(name, "chat", {"model": backend.model, "hosted": backend.hosted}))
    return {"object": "list", "data": cards}


def _card(name: str, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "embedpipe",
            "embedpipe": {"kind": kind, **extra}}


# --- chat -----------------------------------------------------------------------------------


@router.post("/chat/completions", responses=ERRORS)
def chat_completions(body: ChatRequest, state: State, grant: GrantDep) -> Any:
    """OpenAI-compatible chat through the gateway; ``stream: true`` answers server-sent events."""
    grant.require("chat", what="chat completions")
    gateway = state.gateway()
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    if not body.stream:
        result = gateway.chat(messages, sensitive=body.sensitive, **body.params())
        return JSONResponse(_completion(result), headers={BACKEND_HEADER: result.backend})
    stream = gateway.stream(messages, sensitive=body.sensitive, **body.params())
    pieces = iter(stream)
    first = next(pieces, None)  # routes the request: no backend -> 503 before any byte
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _events(stream, pieces, first, include_usage)
    return StreamingResponse(_relay(events), media_type="text/event-stream",
                             headers={BACKEND_HEADER: stream.backend or "", "Cache-Control": "no-cache"})


def _usage(result: ChatResult) -> dict[str, int] | None:
    if result.input_tokens is None or result.output_tokens is None:
        return None
    return {"prompt_tokens": result.input_tokens, "completion_tokens": result.output_tokens,
            "total_tokens": result.input_tokens + result.output_tokens}


def _extension(result: ChatResult) -> dict[str, Any]:
    return {"backend": result.backend, "fallbacks": result.fallbacks, "latency_s": result.latency_s,
            "ttft_s": result.ttft_s, "cost_usd": result.cost_usd, "request_id": result.request_id}


def _completion(result: ChatResult) -> dict[str, Any]:
    message = {"role": "assistant", "content": result.content}
    return {
        "id": f"chatcmpl-{result.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": result.model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason or "stop",
                     "logprobs": None}],
        "usage": _usage(result), "embedpipe": _extension(result),
    }


def _events(stream: ChatStream, pieces: Iterator[str], first: str | None,
            include_usage: bool) -> Iterator[str]:
    """The stream as OpenAI's server-sent events: a role chunk, content chunks, a finish
    chunk (with the ``embedpipe`` extension), the usage chunk when asked, ``[DONE]``."""
    base = {"id": f"chatcmpl-{stream.request_id}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": stream.model}

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse({**base, "choices": [choice], **more})

    try:
        yield chunk({"role": "assistant", "content": ""})
        if first:
            yield chunk({"content": first})
        for piece in pieces:
            yield chunk({"content": piece})
    except EmbedpipeError as exc:  # after the first byte: an error event, no [DONE]
        yield _sse({"error": {"type": type(exc).__name__, "message": str(exc), "param": None}})
        return
    finally:  # the client hung up, or the stream ended: release the backend's connection
        getattr(pieces, "close", lambda: None)()
    result = stream.result
    if result is None:  # pragma: no cover - the gateway sets it when a stream ends
        return
    yield chunk({}, result.finish_reason or "stop", embedpipe=_extension(result))
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(result)})
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_END = object()


async def _relay(events: Iterator[str]) -> AsyncIterator[str]:
    """Pull each event in the threadpool (the backend's socket blocks), and close the
    gateway's stream whatever way the response ends: a client that hangs up is recorded
    as an abandoned stream and its backend connection is released."""
    try:
        while True:
            event = await run_in_threadpool(next, events, _END)
            if event is _END:
                return
            yield event  # type: ignore[misc]
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)  # type: ignore[attr-defined]
