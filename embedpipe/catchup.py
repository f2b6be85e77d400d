"""Making a version hold corpus documents: the one catch-up.

An ingest that runs while a migration builds a version, the migration's backfill,
catch-up and final pass, and a rollback all make a version hold (some of) the corpus
through these functions. They are idempotent: what a version already holds with the
corpus's record hash is skipped, so a re-run after a crash redoes only what is missing.

A document may be several points (its chunks, when the version chunks). Rewriting a
document removes the points it no longer has (a text that got shorter has fewer
chunks); a document the model could not embed is not written at all (the pipeline
writes a document's chunks only once all of them embedded), so it keeps its old points.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.chunking import chunker_for, works_for_row
from embedpipe.index import IndexVersions, Version, point_id
from embedpipe.pipeline import PipelineStats, Work, embed_and_write

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.config import Settings
    from embedpipe.corpus import CorpusStore
    from embedpipe.vectors import VectorStore

__all__ = ["SyncStats", "stale_ids", "sync_version", "write_documents"]

Progress = Callable[[int], None]
ProgressFactory = Callable[[int], Progress]


@dataclass
class SyncStats:
    """What making a version hold the corpus cost."""

    written: int = 0  # points upserted (new, changed text or changed metadata)
    deleted: int = 0  # documents removed because the corpus no longer has them
    embedded: int = 0  # texts sent to a model
    reused: int = 0  # vectors taken from the vector store
    truncated: int = 0
    chunked: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # document id -> reason

    def add(self, other: SyncStats | PipelineStats, written: int = 0) -> None:
        self.written += getattr(other, "written", written)
        self.deleted += getattr(other, "deleted", 0)
        self.embedded += other.embedded
        self.reused += other.reused
        self.truncated += other.truncated
        self.chunked += other.chunked
        self.failures.update(other.failures)


def stale_ids(versions: IndexVersions, corpus: CorpusStore, version: Version) -> tuple[list[str], list[str]]:
    """(ids the version lacks or holds stale, ids it holds that the corpus dropped)."""
    held = versions.contents(version.collection)
    known = corpus.known()
    stale = [i for i, k in known.items() if held.get(i) != k.record_hash]
    gone = [i for i in held if i not in known]
    return stale, gone


def write_documents(
    versions: IndexVersions,
    corpus: CorpusStore,
    version: Version,
    ids: Sequence[str],
    embedder: Embedder,
    store: VectorStore,
    settings: Settings,
    progress: Progress | None = None,
    on_batch: Callable[[int], None] | None = None,
    gate: Callable[[Iterable[Work]], Iterable[Work]] | None = None,
) -> SyncStats:
    """Embed (reusing stored vectors) and upsert the corpus documents ``ids`` into
    ``version``, chunked as the version records; then drop the points those documents
    no longer have. ``gate`` wraps the stream of works (``EmbedAhead.gate``: each
    waits for its vector from the cluster)."""
    stats = SyncStats()
    if not ids:
        return stats
    wanted = pa.array(sorted(set(ids)), pa.string())
    store_text = settings.index_store_text(version.index)
    chunker = chunker_for(version, embedder)
    # Chunked documents may leave points behind (fewer chunks than before): note what
    # each held, so whatever the rewrite did not overwrite can go.
    held = versions.holdings(version.collection, wanted.to_pylist()) if chunker else {}
    written: set[str] = set()

    def items() -> Iterator[Work]:
        for batch in corpus.iter_batches():
            rows = batch.filter(pc.is_in(batch.column("id"), value_set=wanted))
            for row in rows.to_pylist():
                yield from works_for_row(row, store_text, chunker)

    def write(keys: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        versions.upsert(version.collection, keys, vectors, payloads)  # acknowledged: the checkpoint
        written.update(point_id(k) for k in keys)
        stats.written += len(keys)
        if on_batch is not None:
            on_batch(len(keys))

    works = gate(items()) if gate is not None else items()
    done = embed_and_write(works, embedder, write, store, window=settings.window, progress=progress)
    stats.add(done, written=0)
    if held:  # a failed document was not written at all: its old points stay
        leftovers = [p for doc, h in held.items() if doc not in done.failures
                     for p in h.points if p not in written]
        versions.delete_points(version.collection, leftovers)
    return stats


def sync_version(
    versions: IndexVersions,
    corpus: CorpusStore,
    version: Version,
    embedder: Embedder,
    store: VectorStore,
    settings: Settings,
    progress: ProgressFactory | None = None,
) -> SyncStats:
    """Make ``version`` hold exactly the corpus: write what it lacks or holds stale,
    delete what the corpus no longer has. Idempotent; cheap when nothing changed."""
    stale, gone = stale_ids(versions, corpus, version)
    if gone:
        versions.delete_documents(version.collection, gone)
    stats = write_documents(
        versions, corpus, version, stale, embedder, store, settings,
        progress=progress(len(stale)) if progress and stale else None,
    )
    stats.deleted += len(gone)
    return stats
