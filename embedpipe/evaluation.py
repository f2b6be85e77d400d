"""Retrieval metrics and golden sets (nDCG@k, recall@k), and a reader for Cranfield.

Graded judgments map to gains: a golden set gives ``{doc_id: gain}`` per query,
higher is better. Cranfield's grades (1 best .. 4 least, -1 also relevant) become
gains 4, 3, 2, 1 (and 4 for -1), as its README prescribes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GoldenSet", "mean", "ndcg_at_k", "read_cranfield", "recall_at_k"]


def ndcg_at_k(ranked: Sequence[str], gains: Mapping[str, float], k: int = 10) -> float:
    """Normalised discounted cumulative gain of one ranking (0 when nothing is relevant)."""
    dcg = sum(gains.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], gains: Mapping[str, float], k: int = 100) -> float:
    relevant = {d for d, g in gains.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class GoldenSet:
    """Documents, queries and graded judgments of a test collection."""

    documents: dict[str, str]  # id -> text
    queries: dict[str, str]  # id -> text
    judgments: dict[str, dict[str, float]]  # query id -> {doc id: gain}


_CRAN_GAIN = {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0, -1: 4.0}


def _smart_records(text: str) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    field = None
    for line in text.splitlines():
        head = re.match(r"^\.([ITABW])\b\s*(.*)$", line)
        if head and head.group(1) == "I":
            records.append({"I": head.group(2).strip()})
            field = None
        elif head:
            field = head.group(1)
            records[-1][field] = head.group(2)
        elif field is not None:
            records[-1][field] = (records[-1].get(field, "") + " " + line).strip()
    return records


def read_cranfield(folder: Path) -> GoldenSet:
    """The Cranfield collection in SMART format; document text is title + abstract."""
    folder = Path(folder)
    docs = {
        r["I"]: " ".join(" ".join((r.get("T", ""), r.get("W", ""))).split())
        for r in _smart_records((folder / "cran.all.1400").read_text(encoding="latin-1"))
    }
    queries_in_order = _smart_records((folder / "cran.qry").read_text(encoding="latin-1"))
    # The judgments number queries 1..225 in file order, not by their .I numbers.
    queries = {str(n): " ".join(r.get("W", "").split()) for n, r in enumerate(queries_in_order, 1)}
    judgments: dict[str, dict[str, float]] = {}
    for line in (folder / "cranqrel").read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            q, d, grade = parts[0], parts[1], int(parts[2])
            judgments.setdefault(q, {})[d] = _CRAN_GAIN.get(grade, 0.0)
    return GoldenSet(docs, queries, judgments)
