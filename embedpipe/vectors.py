"""The Parquet vector store: computed vectors keyed by (content hash, fingerprint).

It is both a cache (the same text is never embedded twice in one space, across
ingests, indexes and migrations) and a vendor-neutral export: any index can be
rebuilt from the corpus plus these files without calling the model again.

Layout: ``<data>/vectors/<fingerprint[:16]>/seg-*.parquet`` with columns
``content_hash`` and ``vector`` (fixed-size list of float32), plus ``space.json``
recording the full fingerprint, profile and dimension.

Every ``add`` appends a segment, so a build leaves hundreds and a year of daily syncs
thousands. Once ``COMPACT_AFTER`` pile up, a write merges the newest ones into one
(streamed a row group at a time, keeping the newest row of a hash), under the folder's
lock: the merged segment is committed first, the merged ones deleted after, so a crash
between the two only leaves duplicates that newest-wins reading resolves. Other
processes read on meanwhile: the hash index locates a vector by segment *name*, and a
lookup that finds its segment gone reloads the index and retries once.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedpipe._files import make_dir, write_json
from embedpipe._segments import ROW_GROUP_ROWS, SegmentFolder, SegmentVanished
from embedpipe.errors import EmbedpipeError, StoreError
from embedpipe.layout import Layout

__all__ = ["COMPACT_AFTER", "Compaction", "VectorStore"]

log = logging.getLogger(__name__)

# A write compacts once this many segments exist (read at call time, so tests can lower it).
COMPACT_AFTER = 32
# An older segment joins a merge while it holds at most this many times the rows merged
# so far: sizes then fall geometrically from old to new, and a row is rewritten about
# log(n) times in a store's life instead of once per compaction (simulated: 2.9 times for
# a build of 500 equal segments, 3.2 with ten years of daily syncs after it).
GROWTH = 2
# Index loads that may meet a segment compacted away in the middle before giving up.
_LOAD_TRIES = 3


def _schema(dims: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dims), nullable=False),
        ]
    )


@dataclass(frozen=True)
class Compaction:
    """What one compaction did."""

    merged: int  # segments merged
    rows: int  # rows written into the new segment
    dropped: int  # rows left out: a newer row of the same hash was kept
    segment: str  # the new segment's file name


class VectorStore:
    """Vectors of one embedding space, looked up by content hash."""

    def __init__(self, data_dir: Path, fingerprint: str, dims: int, profile: str = "") -> None:
        self.fingerprint = fingerprint
        self.dims = dims
        # No dictionaries: measured on 384-d vectors, reads 20% faster and files 10% smaller.
        self.folder = SegmentFolder(Layout(data_dir).vectors(fingerprint), _schema(dims),
                                    use_dictionary=False)
        self._index: _HashIndex | None = None
        # The pipeline's writer thread adds while the caller looks up: the index is
        # read and changed under this lock (files are read outside it).
        self._mutex = threading.RLock()
        self._check_space(profile)

    @classmethod
    def existing(cls, data_dir: Path, fingerprint: str, dims: int) -> VectorStore | None:
        """The store for a space if it exists, without creating anything (for dry runs)."""
        if not (Layout(data_dir).vectors(fingerprint) / "space.json").is_file():
            return None
        return cls(data_dir, fingerprint, dims)

    def _check_space(self, profile: str) -> None:
        space = self.folder.root / "space.json"
        if space.is_file():
            try:
                recorded = json.loads(space.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"{space} is unreadable ({exc}); move that folder away") from None
            if not isinstance(recorded, dict) or recorded.get("fingerprint") != self.fingerprint or recorded.get("dims") != self.dims:
                raise StoreError(
                    f"{space} records another embedding space than {self.fingerprint[:12]}; "
                    "move that folder away"
                )
            return
        make_dir(self.folder.root)
        write_json(space, {"fingerprint": self.fingerprint, "dims": self.dims, "profile": profile})

    def segment_count(self) -> int:
        """Segment files on disk now (what ``embedpipe status`` shows; automatic compaction
        keeps it below ``COMPACT_AFTER``)."""
        return len(self.folder.segments())

    def _hash_index(self) -> _HashIndex:
        with self._mutex:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def _load_index(self) -> _HashIndex:
        """The index of the segments on disk now; a compaction by another process may
        delete one between listing and reading it, so the listing is taken again."""
        for _ in range(_LOAD_TRIES - 1):
            try:
                return self._read_index()
            except SegmentVanished:
                continue
        return self._read_index()

    def _read_index(self) -> _HashIndex:
        return _HashIndex([(self._segment_digests(p), p.name) for p in self.folder.segments()])

    def _reload(self) -> None:
        with self._mutex:
            self._index = None
            self._hash_index()

    def _segment_digests(self, path: Path) -> np.ndarray:
        """The digest of every row of a segment, in row order (the hash column only)."""
        parts = []
        for batch in self.folder.iter_batches(path, ["content_hash"]):
            try:
                parts.append(_array_digests(batch.column(0)))
            except StoreError as exc:
                raise StoreError(f"{path}: {exc}; move that file out of {self.folder.root} "
                                 "and re-ingest (its vectors are embedded again)") from None
        return np.concatenate(parts) if parts else np.empty(0, "S32")

    def __contains__(self, content_hash: str) -> bool:
        return bool(self.present([content_hash]))

    def __len__(self) -> int:
        return len(self._hash_index())

    def present(self, hashes: Iterable[str]) -> set[str]:
        """The hashes among ``hashes`` that have a stored vector (the index alone: no
        segment is read, so a compaction elsewhere cannot disturb it)."""
        wanted = list(set(hashes))
        with self._mutex:
            held = self._hash_index().contains(wanted)
        return set(itertools.compress(wanted, held))

    def lookup(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors for the hashes that are stored (missing ones are simply absent)."""
        wanted = list(set(hashes))
        try:
            return self._read_vectors(wanted)
        except SegmentVanished:
            # Another process compacted the store since our index was read: the rows
            # live on in a newer segment. A second miss is an error worth showing.
            self._reload()
            return self._read_vectors(wanted)

    def _read_vectors(self, wanted: list[str]) -> dict[str, np.ndarray]:
        with self._mutex:
            index = self._hash_index()
            located = index.locate(wanted)
            names = list(index.names)
        by_segment: dict[int, list[tuple[int, str]]] = {}
        for h, (s, r) in located.items():
            by_segment.setdefault(s, []).append((r, h))
        out: dict[str, np.ndarray] = {}
        for s, rows in by_segment.items():
            table = self.folder.take(self.folder.root / names[s], np.array([r for r, _ in rows]), ["vector"])
            flat = table.column("vector").combine_chunks().flatten()
            matrix = flat.to_numpy(zero_copy_only=False).reshape(len(rows), self.dims)
            for (_, h), vec in zip(rows, matrix):
                out[h] = vec
        return out

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors for hashes not yet present. Returns how many were new.

        Compacts afterwards once enough segments pile up (best effort: see
        ``_compact_after_write``)."""
        with self.folder.locked():
            with self._mutex:
                index = self._hash_index()
                known = index.contains(list(hashes))
                fresh = list({h: i for i, h in enumerate(hashes) if not known[i]}.values())  # one row per hash
                if not fresh:
                    return 0
                path = self.folder.write(self._table([hashes[i] for i in fresh], np.asarray(vectors)[fresh]))
                index.extend([hashes[i] for i in fresh], path.name)  # type: ignore[union-attr]
            self._compact_after_write()
        return len(fresh)

    def _table(self, hashes: list[str], vectors: np.ndarray) -> pa.Table:
        flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
        return pa.table(
            {"content_hash": hashes, "vector": pa.FixedSizeListArray.from_arrays(flat, self.dims)},
            schema=self.folder.schema,
        )

    def _compact_after_write(self) -> None:
        """Compact if needed, best effort: the vectors are committed by now, so a compaction
        that fails (a full disk: it rewrites what it merges) is logged, never raised, and
        the next write tries again."""
        try:
            self.compact_if_needed()
        except (EmbedpipeError, OSError, pa.ArrowException) as exc:
            log.warning("could not compact the vector store in %s (its vectors are stored; "
                        "the next write tries again): %s", self.folder.root,
                        (str(exc).splitlines() or [type(exc).__name__])[0])

    def compact_if_needed(self, threshold: int | None = None) -> Compaction | None:
        """Merge the newest segments into one once ``threshold`` segments exist (default
        ``COMPACT_AFTER``); which ones: see ``GROWTH``. None when below the threshold."""
        threshold = COMPACT_AFTER if threshold is None else threshold
        with self.folder.locked():
            segments = self.folder.segments()
            if len(segments) < max(threshold, 2):
                return None
            take = newest_to_merge([self.folder.row_count(p) for p in segments])
            return self._merge(segments[-take:])

    def compact(self) -> Compaction | None:
        """Merge every segment into one, dropping the rows a newer one replaces (an
        explicit call: before an export, or to tidy up after a crash). None if there was
        at most one segment. Waits for the folder's lock while another process writes."""
        with self.folder.locked():
            segments = self.folder.segments()
            return self._merge(segments) if len(segments) > 1 else None

    def _merge(self, old: list[Path]) -> Compaction:
        """Stream ``old`` (the newest segments, oldest first) into one new segment, then
        delete them. Called under the folder's lock, so no segment appears meanwhile and
        the new one, numbered last, is rightly the newest."""
        keep = self._newest_rows(old)
        writer = self.folder.open_writer()
        try:
            for table in _regrouped(self._kept_batches(old, keep), ROW_GROUP_ROWS):
                writer.write(table)
            new = self.folder.replace_all(writer, old)
        except BaseException:
            writer.abort()  # a no-op once committed: the merged rows stay, as duplicates
            raise
        gone = {p.name for p in old}
        with self._mutex:
            if self._index is not None and self._index.refers_to(gone):
                self._index = None  # reloaded on next use, from the new segment
        total = sum(len(k) for k in keep)
        return Compaction(merged=len(old), rows=writer.rows, dropped=total - writer.rows,
                          segment=new.name)  # type: ignore[union-attr]

    def _newest_rows(self, segments: list[Path]) -> list[np.ndarray]:
        """Per segment, which rows to keep: the newest row of each hash among ``segments``.
        Holds the digests only (about 40 bytes a row), never the vectors."""
        parts = [(self._segment_digests(p), s) for s, p in enumerate(segments)]
        keep = [np.zeros(len(d), bool) for d, _ in parts]
        _, winners, rows = _sorted_newest(parts)
        order = np.argsort(winners, kind="stable")
        bounds = np.searchsorted(winners[order], np.arange(len(parts) + 1))
        for s in range(len(parts)):
            keep[s][rows[order[bounds[s]:bounds[s + 1]]]] = True
        return keep

    def _kept_batches(self, segments: list[Path], keep: list[np.ndarray]) -> Iterator[pa.RecordBatch]:
        for path, mask in zip(segments, keep):
            offset = 0
            for batch in self.folder.iter_batches(path, batch_size=ROW_GROUP_ROWS):
                kept = mask[offset:offset + batch.num_rows]
                offset += batch.num_rows
                yield batch if kept.all() else batch.filter(pa.array(kept))


