"""One chat endpoint speaking the OpenAI protocol, as the gateway routes it.

The client, the key rule, the deadlines and the error classification are the shared
OpenAI-protocol layer's (``_openai``), the same as for embeddings. Every reply is parsed
and checked here, inside that classified handling: a 200 without choices, a chunk of the
wrong shape or a stream's error event is the backend's failure ("malformed"), like a
timeout or a 5xx, so the gateway falls back and audits it; nothing raw escapes.

Deadlines: a request ends within ``timeout_s``, however slowly the bytes come. A stream
must deliver its first token within ``first_token_timeout_s`` (keep-alive comments do not
count); from then on ``timeout_s`` bounds it, counted from its start.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedpipe.backends._openai import (
    OPENAI_URL,
    Deadline,
    MalformedResponse,
    check_key_transport,
    classify,
    key_env_for,
    make_client,
    read_key,
    scope,
)
from embedpipe.errors import ConfigError

if TYPE_CHECKING:
    import openai

    from embedpipe.config import ChatBackendSettings

__all__ = ["Answer", "ChatBackend", "ChatFailure", "Delta", "OpenStream"]

Message = Mapping[str, Any]


class ChatFailure(Exception):
    """An attempt failed; ``fallback`` says whether another backend may be tried."""

    def __init__(self, kind: str, reason: str, fallback: bool = True) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.fallback = kind, reason, fallback


@dataclass(frozen=True)
class Answer:
    """A whole (non-streamed) reply, checked."""

    content: str
    finish: str | None
    input_tokens: int | None
    output_tokens: int | None


@dataclass(frozen=True)
class Delta:
    """What one stream chunk carried."""

    text: str
    finish: str | None
    usage: tuple[int | None, int | None] | None  # (prompt, completion) tokens


@dataclass
class OpenStream:
    """A stream being read: the SDK's stream (to close) and its chunk iterator."""

    stream: Any
    chunks: Iterator[Any]
    deadline: Deadline

    def close(self) -> None:
        """Release the connection (a stream abandoned, failed over or finished)."""
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001 - a broken connection is closed either way
            pass


class ChatBackend:
    """One OpenAI-protocol chat endpoint, with its timeouts, key and prices."""

    def __init__(self, name: str, cfg: ChatBackendSettings) -> None:
        self.name, self.cfg = name, cfg
        self._client: openai.OpenAI | None = None
        self._table = f"[chat.backends.{name}]"
        if key_env_for(cfg.base_url, cfg.api_key_env) is not None:  # a config mistake: say so now
            check_key_transport(cfg.base_url or OPENAI_URL, f"chat backend {name!r}", self._table,
                                cfg.allow_insecure_key)

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            cfg = self.cfg
            try:
                key = read_key(f"chat backend {self.name!r}", self._table, cfg.base_url,
                               cfg.api_key_env, cfg.allow_insecure_key)
            except ConfigError:  # the key is missing here: another backend may answer
                var = key_env_for(cfg.base_url, cfg.api_key_env)
                raise ChatFailure("no_key", f"no API key in ${var}") from None
            self._client = make_client(cfg.base_url, key, cfg.timeout_s, cfg.connect_timeout_s)
        return self._client

    def cost(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        pin, pout = self.cfg.price_input_per_million, self.cfg.price_output_per_million
        if pin is None and pout is None:
            return 0.0 if not self.cfg.hosted else None
        return round(((input_tokens or 0) * (pin or 0) + (output_tokens or 0) * (pout or 0)) / 1e6, 8)

    def complete(self, messages: Sequence[Message], params: Mapping[str, Any]) -> Answer:
        """A whole reply within ``timeout_s`` (the client's own deadline)."""
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=list(messages), **params)
            return _answer(resp)
        except ChatFailure:
            raise
        except Exception as exc:
            raise self._failure(exc, f"timeout_s = {self.cfg.timeout_s:g}") from None

    def open_stream(self, messages: Sequence[Message], params: Mapping[str, Any]) -> OpenStream:
        """Send a streamed request; its deadline is the first token's until ``started``."""
        first = self.cfg.first_token_timeout_s
        deadline = Deadline(first or self.cfg.timeout_s,
                            f"first_token_timeout_s = {first:g}" if first else
                            f"timeout_s = {self.cfg.timeout_s:g}")
        try:
            with scope(deadline):
                stream = self.client.chat.completions.create(
                    model=self.cfg.model, messages=list(messages), stream=True,
                    stream_options={"include_usage": True}, **params)
            return OpenStream(stream, iter(stream), deadline)
        except ChatFailure:
            raise
        except Exception as exc:
            raise self._failure(exc, deadline.what) from None

    def started(self, open_stream: OpenStream) -> None:
        """The first token came: ``timeout_s`` now bounds the stream, from its start."""
        open_stream.deadline.extend_to(self.cfg.timeout_s, f"timeout_s = {self.cfg.timeout_s:g}")

    def next_delta(self, open_stream: OpenStream) -> Delta | None:
        """The next chunk's content, None at the stream's end; failures classified."""
        deadline = open_stream.deadline
        try:
            chunk = next(open_stream.chunks, None)
            delta = None if chunk is None else _delta(chunk)
        except Exception as exc:
            raise self._failure(exc, deadline.what) from None
        if delta is not None and deadline.passed():  # it came, but too late: not handed on
            raise ChatFailure("timeout", f"timed out ({deadline.what})")
        return delta

    def _failure(self, exc: Exception, limit: str) -> Exception:
        """The routing meaning of an error; one that is not a protocol failure (our own
        bug) is returned as it is, to be raised unchanged."""
        failure = classify(exc, limit)
        if failure is None:
            return exc
        return ChatFailure(failure.kind, failure.reason, fallback=not failure.refused)


def _answer(resp: Any) -> Answer:
    try:
        choice = resp.choices[0]
        content = choice.message.content
        usage = resp.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (None, None)
    except (IndexError, AttributeError, TypeError, KeyError) as exc:
        raise MalformedResponse(f"no usable choice: {type(exc).__name__}") from None
    if content is not None and not isinstance(content, str):
        raise MalformedResponse("message content is not text")
    return Answer(content or "", choice.finish_reason, *tokens)


def _delta(chunk: Any) -> Delta:
    try:
        usage = chunk.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else None
        finish, texts = None, []
        for choice in chunk.choices or []:
            finish = choice.finish_reason or finish
            if choice.delta is not None and choice.delta.content:
                texts.append(choice.delta.content)
        text = "".join(texts)  # TypeError: content that is not text
    except (AttributeError, TypeError, KeyError) as exc:
        raise MalformedResponse(f"a stream chunk of the wrong shape: {type(exc).__name__}") from None
    return Delta(text, finish, tokens)
