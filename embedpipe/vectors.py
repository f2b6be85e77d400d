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
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedpipe._segments import SegmentFolder
from embedpipe.errors import StoreError

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
        self.folder = SegmentFolder(data_dir / "vectors" / fingerprint[:16], _schema(dims))
        self._index: _HashIndex | None = None
        self._check_space(profile)

    @classmethod
    def existing(cls, data_dir: Path, fingerprint: str, dims: int) -> VectorStore | None:
        """The store for a space if it exists, without creating anything (for dry runs)."""
        if not (data_dir / "vectors" / fingerprint[:16] / "space.json").is_file():
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
        self.folder.root.mkdir(parents=True, exist_ok=True)
        tmp = space.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"fingerprint": self.fingerprint, "dims": self.dims, "profile": profile})
        )
        os.replace(tmp, space)

    def _hash_index(self) -> _HashIndex:
        if self._index is None:
            index = _HashIndex()
            for s, path in enumerate(self.folder.segments()):
                col = self.folder.read_columns(path, ["content_hash"]).column("content_hash")
                index.extend(col.to_pylist(), s)
            index.merge()
            self._index = index
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
        with self.folder.lock:
            path = self.folder.write(table)
            segments = self.folder.segments()
        s = segments.index(path) if path in segments else len(segments) - 1
        index.extend([hashes[i] for i in fresh], s)
        return len(fresh)


class _HashIndex:
    """Content hash -> (segment, row) of every stored vector, in about 40 bytes an entry.

    A dict of 64-character hex strings costs about 250 bytes an entry, 2.5 GB for ten
    million vectors, and it is held for the whole build. Here the 32-byte digests sit
    sorted in one array beside their locations; hashes added since the last merge wait in
    a short list and are merged in once it grows (amortised: the threshold grows with the
    index). Lookups are vectorised: one ``searchsorted`` per window, not one per hash.
    """

    _MIN_PENDING = 65_536

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype="S32")
        self._segments = np.empty(0, dtype=np.int32)
        self._rows = np.empty(0, dtype=np.int32)
        self._pending: list[tuple[np.ndarray, int]] = []  # (digests, segment), not yet merged
        self._recent: dict[str, tuple[int, int]] = {}  # the pending hashes, for lookups

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def extend(self, hashes: Sequence[str], segment: int) -> None:
        """Record ``hashes`` as rows 0.. of ``segment`` (a hash seen again: the newest wins)."""
        if not hashes:
            return
        self._pending.append((_digests(hashes), segment))
        self._recent.update((h, (segment, r)) for r, h in enumerate(hashes))
        if len(self._recent) >= max(self._MIN_PENDING, len(self._keys) // 4):
            self.merge()

    def merge(self) -> None:
        """Fold the pending hashes into the sorted arrays."""
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *(d for d, _ in self._pending)])
        segments = np.concatenate(
            [self._segments, *(np.full(len(d), s, np.int32) for d, s in self._pending)])
        rows = np.concatenate([self._rows, *(np.arange(len(d), dtype=np.int32) for d, _ in self._pending)])
        # Stable sort, then keep the last of equal keys: a later segment holds the newer row.
        order = np.argsort(keys, kind="stable")
        keys, segments, rows = keys[order], segments[order], rows[order]
        last = np.append(keys[1:] != keys[:-1], True)
        self._keys, self._segments, self._rows = keys[last], segments[last], rows[last]
        self._pending, self._recent = [], {}

    def locate(self, hashes: list[str]) -> dict[str, tuple[int, int]]:
        """(segment, row) of each of ``hashes`` that is stored."""
        found: dict[str, tuple[int, int]] = {}
        probe = _digests(hashes)  # checked even when empty: a bad hash never gets written
        if len(self._keys) and hashes:
            at = np.minimum(np.searchsorted(self._keys, probe), len(self._keys) - 1)
            for i in np.flatnonzero(self._keys[at] == probe):
                found[hashes[i]] = (int(self._segments[at[i]]), int(self._rows[at[i]]))
        for h in hashes:
            if h in self._recent:
                found[h] = self._recent[h]
        return found


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
