"""Hosted embeddings: OpenAI, or any OpenAI-compatible server (vLLM, TEI, Infinity, Ollama).

Texts are counted exactly (tiktoken, offline), packed into requests within the
provider's limits (inputs per request, tokens per request, tokens per input), and
sent through the one retry loop in ``_openai``. A text over the per-input limit is
split into pieces whose vectors are averaged by token count (``long_inputs =
"chunk"``) or reported as failed (``"reject"``); it never becomes an API error.

A request that still fails after its retries fails only its own texts, each with the
reason; the pipeline leaves them out of the index and the report lists them. So does a
vector with NaN or infinite values (the request is halved until that text stands alone).
Errors no retry can fix (refused key, retired model, wrong dimension, vector count or
indices other than exactly 0..n-1) stop the whole run.

Vectors travel as base64 when the server supports it (a quarter of the bytes of
JSON floats); a server that ignores ``encoding_format`` answers with floats, which is
noticed on the first response and remembered.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.backends._openai import (
    Attempt,
    MalformedResponse,
    ReplicasDown,
    RequestFailed,
    call_with_retries,
    check_sovereignty,
    classify,
    endpoint,
    endpoint_judge,
    limiter_for,
    profile_client,
)
from embedpipe.backends.base import EmbedBatch
from embedpipe.backends.breaker import Breaker
from embedpipe.errors import DimensionMismatch, ModelError, ProviderError
from embedpipe.profiles import Profile, fingerprint
from embedpipe.tokens import TokenCounter
from embedpipe.usage import UsageLedger

if TYPE_CHECKING:
    import openai

__all__ = ["HostedEmbedder", "PlannedInput", "checked_vectors", "decode_embedding", "mean_of_pieces",
           "pack_requests", "plan_inputs"]

log = logging.getLogger(__name__)

PROBE_TEXT = "embedpipe dimension probe"


@dataclass(frozen=True)
class PlannedInput:
    """One input as sent to the API: a whole text, or a piece of a long one."""

    row: int  # position in the caller's texts
    text: str
    tokens: int


@dataclass(frozen=True)
class _Endpoint:
    url: str
    client: openai.OpenAI
    breaker: Breaker


class HostedEmbedder:
    """Embeddings over the OpenAI protocol for one profile (and its replicas)."""

    def __init__(
        self, profile: Profile, ledger: UsageLedger | None = None, sovereign: bool = False
    ) -> None:
        if profile.provider != "openai":
            raise ModelError(f"profile {profile.name!r} is not an OpenAI-protocol model")
        check_sovereignty(profile, sovereign)  # before a client, a key or a byte sent
        self.profile = profile
        self.ledger = ledger
        self.limiter = limiter_for(profile)
        self.client: openai.OpenAI = profile_client(profile)  # fails now on a missing key
        # Replicas serve the same model: a request moves to the next one when an endpoint
        # fails, and an endpoint that keeps failing is skipped for a while (its breaker).
        limits = profile.limits
        self.endpoints = [
            _Endpoint(url, client, Breaker(limits.breaker_failures, limits.breaker_cooldown_s))
            for url, client in [(endpoint(profile), self.client)] + [
                (r.base_url, profile_client(profile, r)) for r in profile.replicas]
        ]
        self.counter = TokenCounter(profile.tokenizer)
        self._format = "base64"
        self._format_lock = threading.Lock()

    @classmethod
    def from_settings(cls, profile: Profile, settings: Any | None) -> HostedEmbedder:
        if settings is None:
            return cls(profile)
        return cls(profile, UsageLedger(settings.data_dir), settings.sovereign)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.profile)

    @property
    def concurrency(self) -> int:
        """Requests the pipeline may have in flight at once."""
        return self.profile.limits.concurrency

    @property
    def max_tokens(self) -> int | None:
        return self.profile.max_tokens

    def check(self) -> None:
        """One tiny request: proves the key, the model and the dimension before any write."""
        inputs = [PlannedInput(0, PROBE_TEXT, self.counter.count([PROBE_TEXT])[0])]
        try:
            self._request(inputs, max_retries=min(2, self.profile.limits.max_retries))
        except RequestFailed as exc:
            raise ProviderError(
                f"profile {self.profile.name!r}: {endpoint(self.profile)} did not answer a probe "
                f"request ({exc.reason}); check base_url and that the server is up"
            ) from None

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        """Vectors in input order; texts that could not be embedded are in ``failed``."""
        prompt = self.profile.document_prompt
        return self._embed([prompt + t for t in texts])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Exact tokens of each document as the API bills them (document prompt included)."""
        prompt = self.profile.document_prompt
        return self.counter.count([prompt + t for t in texts]) if texts else []

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of the tokens the API would count."""
        return self.counter.spans(text)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_queries([text])[0]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many queries in as few requests as the limits allow; rows in input order."""
        batch = self._embed([self.profile.query_prompt + t for t in texts])
        if batch.failed:
            row, reason = next(iter(batch.failed.items()))
            raise ProviderError(f"cannot embed the query {texts[row][:60]!r} with "
                                f"{self.profile.name!r}: {reason}")
        return batch.vectors

    # --- planning ------------------------------------------------------------------

    def _embed(self, texts: list[str]) -> EmbedBatch:
        inputs, failed = self._plan(texts)
        pieces = []
        for request in self._pack(inputs):
            pieces.extend(self._request_or_split(request, failed))
        vectors = mean_of_pieces(self.profile, len(texts), pieces, failed)
        tokens = sum(item.tokens for item in inputs if item.row not in failed)
        return EmbedBatch(vectors, failed=failed, chunked=_count_chunked(inputs, failed), tokens=tokens)

    def _plan(self, texts: list[str]) -> tuple[list[PlannedInput], dict[int, str]]:
        return plan_inputs(self.profile, self.counter, texts)

    def _request_or_split(
        self, request: list[PlannedInput], failed: dict[int, str]
    ) -> list[tuple[PlannedInput, np.ndarray]]:
        """Vectors for a request's inputs; failures go to ``failed``. A request the server
        refuses for its content is halved until the offending input stands alone, so one
        bad text never fails the texts packed with it."""
        try:
            return list(zip(request, self._request(request)))
        except RequestFailed as exc:
            if exc.refused and len(request) > 1:
                half = len(request) // 2
                return (self._request_or_split(request[:half], failed)
                        + self._request_or_split(request[half:], failed))
            for item in request:
                failed.setdefault(item.row, exc.reason)
            return []

    def _pack(self, inputs: list[PlannedInput]) -> list[list[PlannedInput]]:
        """Consecutive inputs grouped into requests within the inputs and tokens caps."""
        limits = self.profile.limits
        cap = limits.max_request_tokens
        if self.limiter.request_token_cap:  # keep each request inside the token budget's burst
            cap = max(1, min(cap, self.limiter.request_token_cap))
        return pack_requests(inputs, limits.max_inputs, cap)

    # --- one request -----------------------------------------------------------------

    def _request(self, request: list[PlannedInput], max_retries: int | None = None) -> np.ndarray:
        tokens = sum(i.tokens for i in request)
        texts = [i.text for i in request]
        vectors, billed = call_with_retries(
            self.profile, lambda: self._send(texts), tokens, self.limiter, Attempt(), max_retries
        )
        if self.ledger is not None:
            self.ledger.record(self.profile.name, self.profile.model, "embeddings", len(texts),
                               billed if billed is not None else tokens,
                               self.profile.price_per_million_tokens)
        return vectors

    def _send(self, texts: list[str]) -> tuple[np.ndarray, int | None]:
        """One request, to the first endpoint able to answer it (the profile's own, then
        its replicas); without replicas, straight to the one endpoint."""
        if len(self.endpoints) == 1:
            return self._send_to(self.client, texts)
        failed = []
        for ep in self.endpoints:
            if not ep.breaker.allow():
                failed.append(f"{ep.url}: circuit breaker open")
                continue
            try:
                # The breaker gets its verdict on every way out, so a probe is never
                # left pending (which would refuse this endpoint for good).
                with ep.breaker.attempt(endpoint_judge):
                    return self._send_to(ep.client, texts)
            except Exception as exc:
                failure = classify(exc)
                if failure is None or not failure.retryable:
                    raise  # the same at every replica: a refused request, a wrong dimension
                failed.append(f"{ep.url}: {failure.reason}")
        raise ReplicasDown("every endpoint failed (" + "; ".join(failed) + ")")

    def _send_to(self, client: openai.OpenAI, texts: list[str]) -> tuple[np.ndarray, int | None]:
        fmt = self._format
        params: dict[str, Any] = {"model": self.profile.model, "input": texts, "encoding_format": fmt}
        if self.profile.dimensions:
            params["dimensions"] = self.profile.dimensions
        try:
            raw = client.embeddings.with_raw_response.create(**params)
        except _bad_request() as exc:
            if fmt != "base64" or "encoding_format" not in str(exc):
                raise
            with self._format_lock:  # a server that refuses base64 outright: ask it again
                self._format = "float"
            return self._send_to(client, texts)
        self.limiter.observe(raw.headers)
        try:
            parsed = raw.parse()
            data = list(parsed.data)
            indices = [d.index for d in data]
            vectors = [self._decode(d.embedding, fmt) for d in data]
            billed = getattr(getattr(parsed, "usage", None), "prompt_tokens", None)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # Missing data, an HTML page from a proxy, non-numbers: retry like a torn body.
            raise MalformedResponse(f"{type(exc).__name__}: {exc}") from None
        stacked = checked_vectors(self.profile, indices, vectors, len(texts))
        return stacked, billed if isinstance(billed, int) else None

    def _decode(self, embedding: Any, fmt: str) -> np.ndarray:
        if isinstance(embedding, list) and fmt == "base64":
            # The server ignores encoding_format: ask for floats from now on.
            with self._format_lock:
                if self._format == "base64":
                    log.info("%s answers floats; not asking for base64 again", endpoint(self.profile))
                    self._format = "float"
        return decode_embedding(embedding)


