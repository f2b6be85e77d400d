"""The streaming embed-and-upsert engine: the one batching loop of embedpipe.

The embedding model is the bottleneck, so everything else hides behind it:

* texts are gathered in large windows and sorted by length, then encoded in
  chunks, so each chunk pads to nearly its own length (1.35x wasted work was
  measured when small file-order batches pad to their longest text: see the
  measured facts in docs/architecture.md);
* vectors already in the Parquet vector store for this fingerprint are reused,
  and identical texts in a window are embedded once;
* one writer thread owns every write (Qdrant upserts, the vector store), so the
  next chunk encodes while the previous one is written, and the engine
  never sees concurrent writers;
* an embedder that declares ``concurrency > 1`` (a hosted endpoint) gets that
  many chunks in flight at once; results are still written in order;
* texts the embedder reports as failed are never written: they are returned in
  ``PipelineStats.failures`` with their reasons, and the caller leaves them out;
* a document of several points (its chunks) is written whole or not at all: its
  chunks stay in one window and are written once every one of them embedded, so a
  failure leaves the points it had before untouched.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.vectors import VectorStore

__all__ = ["PipelineStats", "Work", "embed_and_write", "plan_chunks"]

WriteFn = Callable[[list[str], np.ndarray, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class Work:
    """One point to place in the index: a document, or one chunk of it."""

    id: str  # the point's key: the document id, or ``<doc_id>#<n>`` for a chunk
    text: str
    content_hash: str
    payload: dict[str, Any]

    @property
    def doc_id(self) -> str:
        return self.payload["id"]

    @property
    def whole(self) -> bool:
        """Whether this point is its document's only one (else it is one of its chunks)."""
        return self.payload.get("chunks", 1) == 1

    @classmethod
    def from_corpus_row(cls, row: dict[str, Any], store_text: bool) -> Work:
        """The work for one corpus row; its payload is what the point carries (points.py)."""
        from embedpipe.points import payload as point_payload

        payload = point_payload(row, store_text)
        return cls(row["id"], row["text"], row["content_hash"], payload)


@dataclass
class PipelineStats:
    documents: int = 0
    embedded: int = 0  # texts actually sent to a model
    reused: int = 0  # vectors taken from the vector store
    truncated: int = 0
    chunked: int = 0  # long texts embedded in pieces and averaged
    failures: dict[str, str] = field(default_factory=dict)  # document id -> reason
    tokens: int | None = 0  # tokens sent to a model (None once a backend could not say)


