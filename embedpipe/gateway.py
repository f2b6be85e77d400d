"""Chat generation behind one gateway: self-hosted first, hosted as the fallback.

``[chat] route`` lists backends (OpenAI-protocol endpoints: vLLM, TGI, Ollama, OpenAI)
in the order they are tried. For each request:

* **policy** first: sovereign mode, and a request marked ``sensitive``, leave out every
  ``hosted`` backend; when none remains the request fails before anything is sent;
* a backend whose **circuit breaker** is open is skipped; after ``breaker_failures``
  consecutive failures it opens for ``breaker_cooldown_s``, then lets one probe through
  (half-open): a success closes it, a failure opens it again;
* a **timeout, connection error, 429, 5xx** (or a refused key, an unknown model, a
  malformed body: the backend's fault) moves on to the next backend after the
  backend's own ``retries``; a **400/413/422** is the request's fault and is raised at
  once (another backend would refuse it too);
* a **stream** falls back only before its first token reached the caller; after it, a
  failure raises ``StreamInterrupted`` (a half-told answer is never replayed);
* **deadlines** are wall-clock: ``timeout_s`` bounds the whole request, and a stream's
  first token must come within ``first_token_timeout_s`` (keep-alive comments and
  trickled bytes do not stretch either);
* a reply is parsed and checked inside the same classified handling: a malformed 200
  (no choices) is a failure like a 5xx, with fallback and an audit line;
* the breaker gets its verdict on every way out of an attempt (answer, failure, an
  unexpected error, a caller abandoning the stream), so a half-open probe is never
  left pending.

The client, the key rule, the deadlines and the error classification are the shared
OpenAI-protocol layer's (``backends._openai``, ``backends.chat``), as for embeddings.

Every attempt feeds a rolling window per backend (``stats()``: requests, errors, p50/p95
latency and time to first token, output tokens/s, breaker state), and every request
appends a line to ``<data>/gateway/audit.jsonl``: who answered, why any fallback
happened, tokens and cost. Never message content, never keys.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe._files import make_dir, open_append
from embedpipe.backends.breaker import Breaker
from embedpipe.backends.chat import ChatBackend, ChatFailure, OpenStream
from embedpipe.errors import (
    ChatRequestRejected,
    ConfigError,
    GatewayError,
    NoBackendAvailable,
    StreamInterrupted,
)
from embedpipe.layout import Layout

if TYPE_CHECKING:
    from embedpipe.config import ChatSettings, Settings

__all__ = ["ChatResult", "ChatStream", "Gateway", "summarize"]

Message = Mapping[str, Any]


@dataclass
class ChatResult:
    """One answered chat request."""

    content: str
    backend: str
    model: str
    latency_s: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    ttft_s: float | None = None  # streams: time to the first token
    finish_reason: str | None = None
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # backends tried before, and why
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- stats -------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[k], 4)


def summarize(attempts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Requests, errors, p50/p95 latency and TTFT, output tokens/s of some attempts (the
    in-process window, or lines of the audit log: the same numbers either way)."""
    attempts = list(attempts)
    ok = [a for a in attempts if a["outcome"] == "ok"]
    latencies = [a["latency_s"] for a in ok]
    ttfts = [a["ttft_s"] for a in ok if a.get("ttft_s") is not None]
    out_tokens = sum(a.get("output_tokens") or 0 for a in ok)
    busy = sum(latencies)
    return {
        "requests": len(attempts),
        "errors": len(attempts) - len(ok),
        "error_rate": round((len(attempts) - len(ok)) / len(attempts), 4) if attempts else 0.0,
        "p50_latency_s": _percentile(latencies, 0.5),
        "p95_latency_s": _percentile(latencies, 0.95),
        "p50_ttft_s": _percentile(ttfts, 0.5),
        "p95_ttft_s": _percentile(ttfts, 0.95),
        "output_tokens_per_s": round(out_tokens / busy, 2) if busy else None,
    }


# --- the audit log -----------------------------------------------------------------------


