"""The Parquet corpus store: the source of truth from which any index can be rebuilt.

One folder per index under ``<data>/corpus/<index>/``. Each segment holds rows of
``id, text, content_hash, record_hash, metadata (JSON), source, updated_at, deleted``;
the newest row per id wins and a ``deleted`` row hides the id. ``content_hash`` is
the SHA-256 of the text (what decides re-embedding); ``record_hash`` also covers
the metadata (what decides whether the point's payload must be rewritten).
``source`` is provenance only: the same document read from a renamed file is unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from embedpipe._segments import SegmentFolder, SegmentWriter
from embedpipe.layout import Layout

__all__ = ["CORPUS_SCHEMA", "CorpusStore", "Document", "content_hash", "record_hash"]

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("content_hash", pa.string()),
        pa.field("record_hash", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("source", pa.string()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        pa.field("deleted", pa.bool_()),
    ]
)

# Compact once this many segments pile up: reads stay cheap, writes stay append-only.
COMPACT_AFTER = 32


def content_hash(text: str) -> str:
    """SHA-256 of the text: equal hashes mean equal embeddings for a fingerprint."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_hash(text_hash: str, metadata_json: str) -> str:
    return hashlib.sha256(f"{text_hash}\0{metadata_json}".encode()).hexdigest()


@dataclass
class Document:
    """One input document after validation."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class Known:
    """What the corpus knows of a live id (the cheap lookup used to diff inputs)."""

    content_hash: str
    record_hash: str


def documents_to_batch(docs: list[Document], now: dt.datetime | None = None) -> pa.RecordBatch:
    """Turn documents into a corpus record batch (hashes computed here, once)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    hashes = [content_hash(d.text) for d in docs]
    meta = [d.metadata_json for d in docs]
    return pa.RecordBatch.from_pydict(
        {
            "id": [d.id for d in docs],
            "text": [d.text for d in docs],
            "content_hash": hashes,
            "record_hash": [record_hash(h, m) for h, m in zip(hashes, meta)],
            "metadata": meta,
            "source": [d.source for d in docs],
            "updated_at": [now] * len(docs),
            "deleted": [False] * len(docs),
        },
        schema=CORPUS_SCHEMA,
    )


class CorpusStore:
    """Documents of one index, as append-only Parquet segments read newest-wins."""

    def __init__(self, root: Path) -> None:
        self.folder = SegmentFolder(root, CORPUS_SCHEMA)

    @classmethod
    def for_index(cls, data_dir: Path, index: str) -> CorpusStore:
        """The corpus of ``index`` under ``data_dir`` (the name is checked first)."""
        return cls(Layout(data_dir).corpus(index))

    @property
    def root(self) -> Path:
        return self.folder.root

    def segment_count(self) -> int:
        """Segment files on disk now (what ``embedpipe status`` shows; an ingest compacts
        them into one once ``COMPACT_AFTER`` pile up)."""
        return len(self.folder.segments())

    def _winners(self) -> tuple[list[Path], dict[str, tuple[int, int]]]:
        """Each id's newest row as (segment index, row index), from the id column only."""
        segments = self.folder.segments()
        newest: dict[str, tuple[int, int]] = {}
        for s, path in enumerate(segments):
            r = 0
            for batch in self.folder.iter_batches(path, ["id"]):
                for doc_id in batch.column("id").to_pylist():
                    newest[doc_id] = (s, r)
                    r += 1
        return segments, newest

    def known(self) -> dict[str, Known]:
        """id -> hashes for every live document. Reads three small columns only."""
        out: dict[str, Known] = {}
        for path in self.folder.segments():
            for batch in self.folder.iter_batches(path, ["id", "content_hash", "record_hash", "deleted"]):
                for doc_id, ch, rh, deleted in zip(
                    batch.column("id").to_pylist(),
                    batch.column("content_hash").to_pylist(),
                    batch.column("record_hash").to_pylist(),
                    batch.column("deleted").to_pylist(),
                ):
                    if deleted:
                        out.pop(doc_id, None)
                    else:
                        out[doc_id] = Known(ch, rh)
        return out

    def ids(self) -> set[str]:
        """The id of every live document (lighter than ``known()`` when hashes are not needed)."""
        out: set[str] = set()
        for path in self.folder.segments():
            for batch in self.folder.iter_batches(path, ["id", "deleted"]):
                for doc_id, deleted in zip(batch.column("id").to_pylist(),
                                           batch.column("deleted").to_pylist()):
                    if deleted:
                        out.discard(doc_id)
                    else:
                        out.add(doc_id)
        return out

    def count(self) -> int:
        return len(self.known())

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        """Stream the live documents; memory holds one batch plus the id map."""
        segments, newest = self._winners()
        wanted = list(dict.fromkeys([*(columns or CORPUS_SCHEMA.names), "id", "deleted"]))
        for s, path in enumerate(segments):
            offset = 0
            for batch in self.folder.iter_batches(path, wanted, batch_size):
                ids = batch.column("id").to_pylist()
                keep = [
                    newest[doc_id] == (s, offset + i) for i, doc_id in enumerate(ids)
                ]
                offset += batch.num_rows
                filtered = batch.filter(
                    pc.and_(pa.array(keep), pc.invert(batch.column("deleted")))
                )
                if filtered.num_rows:
                    yield filtered.select(columns or CORPUS_SCHEMA.names)

    def get(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Live documents by id (for small look-ups; streams the store once)."""
        wanted = set(ids)
        out: dict[str, dict[str, Any]] = {}
        for batch in self.iter_batches():
            for row in batch.to_pylist():
                if row["id"] in wanted:
                    out[row["id"]] = row
        return out

    def writer(self) -> SegmentWriter:
        """A writer for one new segment; call ``commit()`` under ``self.folder.locked()``."""
        return self.folder.open_writer()

    def delete(self, ids: Iterable[str]) -> int:
        """Hide ids with deletion markers. Returns how many markers were written."""
        ids = sorted(set(ids))
        if not ids:
            return 0
        now = dt.datetime.now(dt.timezone.utc)
        n = len(ids)
        batch = pa.RecordBatch.from_pydict(
            {
                "id": ids,
                "text": [None] * n,
                "content_hash": [None] * n,
                "record_hash": [None] * n,
                "metadata": [None] * n,
                "source": [None] * n,
                "updated_at": [now] * n,
                "deleted": [True] * n,
            },
            schema=CORPUS_SCHEMA,
        )
        with self.folder.locked():
            self.folder.write(pa.Table.from_batches([batch]))
        return n

    def compact_if_needed(self, threshold: int = COMPACT_AFTER) -> bool:
        """Rewrite the live rows into one segment once ``threshold`` segments exist."""
        with self.folder.locked():
            old = self.folder.segments()
            if len(old) < threshold:
                return False
            writer = self.folder.open_writer()
            try:
                for batch in self.iter_batches():
                    writer.write(batch)
            except BaseException:
                writer.abort()
                raise
            self.folder.replace_all(writer, old)
            return True
