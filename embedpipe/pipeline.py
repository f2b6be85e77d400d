"""The streaming embed-and-upsert engine: the one batching loop of embedpipe.

The embedding model is the bottleneck, so everything else hides behind it:

* texts are gathered in large windows and sorted by length, then encoded in
  chunks, so each chunk pads to nearly its own length (DESIGN.md measured 1.35x
  wasted work when small file-order batches pad to their longest text);
* vectors already in the Parquet vector store for this fingerprint are reused,
  and identical texts in a window are embedded once;
* one writer thread owns every write (Qdrant upserts, the vector store), so the
  next chunk encodes while the previous one is written, and Qdrant local mode
  never sees concurrent writers.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.vectors import VectorStore

__all__ = ["PipelineStats", "Work", "embed_and_write", "plan_chunks"]

WriteFn = Callable[[list[str], np.ndarray, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class Work:
    """One document to place in the index."""

    id: str
    text: str
    content_hash: str
    payload: dict[str, Any]


@dataclass
class PipelineStats:
    documents: int = 0
    embedded: int = 0  # texts actually sent to a model
    reused: int = 0  # vectors taken from the vector store
    truncated: int = 0


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
    once every write has finished; any write error is raised here.
    """
    stats = PipelineStats()
    writer = _Writer()
    try:
        pending: list[Work] = []
        for item in items:
            pending.append(item)
            if len(pending) >= window:
                _process_window(pending, embedder, write, store, chunk, writer, stats, progress)
                pending = []
        if pending:
            _process_window(pending, embedder, write, store, chunk, writer, stats, progress)
    except BaseException:
        writer.close(raise_error=False)  # the error in flight is the one to report
        raise
    writer.close()
    return stats


def _process_window(
    window: list[Work],
    embedder: Embedder,
    write: WriteFn,
    store: VectorStore | None,
    chunk: int,
    writer: _Writer,
    stats: PipelineStats,
    progress: Callable[[int], None] | None,
) -> None:
    cached = store.lookup([w.content_hash for w in window]) if store is not None else {}
    stats.documents += len(window)
    for positions in plan_chunks([len(w.text) for w in window], chunk):
        items = [window[i] for i in positions]
        vectors = np.empty((len(items), embedder.profile.dims), dtype=np.float32)
        todo: dict[str, list[int]] = {}  # content hash -> rows needing it
        for row, item in enumerate(items):
            hit = cached.get(item.content_hash)
            if hit is not None:
                vectors[row] = hit
                stats.reused += 1
            else:
                todo.setdefault(item.content_hash, []).append(row)
        new_hashes: list[str] = []
        if todo:
            texts = [items[rows[0]].text for rows in todo.values()]
            batch = embedder.embed_documents(texts)
            stats.embedded += len(texts)
            stats.truncated += batch.truncated
            for (h, rows), vec in zip(todo.items(), batch.vectors):
                vectors[rows] = vec
                cached[h] = vec  # later chunks of this window reuse it
                new_hashes.append(h)
            new_vectors = batch.vectors
        writer.submit(
            _job(items, vectors, write, store, new_hashes, new_vectors if todo else None)
        )
        if progress is not None:
            progress(len(items))


def _job(
    items: list[Work],
    vectors: np.ndarray,
    write: WriteFn,
    store: VectorStore | None,
    new_hashes: list[str],
    new_vectors: np.ndarray | None,
) -> Callable[[], None]:
    def run() -> None:
        # Vectors are stored before the points: a crash in between costs nothing,
        # the re-run finds them in the store.
        if store is not None and new_vectors is not None:
            store.add(new_hashes, new_vectors)
        write([w.id for w in items], vectors, [w.payload for w in items])

    return run