def plan_chunks(lengths: Sequence[int], chunk: int) -> list[list[int]]:
    """Positions grouped into chunks of at most ``chunk``, longest texts first.

    Sorting the whole window by length means each chunk holds texts of similar
    length, so the model pads little; longest first surfaces memory limits early.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + chunk] for i in range(0, len(order), chunk)]


class _Writer:
    """A single background thread applying writes in order; errors surface on the caller."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedpipe-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_if_failed()
        self._queue.put(job)

    def close(self, raise_error: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if raise_error:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


def embed_and_write(
    items: Iterable[Work],
    embedder: Embedder,
    write: WriteFn,
    store: VectorStore | None = None,
    window: int = 2048,
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> PipelineStats:
    """Embed ``items`` (reusing stored vectors) and hand each chunk to ``write``.

    ``write(ids, vectors, payloads)`` runs on the writer thread, in order. Returns
    once every write has finished; any write error is raised here. Documents the
    embedder could not embed are in ``stats.failures`` and were not written.
    """
    stats = PipelineStats()
    writer = _Writer()
    workers = max(1, int(getattr(embedder, "concurrency", 1)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="embedpipe-embed") if workers > 1 else None
    step = _Step(embedder, write, store, chunk, writer, stats, progress, pool)
    try:
        pending: list[Work] = []
        for item in items:
            # a window ends between documents, never between two chunks of one
            if len(pending) >= window and item.doc_id != pending[-1].doc_id:
                step.window(pending)
                pending = []
            pending.append(item)
        if pending:
            step.window(pending)
    except BaseException:
        writer.close(raise_error=False)  # the error in flight is the one to report
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    writer.close()
    return stats


@dataclass
class _Chunk:
    items: list[Work]
    vectors: np.ndarray
    todo: dict[str, list[int]]  # content hash -> rows this chunk embeds
    later: dict[str, list[int]]  # content hash -> rows an earlier chunk of the window embeds
    result: Future[Any] | Any = None


@dataclass
class _Step:
    """One window: look up stored vectors, embed the rest (in parallel when allowed),
    then finish chunks in order: fill vectors, drop failures, queue the writes."""

    embedder: Embedder
    write: WriteFn
    store: VectorStore | None
    chunk: int
    writer: _Writer
    stats: PipelineStats
    progress: Callable[[int], None] | None
    pool: ThreadPoolExecutor | None

    def window(self, window: list[Work]) -> None:
        cached = self.store.lookup([w.content_hash for w in window]) if self.store is not None else {}
        self.stats.documents += len(window)
        claimed: set[str] = set()  # hashes some chunk of this window embeds
        chunks = []
        for positions in plan_chunks([len(w.text) for w in window], self.chunk):
            chunks.append(self._prepare([window[i] for i in positions], cached, claimed))
        failed_hashes: dict[str, str] = {}
        deferred: list[tuple[list[Work], np.ndarray]] = []  # chunks of multi-point documents
        try:
            for c in chunks:  # in parallel when a pool exists, else one by one below
                if c.todo and self.pool is not None:
                    c.result = self.pool.submit(self._embed, c)
            for c in chunks:
                self._finish(c, cached, failed_hashes, deferred)
            self._write_whole_documents(deferred)
        except BaseException:
            for c in chunks:
                if isinstance(c.result, Future):
                    c.result.cancel()
            raise

    def _prepare(self, items: list[Work], cached: dict[str, np.ndarray], claimed: set[str]) -> _Chunk:
        c = _Chunk(items, np.empty((len(items), self.embedder.profile.dims), dtype=np.float32), {}, {})
        for row, item in enumerate(items):
            h = item.content_hash
            hit = cached.get(h)
            if hit is not None:
                c.vectors[row] = hit
                self.stats.reused += 1
            elif h in claimed and h not in c.todo:
                c.later.setdefault(h, []).append(row)
            else:
                c.todo.setdefault(h, []).append(row)
                claimed.add(h)
        return c

    def _embed(self, c: _Chunk) -> Any:
        return self.embedder.embed_documents([c.items[rows[0]].text for rows in c.todo.values()])

    def _finish(
        self, c: _Chunk, cached: dict[str, np.ndarray], failed_hashes: dict[str, str],
        deferred: list[tuple[list[Work], np.ndarray]],
    ) -> None:
        new_hashes: list[str] = []
        new_vectors: list[np.ndarray] = []
        if c.todo:
            batch = c.result.result() if isinstance(c.result, Future) else self._embed(c)
            self.stats.embedded += len(c.todo) - len(batch.failed)
            self.stats.truncated += batch.truncated
            self.stats.chunked += batch.chunked
            if self.stats.tokens is not None:
                self.stats.tokens = None if batch.tokens is None else self.stats.tokens + batch.tokens
            for n, ((h, rows), vec) in enumerate(zip(c.todo.items(), batch.vectors)):
                if n in batch.failed:
                    failed_hashes[h] = batch.failed[n]
                    continue
                c.vectors[rows] = vec
                cached[h] = vec
                new_hashes.append(h)
                new_vectors.append(vec)
        for h, rows in c.later.items():  # an earlier chunk of this window embedded these
            if h in cached:
                c.vectors[rows] = cached[h]
        for item in c.items:
            if item.content_hash in failed_hashes:
                self.stats.failures[item.doc_id] = failed_hashes[item.content_hash]
        if new_vectors and self.store is not None:
            # Stored before any point: a crash in between costs nothing, the re-run finds them.
            self.writer.submit(_store_job(self.store, new_hashes, np.stack(new_vectors)))
        keep = [row for row, item in enumerate(c.items) if item.content_hash not in failed_hashes]
        now = [r for r in keep if c.items[r].whole]
        later = [r for r in keep if not c.items[r].whole]
        if now:
            self.writer.submit(_write_job(self.write, [c.items[r] for r in now], c.vectors[now]))
        if later:
            deferred.append(([c.items[r] for r in later], c.vectors[later]))
        if self.progress is not None:
            self.progress(len(c.items))

    def _write_whole_documents(self, deferred: list[tuple[list[Work], np.ndarray]]) -> None:
        """Write the chunks of every document whose chunks all embedded."""
        for items, vectors in deferred:
            rows = [r for r, item in enumerate(items) if item.doc_id not in self.stats.failures]
            if rows:
                self.writer.submit(_write_job(self.write, [items[r] for r in rows], vectors[rows]))


def _store_job(store: VectorStore, hashes: list[str], vectors: np.ndarray) -> Callable[[], None]:
    return lambda: store.add(hashes, vectors)


def _write_job(write: WriteFn, items: list[Work], vectors: np.ndarray) -> Callable[[], None]:
    return lambda: write([w.id for w in items], vectors, [w.payload for w in items])