# --- the pure parts, shared with the Batch API (``embedpipe.batch``) ----------------------


def plan_inputs(
    profile: Profile, counter: TokenCounter, texts: Sequence[str]
) -> tuple[list[PlannedInput], dict[int, str]]:
    """Inputs within the per-input limit; over-long texts are split (``long_inputs =
    "chunk"``) or failed with the reason (``"reject"``). ``failed``: row -> reason."""
    limit = profile.max_tokens or 8192
    inputs: list[PlannedInput] = []
    failed: dict[int, str] = {}
    for row, (text, count) in enumerate(zip(texts, counter.count(texts))):
        if count <= limit:
            inputs.append(PlannedInput(row, text, count))
        elif profile.long_inputs == "reject":
            failed[row] = (
                f"text has {count} tokens, over the {limit}-token limit of "
                f"{profile.name!r} (long_inputs = \"reject\"); split it or set "
                "long_inputs = \"chunk\""
            )
        else:
            inputs.extend(PlannedInput(row, p.text, p.tokens) for p in counter.split(text, limit))
    return inputs, failed


def pack_requests(
    inputs: Sequence[PlannedInput], max_inputs: int, max_tokens: int
) -> list[list[PlannedInput]]:
    """Consecutive inputs grouped into requests of at most ``max_inputs`` inputs and
    ``max_tokens`` tokens (an input is never cut here: ``plan_inputs`` already did)."""
    requests: list[list[PlannedInput]] = []
    current: list[PlannedInput] = []
    used = 0
    for item in inputs:
        if current and (len(current) >= max_inputs or used + item.tokens > max_tokens):
            requests.append(current)
            current, used = [], 0
        current.append(item)
        used += item.tokens
    if current:
        requests.append(current)
    return requests


