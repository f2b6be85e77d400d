"""The Parquet vector store: computed vectors keyed by (content hash, fingerprint).

It is both a cache (the same text is never embedded twice in one space, across
ingests, indexes and migrations) and a vendor-neutral export: any index can be
rebuilt from the corpus plus these files without calling the model again.

Layout: ``<data>/vectors/<fingerprint[:16]>/seg-*.parquet`` with columns
``content_hash`` and ``vector`` (fixed-size list of float32), plus ``space.json``
recording the full fingerprint, profile and dimension.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedpipe._files import make_dir, write_json
from embedpipe._segments import SegmentFolder
from embedpipe.errors import StoreError
from embedpipe.layout import Layout

__all__ = ["VectorStore"]


def _schema(dims: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dims), nullable=False),
        ]
    )


class VectorStore:
    """Vectors of one embedding space, looked up by content hash."""

    def __init__(self, data_dir: Path, fingerprint: str, dims: int, profile: str = "") -> None:
        self.fingerprint = fingerprint
        self.dims = dims
        self.folder = SegmentFolder(Layout(data_dir).vectors(fingerprint), _schema(dims))
        self._index: _HashIndex | None = None
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

    def _hash_index(self) -> _HashIndex:
        if self._index is None:
            parts = []
            for s, path in enumerate(self.folder.segments()):
                col = self.folder.read_columns(path, ["content_hash"]).column("content_hash")
                try:
                    parts.append((_digests(col.to_pylist()), s))
                except StoreError as exc:
                    raise StoreError(f"{path}: {exc}; move that file out of {self.folder.root} "
                                     "and re-ingest (its vectors are embedded again)") from None
            self._index = _HashIndex(parts)
        return self._index

    def __contains__(self, content_hash: str) -> bool:
        return bool(self.present([content_hash]))

    def __len__(self) -> int:
        return len(self._hash_index())

    def present(self, hashes: Iterable[str]) -> set[str]:
        """The hashes among ``hashes`` that have a stored vector."""
        return set(self._hash_index().locate(list(set(hashes))))

    def lookup(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors for the hashes that are stored (missing ones are simply absent)."""
        by_segment: dict[int, list[tuple[int, str]]] = {}
        for h, (s, r) in self._hash_index().locate(list(set(hashes))).items():
            by_segment.setdefault(s, []).append((r, h))
        if not by_segment:
            return {}
        segments = self.folder.segments()
        out: dict[str, np.ndarray] = {}
        for s, wanted in by_segment.items():
            table = self.folder.read_columns(segments[s], ["vector"])
            rows = pa.array([r for r, _ in wanted], pa.int64())
            flat = table.column("vector").take(rows).combine_chunks().flatten()
            matrix = flat.to_numpy(zero_copy_only=False).reshape(len(wanted), self.dims)
            for (_, h), vec in zip(wanted, matrix):
                out[h] = vec
        return out

    def add(self, hashes: Sequence[str], vectors: np.ndarray) -> int:
        """Store vectors for hashes not yet present. Returns how many were new."""
        index = self._hash_index()
        known = index.locate(list(hashes))
        fresh = list({h: i for i, h in enumerate(hashes) if h not in known}.values())  # one row per hash
        if not fresh:
            return 0
        vectors = np.asarray(vectors, dtype=np.float32)
        flat = pa.array(vectors[fresh].reshape(-1), pa.float32())
        table = pa.table(
            {
                "content_hash": [hashes[i] for i in fresh],
                "vector": pa.FixedSizeListArray.from_arrays(flat, self.dims),
            },
            schema=self.folder.schema,
        )
        with self.folder.locked():
            path = self.folder.write(table)
            segments = self.folder.segments()
        s = segments.index(path) if path in segments else len(segments) - 1
        index.extend([hashes[i] for i in fresh], s)
        return len(fresh)


class _HashIndex:
    """Content hash -> (segment, row) of every stored vector, in about 40 bytes an entry.

    A dict of 64-character hex strings costs about 220 bytes an entry, 2.2 GB for ten
    million vectors, and it is held for the whole build. Here the 32-byte digests sit
    sorted in one array beside their locations. Hashes added since the last merge wait in
    a bounded dict and are merged in by insertion (one pass over the arrays, no re-sort).
    Lookups are vectorised: one ``searchsorted`` per window, not one per hash.
    """

    MERGE_AT = 65_536  # pending hashes (a dict of ~16 MB) that trigger a merge

    def __init__(self, parts: Sequence[tuple[np.ndarray, int]] = ()) -> None:
        """``parts``: (digests, segment) of whole segments, oldest first."""
        self._keys, self._segments, self._rows = _sorted_newest(parts)
        self._pending: list[tuple[np.ndarray, int]] = []
        self._recent: dict[str, tuple[int, int]] = {}  # the pending hashes, for lookups

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)  # add() only extends with hashes not held

    def extend(self, hashes: Sequence[str], segment: int) -> None:
        """Record ``hashes`` as rows 0.. of ``segment`` (a hash seen again: the newest wins)."""
        if not hashes:
            return
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
        """(segment, row) of each of ``hashes`` that is stored."""
        found = self._locate_sorted(hashes)
        for h in hashes:
            if h in self._recent:
                found[h] = self._recent[h]
        return found

    def _locate_sorted(self, hashes: list[str]) -> dict[str, tuple[int, int]]:
        probe = _digests(hashes)  # checked even when empty: a bad hash never gets written
        found: dict[str, tuple[int, int]] = {}
        if len(self._keys) and hashes:
            at = np.minimum(np.searchsorted(self._keys, probe), len(self._keys) - 1)
            for i in np.flatnonzero(self._keys[at] == probe):
                found[hashes[i]] = (int(self._segments[at[i]]), int(self._rows[at[i]]))
        return found


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
