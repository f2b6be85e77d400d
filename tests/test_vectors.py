"""The Parquet vector store: keyed by content hash within one fingerprint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe import vectors
from embedpipe._segments import SegmentFolder, SegmentWriter
from embedpipe.corpus import content_hash
from embedpipe.errors import DiskFull, StoreError
from embedpipe.vectors import Compaction, VectorStore, newest_to_merge

H1, H2, H3, MISSING = (content_hash(t) for t in ("one", "two", "three", "never stored"))


def test_round_trip_and_one_row_per_hash(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 4)
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert store.add([H1, H2, H1], vecs) == 2
    assert store.add([H2], vecs[:1]) == 0
    reopened = VectorStore(tmp_path, "f" * 64, 4)
    got = reopened.lookup([H1, H2, MISSING])
    assert set(got) == {H1, H2}
    np.testing.assert_array_equal(got[H2], vecs[1])
    assert len(reopened) == 2
    assert reopened.present([H1, MISSING, H2, H1]) == {H1, H2}
    assert H1 in reopened and MISSING not in reopened


def test_lookups_agree_before_and_after_the_index_merges(tmp_path: Path, monkeypatch) -> None:
    """Hashes added since the last merge (the recent list) and merged ones (the sorted
    arrays) are found alike, across many segments, in a fresh store and a reopened one."""
    monkeypatch.setattr(vectors._HashIndex, "MERGE_AT", 3)  # merge every few adds
    store = VectorStore(tmp_path, "f" * 64, 2)
    texts = [f"text {i}" for i in range(40)]
    hashes = [content_hash(t) for t in texts]
    vecs = np.arange(80, dtype=np.float32).reshape(40, 2)
    for start in range(0, 40, 2):  # 20 segments of 2 rows
        assert store.add(hashes[start:start + 2], vecs[start:start + 2]) == 2
    for s in (store, VectorStore(tmp_path, "f" * 64, 2)):
        got = s.lookup(hashes + [MISSING])
        assert set(got) == set(hashes) and len(s) == 40
        for h, v in zip(hashes, vecs):
            np.testing.assert_array_equal(got[h], v)


def test_a_hash_stored_twice_resolves_to_its_newest_row(tmp_path: Path) -> None:
    """Two processes may both store one hash (each checked before the other wrote); the
    reopened index must point at one real row, the newer."""
    first = VectorStore(tmp_path, "f" * 64, 2)
    second = VectorStore(tmp_path, "f" * 64, 2)
    assert len(second) == 0  # its index is read now, before the first one writes
    assert first.add([H1], np.full((1, 2), 1, np.float32)) == 1
    assert second.add([H2, H1], np.array([[2, 2], [3, 3]], np.float32)) == 2  # did not see H1
    got = VectorStore(tmp_path, "f" * 64, 2).lookup([H1, H2])
    np.testing.assert_array_equal(got[H1], [3, 3])
    np.testing.assert_array_equal(got[H2], [2, 2])


def test_a_key_that_is_not_a_content_hash_is_refused_before_writing(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 2)
    with pytest.raises(StoreError, match="not a SHA-256 content hash"):
        store.add([H1, "h2"], np.ones((2, 2), np.float32))
    with pytest.raises(StoreError, match="not hexadecimal"):
        store.add(["z" * 64], np.ones((1, 2), np.float32))
    assert len(VectorStore(tmp_path, "f" * 64, 2)) == 0 and store.folder.segments() == []


def test_a_segment_with_a_foreign_key_is_named_when_the_index_loads(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 2)
    store.add([H1], np.ones((1, 2), np.float32))
    table = pa.table({"content_hash": ["not-a-hash"],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0], pa.float32()), 2)},
                     schema=store.folder.schema)
    bad = store.folder.write(table)
    with pytest.raises(StoreError, match=f"{bad.name}.*not a SHA-256 content hash.*move that file"):
        VectorStore(tmp_path, "f" * 64, 2).lookup([H1])


def test_spaces_do_not_mix(tmp_path: Path) -> None:
    VectorStore(tmp_path, "a" * 64, 4).add([H1], np.ones((1, 4), np.float32))
    assert VectorStore(tmp_path, "b" * 64, 4).lookup([H1]) == {}
    with pytest.raises(StoreError, match="another embedding space"):
        VectorStore(tmp_path, "a" * 16 + "c" * 48, 4)  # same folder prefix, other space


# --- compaction ------------------------------------------------------------------------------

FP = "e" * 64


def _filled(data: Path, segments: int, rows: int, dims: int = 8, seed: int = 0
            ) -> tuple[VectorStore, list[str], np.ndarray]:
    """A store of ``segments`` segments of ``rows`` random vectors each, all hashes distinct."""
    store = VectorStore(data, FP, dims)
    hashes = [content_hash(f"doc {seed} {i}") for i in range(segments * rows)]
    vecs = np.random.default_rng(seed).standard_normal((len(hashes), dims)).astype(np.float32)
    for start in range(0, len(hashes), rows):
        assert store.add(hashes[start:start + rows], vecs[start:start + rows]) == rows
    return store, hashes, vecs


def _same(got: dict[str, np.ndarray], hashes: list[str], vecs: np.ndarray) -> None:
    assert set(got) == set(hashes)
    np.testing.assert_array_equal(np.stack([got[h] for h in hashes]), vecs)


def test_compaction_keeps_every_vector_in_full_row_groups(tmp_path: Path) -> None:
    store, hashes, vecs = _filled(tmp_path, segments=12, rows=700)
    before = VectorStore(tmp_path, FP, 8).lookup(hashes)
    _same(before, hashes, vecs)
    assert store.segment_count() == 12

    done = store.compact()

    assert done == Compaction(merged=12, rows=8400, dropped=0, segment="seg-00000013.parquet")
    assert store.segment_count() == 1
    for s in (store, VectorStore(tmp_path, FP, 8)):  # the compacting one reloads its index
        _same(s.lookup(hashes + [MISSING]), hashes, vecs)
        assert len(s) == 8400 and s.present(hashes + [MISSING]) == set(hashes)
    meta = pq.read_metadata(store.folder.segments()[0])
    # 700-row writes regrouped: a lookup decodes one bounded group at a time
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4096, 4096, 208]
    assert store.compact() is None  # one segment: nothing to do


def test_compaction_keeps_the_newest_row_of_a_hash(tmp_path: Path) -> None:
    """Two writers whose indexes were read before the other wrote store one hash twice;
    compaction keeps the newer row, drops the older, and the answer does not change."""
    first = VectorStore(tmp_path, FP, 2)
    second = VectorStore(tmp_path, FP, 2)
    assert len(second) == 0
    first.add([H1, H2], np.array([[1, 1], [2, 2]], np.float32))
    second.add([H3, H1], np.array([[3, 3], [4, 4]], np.float32))  # did not see H1
    second.add([MISSING], np.array([[5, 5]], np.float32))

    done = VectorStore(tmp_path, FP, 2).compact()

    assert (done.merged, done.rows, done.dropped) == (3, 4, 1)
    (only,) = first.folder.segments()
    assert pq.read_table(only).column("content_hash").to_pylist() == [H2, H3, H1, MISSING]
    got = VectorStore(tmp_path, FP, 2).lookup([H1, H2, H3])
    np.testing.assert_array_equal(got[H1], [4, 4])
    np.testing.assert_array_equal(got[H2], [2, 2])


def test_merging_only_the_newest_segments_keeps_newest_wins(tmp_path: Path) -> None:
    """A partial merge leaves an old segment with an older row of a hash the merged
    segment also holds: the merged one is numbered last, so it still wins."""
    first = VectorStore(tmp_path, FP, 2)
    second = VectorStore(tmp_path, FP, 2)
    assert len(second) == 0
    big = [content_hash(f"big {i}") for i in range(20)]
    first.add(big + [H1], np.zeros((21, 2), np.float32))
    second.add([H2], np.ones((1, 2), np.float32))
    second.add([H1], np.full((1, 2), 7, np.float32))  # second never saw the old H1

    done = second.compact_if_needed(threshold=3)

    assert done is not None and (done.merged, done.dropped) == (2, 0)
    assert [pq.read_metadata(p).num_rows for p in second.folder.segments()] == [21, 2]
    for s in (second, VectorStore(tmp_path, FP, 2)):
        np.testing.assert_array_equal(s.lookup([H1])[H1], [7, 7])
        assert len(s) == 22


@pytest.mark.parametrize(
    ("rows", "take"),
    [
        ([7], 1),
        ([5, 5], 2),
        ([1, 1, 1, 1], 4),  # equal segments: all of them
        ([100, 1, 1], 2),  # a big old one is not rewritten for two small ones
        ([10, 4, 1, 1], 4),  # 4 <= 2 * 2, then 10 <= 2 * 6
        ([50, 5, 3, 1, 1], 4),  # 3 <= 4, 5 <= 10, 50 > 20
    ],
)
def test_which_segments_a_compaction_merges(rows: list[int], take: int) -> None:
    assert newest_to_merge(rows) == take


def test_a_write_compacts_once_segments_pass_the_threshold(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vectors, "COMPACT_AFTER", 4)
    store, hashes, vecs = _filled(tmp_path, segments=3, rows=5)
    assert store.segment_count() == 3  # under the threshold: left alone
    more = [content_hash(f"more {i}") for i in range(5)]
    more_vecs = np.full((5, 8), 9, np.float32)

    assert store.add(more, more_vecs) == 5  # the fourth segment: compacted

    assert store.segment_count() == 1
    assert pq.read_metadata(store.folder.segments()[0]).num_rows == 20
    all_hashes, all_vecs = hashes + more, np.concatenate([vecs, more_vecs])
    for s in (store, VectorStore(tmp_path, FP, 8)):
        _same(s.lookup(all_hashes), all_hashes, all_vecs)
    assert store.add(more, more_vecs) == 0  # the reloaded index still knows them


def test_a_failed_automatic_compaction_does_not_fail_the_write(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(vectors, "COMPACT_AFTER", 2)
    store, hashes, vecs = _filled(tmp_path, segments=1, rows=3)

    def full(self, writer, old):
        raise DiskFull(f"no space left on the device of {self.root}")

    monkeypatch.setattr(SegmentFolder, "replace_all", full)
    with caplog.at_level(logging.WARNING, logger="embedpipe.vectors"):
        assert store.add([H1], np.ones((1, 8), np.float32)) == 1

    assert "could not compact the vector store" in caplog.text and "no space left" in caplog.text
    assert store.segment_count() == 2 and not list(tmp_path.rglob(".tmp-*"))
    got = VectorStore(tmp_path, FP, 8).lookup(hashes + [H1])
    _same(got, hashes + [H1], np.concatenate([vecs, np.ones((1, 8), np.float32)]))


class Killed(BaseException):
    """Stands in for a kill: nothing in embedpipe catches it."""


def _die(*args, **kwargs):
    raise Killed


@pytest.mark.parametrize("at", ["before committing", "after committing"])
def test_a_compaction_killed_midway_loses_no_vector(tmp_path: Path, monkeypatch, at: str) -> None:
    store, hashes, vecs = _filled(tmp_path, segments=5, rows=50)
    old = store.folder.segments()
    if at == "before committing":
        monkeypatch.setattr(SegmentWriter, "commit", _die)
    else:  # the new segment is in place; the old ones are still there
        real_unlink = Path.unlink
        monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: _die()
                            if self.name.startswith("seg-") else real_unlink(self, missing_ok))

    with pytest.raises(Killed):
        store.compact()
    monkeypatch.undo()

    left = store.folder.segments()
    assert left == (old if at == "before committing" else [*old, left[-1]])
    assert not list(tmp_path.rglob(".tmp-*"))
    for s in (store, VectorStore(tmp_path, FP, 8)):
        _same(s.lookup(hashes), hashes, vecs)
        assert len(s) == 250
    done = VectorStore(tmp_path, FP, 8).compact()  # the next one tidies up
    assert done.rows == 250 and done.dropped == (0 if at == "before committing" else 250)
    _same(VectorStore(tmp_path, FP, 8).lookup(hashes), hashes, vecs)


STALE_READER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from embedpipe.vectors import VectorStore
    store = VectorStore(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
    hashes = json.loads(Path(sys.argv[4]).read_text())
    print(len(store), sorted(store.folder.segments())[-1].name, flush=True)  # index read now
    sys.stdin.readline()  # meanwhile the parent compacts and writes
    print(json.dumps({"present": len(store.present(hashes)),
                      "vectors": {h: v.tolist() for h, v in store.lookup(hashes).items()}}))
""")


def test_a_reader_whose_index_predates_a_compaction_still_finds_every_vector(tmp_path: Path) -> None:
    """Another process reads its index, then this one compacts the store away under it and
    writes new segments (so the old listing's positions now name other files). Its lookups
    must reload and find every vector, right ones: not fail, not read the wrong row."""
    store, hashes, vecs = _filled(tmp_path, segments=6, rows=40, dims=4)
    (tmp_path / "hashes.json").write_text(json.dumps(hashes))
    child = subprocess.Popen(
        [sys.executable, "-c", STALE_READER, str(tmp_path), FP, "4", str(tmp_path / "hashes.json")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["240", "seg-00000006.parquet"]
        known = store.folder.segments()
        store.compact()
        rng = np.random.default_rng(9)
        for n in range(6):  # new segments where the old positions were
            store.add([content_hash(f"later {n}")], rng.standard_normal((1, 4)).astype(np.float32))
        assert not set(known) & set(store.folder.segments())
        out, err = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    answer = json.loads(out)
    assert answer["present"] == 240
    _same({h: np.array(v, np.float32) for h, v in answer["vectors"].items()}, hashes, vecs)