def decode_embedding(embedding: Any) -> np.ndarray:
    """One vector from a response: base64 little-endian float32, or a list of floats."""
    if isinstance(embedding, str):
        try:
            return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4").astype(np.float32)
        except ValueError as exc:
            raise MalformedResponse(f"bad base64 vector: {exc}") from None
    if isinstance(embedding, list):
        try:
            vector = np.asarray(embedding, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise MalformedResponse(f"a vector that is not numbers ({exc})") from None
        if vector.ndim != 1:
            raise MalformedResponse(f"a vector of shape {vector.shape}")
        return vector
    raise MalformedResponse(f"vector of type {type(embedding).__name__}")


def checked_vectors(profile: Profile, indices: list[Any], vectors: list[np.ndarray], n: int) -> np.ndarray:
    """The ``n`` vectors of one response in input order, after every check: indices
    exactly 0..n-1 (``ProviderError``), one shape (``MalformedResponse``), the profile's
    width (``DimensionMismatch``), finite values (``RequestFailed``, refused)."""
    _check_indices(profile, indices, n)
    by_index = dict(zip(indices, vectors))
    ordered = [by_index[row] for row in range(n)]
    widths = {v.shape for v in ordered}
    if len(widths) > 1:
        raise MalformedResponse(f"vectors of different shapes {sorted(widths)}")
    if widths != {(profile.dims,)}:
        raise DimensionMismatch(
            f"profile {profile.name!r} says dims = {profile.dims} but "
            f"{endpoint(profile)} returned {widths.pop()[0]}-dimensional vectors; fix "
            f"dims (or dimensions) under [profiles.{profile.name}]"
        )
    stacked = np.stack(ordered)
    if not np.isfinite(stacked).all():
        # Tied to the input (an overflow in the model): a retry gives the same, and a
        # zero or NaN vector must never be stored. Refused, so the request is halved
        # until the text stands alone and only it fails.
        raise RequestFailed(f"{endpoint(profile)} returned a vector with NaN or "
                            "infinite values for this text", refused=True)
    return stacked


def _check_indices(profile: Profile, indices: list[Any], n: int) -> None:
    """Each input's vector is placed by its ``index``: the indices must be exactly
    0..n-1, or vectors would land on the wrong texts (and in the vector cache)."""
    where = f"{endpoint(profile)} returned"
    model = f"(model {profile.model!r}); the server is not speaking the protocol"
    if len(indices) != n:
        raise ProviderError(f"{where} {len(indices)} vectors for {n} inputs {model}")
    if sorted(i for i in indices if type(i) is int) != list(range(n)):
        shown = ", ".join(map(str, indices[:8])) + (", ..." if n > 8 else "")
        raise ProviderError(f"{where} vectors with indices [{shown}] for {n} inputs; each "
                            f"of 0..{n - 1} must appear once {model}")


def mean_of_pieces(
    profile: Profile, n: int, pieces: Sequence[tuple[PlannedInput, np.ndarray]],
    failed: Mapping[int, str],
) -> np.ndarray:
    """One vector per row: the token-weighted mean of its pieces' vectors (a whole text
    is its own single piece), normalised when the profile says so; a failed row (or a
    row with no piece) is all zeros."""
    vectors = np.zeros((n, profile.dims), dtype=np.float32)
    weights = np.zeros(n, dtype=np.float64)
    for item, vec in pieces:
        vectors[item.row] += vec * item.tokens
        weights[item.row] += item.tokens
    ok = weights > 0
    vectors[ok] /= weights[ok, None].astype(np.float32)
    if profile.normalize:
        _normalize(vectors, ok)
    for row in failed:  # a text with one failed piece has no vector at all
        vectors[row] = 0.0
    return vectors


def _normalize(vectors: np.ndarray, rows: np.ndarray) -> None:
    norms = np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    vectors[rows] /= norms


def _bad_request() -> type[Exception]:
    import openai

    return openai.BadRequestError


def _count_chunked(inputs: list[PlannedInput], failed: dict[int, str]) -> int:
    pieces: dict[int, int] = {}
    for item in inputs:
        pieces[item.row] = pieces.get(item.row, 0) + 1
    return sum(1 for row, n in pieces.items() if n > 1 and row not in failed)