class AuditLog:
    """``<data>/gateway/audit.jsonl``: a line per request, no content, no keys (0600)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Layout(data_dir).audit_log
        self._made = False

    def append(self, record: Mapping[str, Any]) -> None:
        """One ``write`` of one line to a file opened O_APPEND: lines of concurrent writers,
        threads or processes, never interleave. It is on every request's path, so the
        folder is made once and no file object is built."""
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if not self._made:
            make_dir(self.path.parent)
            self._made = True
        fd = open_append(self.path)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self, last: int | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for line in lines[-last:] if last else lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line from a killed process
        return out


# --- the gateway ----------------------------------------------------------------------------


class Gateway:
    """Routes chat requests over ``[chat] route``; see the module docstring.

    >>> gw = Gateway.from_settings(load_settings())
    >>> gw.chat([{"role": "user", "content": "Hello"}]).content
    """

    def __init__(self, chat: ChatSettings, data_dir: Path, sovereign: bool = False) -> None:
        if not chat.route:
            raise ConfigError("no chat backends: add [chat] route = [...] and [chat.backends.NAME] "
                              "tables to embedpipe.toml (see README, Chat)")
        self.settings = chat
        self.sovereign = sovereign
        self.backends = {name: ChatBackend(name, chat.backends[name]) for name in chat.route}
        self.breakers = {name: Breaker(chat.breaker_failures, chat.breaker_cooldown_s)
                         for name in chat.route}
        self._window: dict[str, deque[dict[str, Any]]] = {
            name: deque(maxlen=chat.stats_window) for name in chat.route}
        self._lock = threading.Lock()
        self.audit = AuditLog(data_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> Gateway:
        return cls(settings.chat, settings.data_dir, sovereign=settings.sovereign)

    # -- routing ------------------------------------------------------------------------

    def route(self, sensitive: bool = False) -> list[str]:
        """The backends this request may use, in order; policy applied."""
        if not (self.sovereign or sensitive):
            return list(self.backends)
        allowed = [n for n, b in self.backends.items() if not b.cfg.hosted]
        if not allowed:
            why = "sovereign mode is on" if self.sovereign else "the request is sensitive"
            raise NoBackendAvailable(
                f"{why}, so hosted chat backends are excluded, and [chat] route has no "
                "self-hosted one; add a backend with hosted = false")
        return allowed

    def chat(self, messages: Sequence[Message], sensitive: bool = False, **params: Any) -> ChatResult:
        """One completion from the first backend able to give it."""
        record = self._start("chat", sensitive)
        tried: list[dict[str, Any]] = []
        name, backend, started, answer = self._first_answer(
            sensitive, record, tried, lambda b: b.complete(messages, params))
        result = ChatResult(
            content=answer.content, backend=name, model=backend.cfg.model,
            latency_s=round(time.perf_counter() - started, 4), input_tokens=answer.input_tokens,
            output_tokens=answer.output_tokens, finish_reason=answer.finish, fallbacks=tried,
            request_id=record["id"])
        result.cost_usd = backend.cost(result.input_tokens, result.output_tokens)
        self._succeeded(name, result, tried, record)
        return result

    def _first_answer(
        self, sensitive: bool, record: dict[str, Any], tried: list[dict[str, Any]],
        call: Callable[[ChatBackend], Any],
    ) -> tuple[str, ChatBackend, float, Any]:
        """The routing loop: ``call(backend)`` over the allowed route, skipping open
        breakers and retrying each backend ``retries`` times, until one answers. Every
        attempt gives its breaker a verdict, whatever way it ends."""
        for name in self.route(sensitive):
            backend, breaker = self.backends[name], self.breakers[name]
            for _ in range(backend.cfg.retries + 1):
                if not breaker.allow():
                    tried.append({"backend": name, "outcome": "skipped", "kind": "breaker_open",
                                  "reason": "circuit breaker open"})
                    break
                started = time.perf_counter()
                try:
                    with breaker.attempt(_judge):
                        return name, backend, started, call(backend)
                except ChatFailure as failure:
                    self._failed(name, failure, started, tried)
                    if not failure.fallback:
                        raise self._rejected(name, failure, tried, record) from None
                except Exception as exc:  # not a backend failure: our own; still audited
                    self.audit.append({**record, "outcome": "error", "served_by": None,
                                       "error": type(exc).__name__, "attempts": tried})
                    raise
        raise self._exhausted(tried, record)

    def stream(self, messages: Sequence[Message], sensitive: bool = False, **params: Any) -> ChatStream:
        """Text deltas as they arrive; ``.result`` once exhausted. Falls back only before
        the first token."""
        return ChatStream(self, messages, sensitive, params)

    # -- bookkeeping --------------------------------------------------------------------

    def _start(self, kind: str, sensitive: bool) -> dict[str, Any]:
        return {"id": uuid.uuid4().hex[:16], "ts": _now(), "kind": kind, "sensitive": sensitive,
                "sovereign": self.sovereign}

    def _note(self, name: str, attempt: dict[str, Any]) -> None:
        with self._lock:
            self._window[name].append(attempt)

    def _failed(self, name: str, failure: ChatFailure, started: float,
                tried: list[dict[str, Any]]) -> None:
        attempt = {"backend": name, "outcome": "error", "kind": failure.kind, "reason": failure.reason,
                   "latency_s": round(time.perf_counter() - started, 4)}
        tried.append(attempt)
        self._note(name, attempt)

    def _succeeded(self, name: str, result: ChatResult, tried: list[dict[str, Any]],
                   record: dict[str, Any]) -> None:
        attempt = {"backend": name, "outcome": "ok", "latency_s": result.latency_s,
                   "ttft_s": result.ttft_s, "output_tokens": result.output_tokens}
        self._note(name, attempt)
        self.audit.append({**record, "outcome": "ok", "served_by": name, "model": result.model,
                           "latency_s": result.latency_s, "ttft_s": result.ttft_s,
                           "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
                           "cost_usd": result.cost_usd, "attempts": [*tried, attempt]})

    def _rejected(self, name: str, failure: ChatFailure, tried: list[dict[str, Any]],
                  record: dict[str, Any]) -> ChatRequestRejected:
        self.audit.append({**record, "outcome": "rejected", "served_by": None, "attempts": tried})
        return ChatRequestRejected(
            f"backend {name!r} refused the request ({failure.reason}); fix the request "
            "(another backend would refuse it too)")

    def _exhausted(self, tried: list[dict[str, Any]], record: dict[str, Any]) -> GatewayError:
        self.audit.append({**record, "outcome": "failed", "served_by": None, "attempts": tried})
        summary = "; ".join(f"{a['backend']}: {a['reason']}" for a in tried) or "no backend tried"
        return NoBackendAvailable(f"no chat backend answered ({summary}); see "
                                  "`embedpipe gateway stats`")

    def stats(self) -> dict[str, Any]:
        """Per backend: the rolling window's numbers and the breaker's state."""
        with self._lock:
            windows = {name: list(w) for name, w in self._window.items()}
        return {name: {**summarize(windows[name]), "hosted": self.backends[name].cfg.hosted,
                       "breaker": self.breakers[name].snapshot()} for name in self.backends}


class ChatStream:
    """A streamed reply: iterate for text deltas; ``result`` is set once it ends."""

    def __init__(self, gateway: Gateway, messages: Sequence[Message], sensitive: bool,
                 params: Mapping[str, Any]) -> None:
        self.result: ChatResult | None = None
        # Known once the first delta came out (the route has been decided by then).
        self.request_id = ""
        self.backend: str | None = None
        self.model: str | None = None
        self._events = self._run(gateway, messages, sensitive, params)

    def __iter__(self) -> Iterator[str]:
        return self._events

    def text(self) -> str:
        """Consume the whole stream; the reply's text."""
        return "".join(self)

    def _run(self, gw: Gateway, messages: Sequence[Message], sensitive: bool,
             params: Mapping[str, Any]) -> Iterator[str]:
        record = gw._start("stream", sensitive)
        self.request_id = record["id"]
        tried: list[dict[str, Any]] = []
        name, backend, started, (stream, first) = gw._first_answer(
            sensitive, record, tried, lambda b: _first_token(b, messages, params))
        self.backend, self.model = name, backend.cfg.model
        ttft = time.perf_counter() - started
        try:
            yield from self._rest(gw, name, backend, stream, first, started, ttft, tried, record)
        except GeneratorExit:  # the caller stopped reading: on the record, not a failure
            gw.audit.append({**record, "outcome": "abandoned", "served_by": name,
                             "ttft_s": round(ttft, 4), "attempts": tried})
            raise
        finally:
            stream.close()

    def _rest(self, gw: Gateway, name: str, backend: ChatBackend, stream: OpenStream,
              first: _Head, started: float, ttft: float, tried: list[dict[str, Any]],
              record: dict[str, Any]) -> Iterator[str]:
        """After the first token: no fallback, a failure interrupts the stream."""
        parts = [first.text]
        usage, finish = first.usage, first.finish
        if first.text:
            yield first.text
        try:
            while finish is None or usage is None:
                delta = backend.next_delta(stream)  # within timeout_s from the start
                if delta is None:
                    if finish is None:
                        raise ChatFailure("cut", "the stream ended before its finish")
                    break
                usage, finish = delta.usage or usage, delta.finish or finish
                if delta.text:
                    parts.append(delta.text)
                    yield delta.text
        except ChatFailure as failure:
            gw._failed(name, failure, started, tried)
            gw.breakers[name].record(ok=False)
            gw.audit.append({**record, "outcome": "interrupted", "served_by": name,
                             "ttft_s": round(ttft, 4), "attempts": tried})
            raise StreamInterrupted(
                f"backend {name!r} failed after the first token ({failure.reason}); the partial "
                "answer was not replayed elsewhere") from None
        result = ChatResult(
            content="".join(parts), backend=name, model=backend.cfg.model,
            latency_s=round(time.perf_counter() - started, 4), ttft_s=round(ttft, 4),
            input_tokens=usage[0] if usage else None, output_tokens=usage[1] if usage else None,
            finish_reason=finish, fallbacks=tried, request_id=record["id"])
        result.cost_usd = backend.cost(result.input_tokens, result.output_tokens)
        gw._succeeded(name, result, tried, record)
        self.result = result


