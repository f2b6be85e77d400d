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

__all__ = [
    "GoldenQuery",
    "GoldenSet",
    "first_sentence",
    "mean",
    "ndcg_at_k",
    "overlap_at_k",
    "read_cranfield",
    "read_golden",
    "recall_at_k",
]


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


@dataclass(frozen=True)
class GoldenQuery:
    """One query of a golden file with graded relevant documents."""

    query: str
    gains: dict[str, float]  # doc id -> gain (higher is more relevant)


def read_golden(path: Path) -> list[GoldenQuery]:
    """Read a golden set: JSONL of ``{"query": str, "relevant": [ids], "grades": [numbers]}``.

    ``relevant`` may also be a mapping ``{id: grade}``; without grades every relevant
    document has gain 1. Any malformed line is an ``InputError`` naming the line.
    """
    import json

    from embedpipe.errors import InputError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"golden file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"golden file {path} is unreadable ({type(exc).__name__})") from None
    out: list[GoldenQuery] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{where}: not a JSON object") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: not a JSON object")
        out.append(GoldenQuery(_golden_query(record, where), _golden_gains(record, where)))
    if not out:
        raise InputError(f"golden file {path} holds no queries")
    return out


def _golden_query(record: dict, where: str) -> str:
    from embedpipe.errors import InputError

    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"{where}: 'query' must be a non-empty string")
    return query


def _golden_gains(record: dict, where: str) -> dict[str, float]:
    from embedpipe.errors import InputError

    relevant = record.get("relevant")
    grades = record.get("grades")
    if isinstance(relevant, dict):
        pairs = list(relevant.items())
    elif isinstance(relevant, list):
        if grades is not None and (not isinstance(grades, list) or len(grades) != len(relevant)):
            raise InputError(f"{where}: 'grades' must be a list as long as 'relevant'")
        pairs = list(zip(relevant, grades if grades is not None else [1.0] * len(relevant)))
    else:
        raise InputError(f"{where}: 'relevant' must be a list of ids or an {{id: grade}} object")
    gains: dict[str, float] = {}
    for doc_id, grade in pairs:
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
            raise InputError(f"{where}: relevant id {doc_id!r} must be a string")
        if not isinstance(grade, (int, float)) or isinstance(grade, bool) or not 0 <= grade < float("inf"):
            raise InputError(f"{where}: grade {grade!r} of {doc_id!r} must be a number >= 0 "
                             "(higher is more relevant)")
        gains[str(doc_id)] = float(grade)
    if not any(g > 0 for g in gains.values()):
        raise InputError(f"{where}: no relevant document with a positive grade")
    return gains


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str, max_words: int = 32) -> str:
    """A document's first sentence (at most ``max_words`` words): a self-retrieval query."""
    words = text.split()
    first = _SENTENCE_END.split(" ".join(words), maxsplit=1)[0].split()
    if len(first) < 4:  # a heading or an abbreviation: take the opening words instead
        first = words
    return " ".join(first[:max_words])


def overlap_at_k(a: Sequence[str], b: Sequence[str], k: int = 10) -> float:
    """Share of the top ``k`` two rankings have in common (of what they return, when a
    small index returns fewer than ``k``)."""
    size = min(k, max(len(a[:k]), len(b[:k])))
    return len(set(a[:k]) & set(b[:k])) / size if size else 0.0
