"""The validation gate a new index version passes before the alias moves to it.

Checks, in order of cost:

* **parity**: the version holds exactly the live corpus (same ids, none missing or extra);
* **vectors**: a sample of stored vectors equals fresh embeddings of the same texts
  (cosine >= ``min_cosine``), which catches a stale or corrupt vector store, since
  reused vectors are never recomputed;
* **retrieval**, old version against new: with a golden file, nDCG@10 and recall@100;
  without one, self-retrieval@10 on a sample (a document's first sentence as the query,
  the document expected in the top 10) and overlap@10 between the two rankings.

The gate fails when a gated metric of the new version is below the old one's by more
than ``tolerance``. When the old model can no longer embed queries (deprecated, its key
gone, its weights changed), the report says so and the new version is judged on its
own: its self-retrieval must reach ``min_self_retrieval``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.errors import (
    ConfigError,
    EmbedpipeError,
    FingerprintMismatch,
    KeyRefused,
    ModelDeprecated,
    WeightsNotFound,
)
from embedpipe.evaluation import first_sentence, mean, ndcg_at_k, overlap_at_k, read_golden, recall_at_k
from embedpipe.index import check_fingerprint

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.config import Settings
    from embedpipe.corpus import CorpusStore
    from embedpipe.index import IndexVersions, Version

__all__ = ["Check", "ValidationReport", "old_embedder", "rankings", "sample_ids", "validate"]


@dataclass
class Check:
    """One line of the validation table."""

    name: str
    passed: bool
    detail: str
    old: float | None = None
    new: float | None = None
    gated: bool = True  # informational rows (overlap) never fail the gate


@dataclass
class ValidationReport:
    old_collection: str
    new_collection: str
    mode: str  # "golden" or "self-retrieval"
    tolerance: float
    old_can_query: bool
    old_reason: str | None
    checks: list[Check] = field(default_factory=list)
    forced: bool = False
    embedded: int = 0  # texts and queries validation sent to models
    seconds: float = 0.0
    path: str | None = None

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks if c.gated)

    @property
    def passed(self) -> bool:
        """True when every gated check passed, or ``--force`` overrode the gate."""
        return self.checks_passed or self.forced

    def summary(self) -> str:
        failed = [c.name for c in self.checks if c.gated and not c.passed]
        return "failed: " + ", ".join(failed) if failed else "all checks passed"

    def table(self) -> list[dict[str, Any]]:
        """Rows for the CLI table and the Prefect table artifact."""
        return [
            {
                "check": c.name,
                "old": _fmt(c.old),
                "new": _fmt(c.new),
                "result": ("pass" if c.passed else "FAIL") if c.gated else "info",
                "detail": c.detail,
            }
            for c in self.checks
        ]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["checks_passed"] = self.checks_passed
        data["table"] = self.table()
        return data


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) > 1 else f"{value:.4f}"


def sample_ids(ids: Sequence[str], n: int, seed: str) -> list[str]:
    """A deterministic sample: the same corpus and seed give the same documents."""
    pool = sorted(ids)
    if len(pool) <= n:
        return pool
    return sorted(random.Random(seed).sample(pool, n))


def validate(
    settings: Settings,
    versions: IndexVersions,
    corpus: CorpusStore,
    old: Version,
    new: Version,
    new_embedder: Embedder,
    golden: Path | None = None,
    tolerance: float | None = None,
    force: bool = False,
) -> ValidationReport:
    """Validate ``new`` against the live ``old``; see the module docstring."""
    started = time.perf_counter()
    cfg = settings.migration
    tol = cfg.tolerance if tolerance is None else tolerance
    queries = read_golden(golden) if golden else None  # a bad file fails before any work
    old_queries, reason, broken = old_embedder(settings, old)
    report = ValidationReport(
        old_collection=old.collection,
        new_collection=new.collection,
        mode="golden" if queries else "self-retrieval",
        tolerance=tol,
        old_can_query=old_queries is not None,
        old_reason=reason,
        forced=False,
    )
    known = corpus.known()
    report.checks.append(_parity(versions, new, set(known)))
    if broken:  # a failure retrying may fix: do not quietly judge the new version alone
        report.checks.append(Check("old version answers queries", False,
                                   f"{reason}; re-run the migration, or pass --force"))
    sample = sample_ids(list(known), cfg.vector_sample, new.collection)
    texts = _texts(corpus, set(sample) | set(sample_ids(list(known), cfg.sample_size, "self")))
    report.checks.append(_vectors(versions, new, new_embedder, sample, texts, cfg.min_cosine))
    report.embedded += len(sample)
    sides = {"new": (new, new_embedder)}
    if old_queries is not None:
        sides["old"] = (old, old_queries)
    if queries:
        report.checks.extend(_golden_checks(versions, sides, queries, tol, set(known)))
        report.embedded += len(queries) * len(sides)
    if not queries or old_queries is None:
        chosen = sample_ids(list(known), cfg.sample_size, "self")
        report.checks.extend(_self_checks(versions, sides, chosen, texts, tol, cfg.min_self_retrieval))
        report.embedded += len(chosen) * len(sides)
    if force and not report.checks_passed:
        report.forced = True
    report.seconds = round(time.perf_counter() - started, 3)
    return report


# The old model is gone for good: the new version is judged on its own.
_GONE = (ModelDeprecated, KeyRefused, FingerprintMismatch, WeightsNotFound, ConfigError)


def old_embedder(settings: Settings, old: Version) -> tuple[Embedder | None, str | None, bool]:
    """(the old version's query embedder, why it cannot embed queries, whether that
    failure may be transient). A model that is gone for good (deprecated, weights or
    profile removed, key withdrawn, fingerprint changed) means "judge the new version on
    its own"; anything else (a 5xx after retries, a timeout) fails the gate instead."""
    from embedpipe.backends import build_embedder

    try:
        embedder = build_embedder(settings.profile(old.profile), settings)
        check_fingerprint(old, embedder.fingerprint, old.profile)
        embedder.embed_query("validation probe")
    except _GONE as exc:
        return None, str(exc).splitlines()[0], False
    except EmbedpipeError as exc:
        return None, f"the old model failed: {str(exc).splitlines()[0]}", True
    return embedder, None, False


