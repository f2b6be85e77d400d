"""The Parquet corpus store: newest row wins, deletions, streaming, compaction, corruption."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.corpus import CorpusStore, Document, content_hash, documents_to_batch
from embedpipe.errors import StoreError


def _commit(store: CorpusStore, docs: list[Document]) -> None:
    writer = store.writer()
    writer.write(documents_to_batch(docs))
    with store.folder.lock:
        writer.commit()


def _all(store: CorpusStore) -> dict[str, str]:
    return {r["id"]: r["text"] for b in store.iter_batches() for r in b.to_pylist()}


def test_newest_row_per_id_wins_and_deletions_hide(tmp_path: Path) -> None:
    store = CorpusStore(tmp_path / "c")
    _commit(store, [Document("a", "one"), Document("b", "two")])
    _commit(store, [Document("a", "one, revised")])
    assert _all(store) == {"a": "one, revised", "b": "two"}
    assert store.known()["a"].content_hash == content_hash("one, revised")
    store.delete(["b"])
    assert _all(store) == {"a": "one, revised"}
    assert store.count() == 1 and store.ids() == {"a"}
    _commit(store, [Document("b", "back")])
    assert _all(store) == {"a": "one, revised", "b": "back"}
    assert store.ids() == set(store.known()) == {"a", "b"}


def test_streaming_reads_come_in_bounded_batches(tmp_path: Path) -> None:
    store = CorpusStore(tmp_path / "c")
    _commit(store, [Document(str(i), f"text {i}") for i in range(1000)])
    sizes = [b.num_rows for b in store.iter_batches(batch_size=100)]
    assert max(sizes) <= 100 and sum(sizes) == 1000


def test_a_segment_of_many_row_groups_reads_whole_and_in_order(tmp_path: Path) -> None:
    # Segments are read one row group at a time; every group must come back, in order.
    store = CorpusStore(tmp_path / "c")
    writer = store.writer()
    for part in range(3):
        writer.write(documents_to_batch([Document(f"{part}-{i}", f"t {i}") for i in range(250)]))
    with store.folder.lock:
        path = writer.commit()
    assert pq.ParquetFile(path).num_row_groups == 3
    ids = [r["id"] for b in store.iter_batches(batch_size=100) for r in b.to_pylist()]
    assert ids == [f"{part}-{i}" for part in range(3) for i in range(250)]
    assert store.ids() == set(ids) and len(store.known()) == 750


def test_compaction_keeps_exactly_the_live_rows(tmp_path: Path) -> None:
    store = CorpusStore(tmp_path / "c")
    for round_ in range(5):
        _commit(store, [Document(str(i), f"v{round_} {i}") for i in range(10)])
    store.delete(["3"])
    before = _all(store)
    assert store.compact_if_needed(threshold=3) is True
    assert len(store.folder.segments()) == 1
    assert _all(store) == before and "3" not in before


def test_uncommitted_files_are_invisible(tmp_path: Path) -> None:
    store = CorpusStore(tmp_path / "c")
    writer = store.writer()
    writer.write(documents_to_batch([Document("x", "half written")]))
    writer.finish()  # a crash here leaves only a temporary file
    assert store.count() == 0 and store.folder.segments() == []


def test_corrupt_segment_is_a_clear_error(tmp_path: Path) -> None:
    store = CorpusStore(tmp_path / "c")
    _commit(store, [Document("a", "one")])
    store.folder.segments()[0].write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(StoreError, match="not a readable Parquet file"):
        store.known()


def test_metadata_is_json_and_hash_covers_it(tmp_path: Path) -> None:
    a = documents_to_batch([Document("a", "same", {"lang": "en"})])
    b = documents_to_batch([Document("a", "same", {"lang": "fr"})])
    assert a.column("content_hash")[0] == b.column("content_hash")[0]
    assert a.column("record_hash")[0] != b.column("record_hash")[0]
    assert a.column("metadata")[0].as_py() == '{"lang": "en"}'
    assert a.schema.field("updated_at").type == pa.timestamp("us", tz="UTC")