@dataclass
class _Head:
    """What a stream delivered up to and including its first token."""

    text: str
    finish: str | None
    usage: tuple[int | None, int | None] | None


def _first_token(backend: ChatBackend, messages: Sequence[Message],
                 params: Mapping[str, Any]) -> tuple[OpenStream, _Head]:
    """Open a stream and read it up to its first content token (or its end), within
    the first-token deadline; the stream is closed on any failure."""
    stream = backend.open_stream(messages, params)
    try:
        finish, usage = None, None
        while True:
            delta = backend.next_delta(stream)
            if delta is None:
                if finish is None:
                    raise ChatFailure("cut", "the stream ended before any token")
                break
            usage, finish = delta.usage or usage, delta.finish or finish
            if delta.text:
                backend.started(stream)
                return stream, _Head(delta.text, finish, usage)
            if finish is not None and usage is not None:
                break
        backend.started(stream)
        return stream, _Head("", finish, usage)
    except BaseException:
        stream.close()
        raise


def _judge(exc: Exception) -> bool | None:
    """A breaker verdict on a failed attempt: a refused request means the backend is
    alive; any other backend failure counts against it; our own errors say nothing."""
    if isinstance(exc, ChatFailure):
        return not exc.fallback
    return None


def log_stats(data_dir: Path, window: int = 500, breaker_failures: int = 3) -> dict[str, Any]:
    """``stats()`` from the audit log, for a process that served nothing itself (the CLI)."""
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for record in AuditLog(data_dir).read():
        for attempt in record.get("attempts", []):
            if attempt.get("outcome") in ("ok", "error"):
                by_backend.setdefault(attempt["backend"], []).append(attempt)
    out = {}
    for name, attempts in by_backend.items():
        recent = attempts[-window:]
        tail = 0
        for a in reversed(recent):
            if a["outcome"] == "ok":
                break
            tail += 1
        out[name] = {**summarize(recent), "consecutive_failures": tail,
                     "breaker": "open" if tail >= breaker_failures else "closed"}
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
