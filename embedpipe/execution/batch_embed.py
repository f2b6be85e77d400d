"""Embedding through the provider's Batch API (``--batch``): half the price, results
within the profile's completion window (24 h for OpenAI).

This is the ``embed`` step of :class:`~embedpipe.execution.EmbedAhead` for a hosted
OpenAI profile: the driver plans the texts the vector store lacks as it does for Ray, and
:func:`embedpipe.batch.embed_with_batches` packs them into batch input files, submits
them and stores each batch's vectors as it finishes. Every stored text advances the
write path, so the index version is written as results arrive.

The write path itself never calls the synchronous API in a batch run
(:class:`BatchOnly`): a text the batches could not embed is reported failed with the
batch's reason, never re-sent at the full price behind the user's back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.backends.base import EmbedBatch
from embedpipe.corpus import content_hash
from embedpipe.errors import BatchError, ConfigError

if TYPE_CHECKING:
    from embedpipe.backends.base import Embedder
    from embedpipe.batch import BatchStats
    from embedpipe.config import Settings
    from embedpipe.execution import PreEmbedStats
    from embedpipe.profiles import Profile
    from embedpipe.vectors import VectorStore

__all__ = ["BatchOnly", "Stopped", "batch_section", "embed_on_batch_api", "require_batch_profile"]


class Stopped(Exception):
    """The run was left (the write path failed or was interrupted) while batches were
    pending; they stay in the state file and the next run resumes them."""


def require_batch_profile(profile: Profile) -> None:
    """One line unless ``profile`` is served through an OpenAI-protocol Batch API."""
    if profile.provider != "openai":
        raise ConfigError(
            f"--batch embeds through a provider's Batch API; profile {profile.name!r} is a "
            "local model (use --executor local or --executor ray)")


def _sleeper(stop: threading.Event | None) -> Callable[[float], None]:
    """Waits between polls, and ends the run at once when ``stop`` is set."""

    def sleep(seconds: float) -> None:
        if stop is None:
            threading.Event().wait(seconds)
        elif stop.wait(seconds):
            raise Stopped("left while batches were pending; the same command resumes them")

    return sleep


def embed_on_batch_api(
    settings: Settings,
    profile: Profile,
    fingerprint: str,
    todo: dict[str, str],
    store: VectorStore,
    progress: Callable[[int], None] | None = None,
    parts: Sequence[Sequence[str]] | None = None,
    on_commit: Callable[[list[str]], None] | None = None,
    stop: threading.Event | None = None,
    *,
    state_path: Path,
    resubmit: bool = True,
    failed: dict[str, str] | None = None,
) -> PreEmbedStats:
    """Embed ``todo`` (content hash -> text) through the Batch API into ``store``; the
    signature of ``embed_on_ray`` plus the state file (batch and file ids, so a killed
    run resumes the same batches) and ``resubmit``. Texts the batches could not embed
    land in ``failed`` (hash -> reason) and are settled for the write path too."""
    from embedpipe.batch import embed_with_batches
    from embedpipe.execution import PreEmbedStats
    from embedpipe.usage import UsageLedger

    def stored(hashes: list[str]) -> None:
        if on_commit is not None:
            on_commit(hashes)
        if progress is not None:
            progress(len(hashes))

    # A stopped run leaves between uploads too, not only while polling: the state file
    # holds what was submitted and the next run resumes it.
    try:
        run = embed_with_batches(
            profile, todo, store, state_path, UsageLedger(settings.data_dir), resubmit=resubmit,
            on_stored=stored, sovereign=settings.sovereign, sleep=_sleeper(stop),
            should_stop=stop.is_set if stop is not None else None)
    except BatchError as exc:
        if stop is not None and stop.is_set():
            raise Stopped(str(exc)) from exc
        raise
    if failed is not None:
        failed.update(run.failed)
    if on_commit is not None and run.failed:
        on_commit(list(run.failed))  # settled: the write path reports them
    return PreEmbedStats(executor="batch", planned=len(todo), partitions=run.batches,
                         committed=sum(1 for s in run.statuses.values() if s == "completed"),
                         embedded=run.stored, failed=len(run.failed), batch=batch_section(run))


def batch_section(run: BatchStats) -> dict[str, Any]:
    """What a report says about the batches of one run (no texts, no keys)."""
    return {"batches": run.batches, "files": run.files, "requests": run.requests,
            "inputs": run.inputs, "tokens": run.tokens, "usd": round(run.usd, 10),
            "stored": run.stored, "resumed": run.resumed, "resubmitted": run.resubmitted,
            "failed": len(run.failed)}


class BatchOnly:
    """The write path's embedder in a batch run: every vector must come from the
    batches, so whatever reaches this fails with the batch's reason instead of being
    sent to the synchronous API at twice the price.

    ``others_to_inner``: only the texts ``reasons`` names fail; the rest go to the real
    embedder (a migration's catch-up: documents ingested during the backfill are new
    work, the ones the batches failed are not sent again)."""

    def __init__(self, inner: Embedder, reasons: Mapping[str, str], others_to_inner: bool = False) -> None:
        self._inner = inner
        self._reasons = reasons
        self._others = others_to_inner
        self.profile = inner.profile

    def __getattr__(self, name: str) -> Any:  # fingerprint, tokens, spans: the real model's
        return getattr(self._inner, name)

    @property
    def concurrency(self) -> int:
        return self._inner.concurrency if self._others else 1

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        hashes = [content_hash(t) for t in texts]
        refused = {n: self._reasons.get(h) or "the Batch API returned no vector for it"
                   for n, h in enumerate(hashes) if not self._others or h in self._reasons}
        vectors = np.zeros((len(texts), self.profile.dims), np.float32)
        rest = [n for n in range(len(texts)) if n not in refused]
        if not rest:
            return EmbedBatch(vectors=vectors, failed=refused)
        done = self._inner.embed_documents([texts[n] for n in rest])
        vectors[rest] = done.vectors
        failed = {**refused, **{rest[n]: reason for n, reason in done.failed.items()}}
        return EmbedBatch(vectors=vectors, failed=failed, truncated=done.truncated, chunked=done.chunked,
                          tokens=done.tokens)
