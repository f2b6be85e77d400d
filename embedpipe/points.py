"""The point format: ids and payloads as embedpipe writes them to any engine.

A point is a document, or one chunk of it. Its id derives from the point key (the
document id, or ``<doc_id>#<n>`` for a chunk), so a re-run overwrites and never
duplicates. Its payload carries what a version must know about the corpus without
reading it: the document id, the content and record hashes (so catch-up, rollback and
the cutover compare a version with the corpus from the version alone), the metadata,
the text when the index stores it, and for chunks their position and offsets.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["HOLDING_FIELDS", "Holding", "holding", "payload", "point_id", "summary"]

_POINT_NAMESPACE = uuid.UUID("6f1c4a8e-2b7d-5e39-9c0a-1d2e3f4a5b6c")

# What a holding needs of a point's payload (never the text).
HOLDING_FIELDS = ("id", "record_hash", "content_hash", "metadata", "chunk", "chunks")


def point_id(key: str) -> str:
    """Deterministic point id of a point key: re-runs overwrite, never duplicate."""
    return str(uuid.uuid5(_POINT_NAMESPACE, key))


def payload(row: dict[str, Any], store_text: bool) -> dict[str, Any]:
    """The payload of a whole-document point from its corpus row (chunks add
    ``chunk``, ``chunks``, ``chunk_id``, ``start`` and ``end``: chunking.py)."""
    out: dict[str, Any] = {
        "id": row["id"],
        "content_hash": row["content_hash"],
        "record_hash": row["record_hash"],
        "metadata": json.loads(row["metadata"] or "{}"),
    }
    if store_text:
        out["text"] = row["text"]
    return out


@dataclass(frozen=True, slots=True)
class Holding:
    """A document's points in one version."""

    record_hash: str | None  # None when its points disagree (a rewrite was interrupted)
    points: tuple[str, ...]


def summary(point: str, payload: dict[str, Any]) -> tuple[str, str, int, int]:
    """(point id, record hash, chunk, chunks) of one point's payload."""
    rh = payload.get("record_hash")
    if rh is None:  # points written before record_hash joined the payload
        from embedpipe.corpus import record_hash

        meta = json.dumps(payload.get("metadata") or {}, sort_keys=True,
                          ensure_ascii=False, default=str)
        rh = record_hash(str(payload.get("content_hash")), meta)
    return point, rh, payload.get("chunk", 0), payload.get("chunks", 1)


def holding(points: list[tuple[str, str, int, int]]) -> Holding:
    """Whole (one record hash, chunks 0..n-1 of n) or half-written (record hash None)."""
    hashes = {rh for _, rh, _, _ in points}
    counts = {n for _, _, _, n in points}
    chunks = sorted(c for _, _, c, _ in points)
    whole = len(hashes) == 1 and len(counts) == 1 and chunks == list(range(counts.pop()))
    return Holding(hashes.pop() if whole else None, tuple(p for p, _, _, _ in points))