def _texts(corpus: CorpusStore, ids: set[str]) -> dict[str, str]:
    return {i: row["text"] for i, row in corpus.get(ids).items()}


def _parity(versions: IndexVersions, new: Version, corpus_ids: set[str]) -> Check:
    held = versions.holdings(new.collection)
    missing = sum(1 for i in corpus_ids if i not in held)
    partial = sum(1 for i in corpus_ids if i in held and held[i].record_hash is None)
    extra = len(held.keys() - corpus_ids)
    ok = not (missing or partial or extra)
    points = sum(len(h.points) for h in held.values())
    detail = f"{len(held)} documents ({points} points), {len(corpus_ids)} corpus documents"
    if not ok:
        detail += f" ({missing} missing, {partial} partly written, {extra} extra)"
    return Check("count parity", ok, detail, float(len(corpus_ids)), float(len(held)))


def _vectors(
    versions: IndexVersions, new: Version, embedder: Embedder, sample: list[str],
    texts: dict[str, str], min_cosine: float,
) -> Check:
    from embedpipe.chunking import chunk_id, chunker_for

    # A chunked version is compared on each sampled document's first chunk.
    chunker = chunker_for(new, embedder)
    keys = {i: i for i in sample}
    if chunker is not None:
        texts = dict(texts)
        for i in sample:
            if i in texts:
                keys[i], texts[i] = chunk_id(i, 0), chunker.split(texts[i])[0].text
    by_key = versions.stored_vectors(new.collection, list(keys.values()))
    stored = {i: by_key[k] for i, k in keys.items() if k in by_key}
    ids = [i for i in sample if i in stored and i in texts]
    if not ids:
        return Check("stored = fresh vectors", False, "no stored vector to compare", None, None)
    batch = embedder.embed_documents([texts[i] for i in ids])
    cosines = [
        _cosine(stored[i], batch.vectors[n]) for n, i in enumerate(ids) if n not in batch.failed
    ]
    if not cosines:
        return Check("stored = fresh vectors", False, "the sample could not be re-embedded")
    worst = min(cosines)
    ok = worst >= min_cosine and len(ids) == len(sample) and not batch.failed
    detail = f"{len(cosines)} sampled vectors, min cosine {worst:.5f} (need >= {min_cosine})"
    if len(ids) < len(sample):
        detail += f"; {len(sample) - len(ids)} sampled documents have no point"
    if batch.failed:
        detail += f"; {len(batch.failed)} could not be re-embedded"
    return Check("stored = fresh vectors", ok, detail, None, worst)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / denom) if denom else 0.0