def newest_to_merge(rows: Sequence[int]) -> int:
    """How many of the newest segments to merge, given each segment's rows, oldest first:
    the newest two, then each older one while it holds at most ``GROWTH`` times the rows
    taken so far (a big old segment is not rewritten to absorb a few small new ones)."""
    take = min(2, len(rows))
    merged = sum(rows[len(rows) - take:])
    while take < len(rows) and rows[-take - 1] <= GROWTH * merged:
        take += 1
        merged += rows[-take]
    return take


def _regrouped(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """The rows of ``batches`` as tables of a multiple of ``size`` rows (the last one
    shorter), so a merge of many small segments writes full row groups, not tiny ones."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= size:
            table = pa.Table.from_batches(held)
            cut = count // size * size
            yield table.slice(0, cut)
            rest = table.slice(cut)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


class _HashIndex:
    """Content hash -> (segment, row) of every stored vector, in about 40 bytes an entry.

    A dict of 64-character hex strings costs about 220 bytes an entry, 2.2 GB for ten
    million vectors, and it is held for the whole build. Here the 32-byte digests sit
    sorted in one array beside their locations. Hashes added since the last merge wait in
    a bounded dict and are merged in by insertion (one pass over the arrays, no re-sort).
    Lookups are vectorised: one ``searchsorted`` per window, not one per hash.

    A location's segment is a number into ``names`` (file names, oldest first), never a
    position in the folder's listing: a compaction elsewhere shifts positions, and a
    stale position would read another segment's row; a stale name is simply gone.
    """

    MERGE_AT = 65_536  # pending hashes (a dict of ~16 MB) that trigger a merge

    def __init__(self, parts: Sequence[tuple[np.ndarray, str]] = ()) -> None:
        """``parts``: (digests, file name) of whole segments, oldest first."""
        self.names: list[str] = [name for _, name in parts]
        self._keys, self._segments, self._rows = _sorted_newest([(d, s) for s, (d, _) in enumerate(parts)])
        self._pending: list[tuple[np.ndarray, int]] = []
        self._recent: dict[str, tuple[int, int]] = {}  # the pending hashes, for lookups

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)  # add() only extends with hashes not held

    def refers_to(self, names: set[str]) -> bool:
        return not names.isdisjoint(self.names)

    def extend(self, hashes: Sequence[str], name: str) -> None:
        """Record ``hashes`` as rows 0.. of the new segment ``name`` (a hash seen again:
        the newest wins)."""
        if not hashes:
            return
        segment = len(self.names)
        self.names.append(name)
        self._pending.append((_digests(hashes), segment))
        self._recent.update((h, (segment, r)) for r, h in enumerate(hashes))
        if len(self._recent) >= self.MERGE_AT:
            self.merge()

    def merge(self) -> None:
        """Fold the pending hashes into the sorted arrays."""
        if not self._pending:
            return
        new_keys, new_segments, new_rows = _sorted_newest(self._pending)
        keys, segments, rows = self._keys, self._segments, self._rows
        if len(keys):
            at = np.minimum(np.searchsorted(keys, new_keys), len(keys) - 1)
            stale = at[keys[at] == new_keys]  # rows a newer segment replaces
            keys, segments, rows = (np.delete(a, stale) for a in (keys, segments, rows))
        at = np.searchsorted(keys, new_keys)
        self._keys = np.insert(keys, at, new_keys)
        self._segments = np.insert(segments, at, new_segments)
        self._rows = np.insert(rows, at, new_rows)
        self._pending, self._recent = [], {}

    def locate(self, hashes: list[str]) -> dict[str, tuple[int, int]]:
        """(segment number into ``names``, row) of each of ``hashes`` that is stored."""
        at = self._positions(_digests(hashes))  # checked even when empty: a bad hash never gets written
        found = {hashes[i]: (int(self._segments[at[i]]), int(self._rows[at[i]]))
                 for i in np.flatnonzero(at >= 0)}
        for h in hashes:
            if h in self._recent:
                found[h] = self._recent[h]
        return found

    def contains(self, hashes: list[str]) -> np.ndarray:
        """Whether each of ``hashes`` is stored, as a boolean array (no dict of a million
        locations for a re-sync that only asks which are new)."""
        held = self._positions(_digests(hashes)) >= 0
        if self._recent:
            held |= np.fromiter((h in self._recent for h in hashes), bool, len(hashes))
        return held

    def _positions(self, probe: np.ndarray) -> np.ndarray:
        """Where each probe digest sits in the sorted arrays, -1 if absent. The probes are
        sorted first so ``searchsorted`` walks the keys in order: on a million random
        digests 0.4 s instead of 2 s (cache misses on 32-byte string compares)."""
        out = np.full(len(probe), -1, np.int64)
        if not len(self._keys) or not len(probe):
            return out
        order = np.argsort(probe)
        at = np.minimum(np.searchsorted(self._keys, probe[order]), len(self._keys) - 1)
        hit = self._keys[at] == probe[order]
        out[order[hit]] = at[hit]
        return out


def _sorted_newest(parts: Sequence[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(digests, segments, rows) sorted by digest, one entry per digest: its last, newest."""
    if not parts:
        return np.empty(0, "S32"), np.empty(0, np.int32), np.empty(0, np.int32)
    keys = np.concatenate([d for d, _ in parts])
    segments = np.concatenate([np.full(len(d), s, np.int32) for d, s in parts])
    rows = np.concatenate([np.arange(len(d), dtype=np.int32) for d, _ in parts])
    order = np.argsort(keys, kind="stable")  # equal digests keep their order: oldest first
    keys, segments, rows = keys[order], segments[order], rows[order]
    last = np.append(keys[1:] != keys[:-1], True)
    return keys[last], segments[last], rows[last]


_HEX = np.full(256, 255, np.uint8)  # ASCII byte -> its hex value; 255: not a hex digit
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _array_digests(column: pa.Array) -> np.ndarray:
    """``_digests`` of an Arrow string column, straight from its buffers: loading the index
    of a million vectors would otherwise build a million Python strings (~1 s). Anything
    irregular (nulls, a wrong length, a non-hex byte) goes the slow way, which names it."""
    n = len(column)
    if n and column.null_count == 0 and pa.types.is_string(column.type):
        offsets = np.frombuffer(column.buffers()[1], np.int32, n + 1, column.offset * 4)
        if (np.diff(offsets) == 64).all():
            data = np.frombuffer(column.buffers()[2], np.uint8, 64 * n, int(offsets[0]))
            nibbles = _HEX[data]
            if not (nibbles == 255).any():
                pairs = nibbles.reshape(-1, 2)
                return ((pairs[:, 0] << 4) | pairs[:, 1]).view("S32")
    return _digests(column.to_pylist())


def _digests(hashes: Sequence[str]) -> np.ndarray:
    """SHA-256 hex strings as an array of their 32-byte digests."""
    if any(len(h) != 64 for h in hashes):
        bad = next(h for h in hashes if len(h) != 64)
        raise StoreError(f"{bad!r} is not a SHA-256 content hash (64 hex digits)")
    try:
        return np.frombuffer(bytes.fromhex("".join(hashes)), dtype="S32")
    except ValueError:
        raise StoreError("a content hash is not hexadecimal; the vector store keys vectors "
                         "by SHA-256 (embedpipe.corpus.content_hash)") from None