def rankings(
    versions: IndexVersions, version: Version, embedder: Embedder, queries: list[str], k: int
) -> list[list[str]]:
    out = []
    for start in range(0, len(queries), 256):  # batched: one model call per 256 queries
        vectors = embedder.embed_queries(queries[start:start + 256])
        for vector in vectors:
            hits = versions.search(version.collection, vector, k, with_text=False,
                                   group_by_doc=version.chunking is not None)
            out.append([h.id for h in hits])
    return out


def _compare(name: str, scores: dict[str, float], tol: float, detail: str) -> Check:
    new, old = scores["new"], scores.get("old")
    if old is None:  # judged on its own: reported, not gated here
        return Check(name, True, detail + "; old version cannot embed queries", None, new, gated=False)
    ok = new >= old - tol
    return Check(name, ok, f"{detail}; new - old = {new - old:+.4f} (tolerance {tol})", old, new)


def _golden_checks(
    versions: IndexVersions, sides: dict[str, tuple[Version, Embedder]], queries: list[Any],
    tol: float, corpus_ids: set[str],
) -> list[Check]:
    judged = {d for q in queries for d, g in q.gains.items() if g > 0}
    missing = len(judged - corpus_ids)
    if missing == len(judged):
        return [Check("golden set", False, f"none of the {len(judged)} relevant ids of the golden "
                      "file is in the corpus; check the ids")]
    ndcg: dict[str, float] = {}
    recall: dict[str, float] = {}
    for side, (version, embedder) in sides.items():
        ranked = rankings(versions, version, embedder, [q.query for q in queries], 100)
        ndcg[side] = mean([ndcg_at_k(r, q.gains, 10) for r, q in zip(ranked, queries)])
        recall[side] = mean([recall_at_k(r, q.gains, 100) for r, q in zip(ranked, queries)])
    detail = f"{len(queries)} golden queries" + (
        f" ({missing} of {len(judged)} relevant ids are not in the corpus)" if missing else "")
    return [_compare("nDCG@10", ndcg, tol, detail), _compare("recall@100", recall, tol, detail)]


def _self_checks(
    versions: IndexVersions, sides: dict[str, tuple[Version, Embedder]], ids: list[str],
    texts: dict[str, str], tol: float, floor: float,
) -> list[Check]:
    ids = [i for i in ids if i in texts]
    queries = [first_sentence(texts[i]) for i in ids]
    ranked = {side: rankings(versions, v, e, queries, 10) for side, (v, e) in sides.items()}
    hit = {side: mean([1.0 if i in r[:10] else 0.0 for i, r in zip(ids, rs)]) for side, rs in ranked.items()}
    detail = f"{len(ids)} documents' first sentences as queries"
    if "old" in hit:
        checks = [_compare("self-retrieval@10", hit, tol, detail)]
        overlap = mean([overlap_at_k(a, b, 10) for a, b in zip(ranked["old"], ranked["new"])])
        checks.append(Check("overlap@10 old/new", True, "shared top-10 results", None, overlap, gated=False))
        return checks
    ok = hit["new"] >= floor
    return [Check("self-retrieval@10", ok,
                  f"{detail}; judged on its own (need >= {floor})", None, hit["new"])]
