"""Query adapters: search keeps working the hour an index's model is retired.

An adapter is a linear map from another profile's space (the one a migration will move
to) into a live version's space, fitted on pairs the data directory already holds: the
live version's vectors from the Parquet vector store (no call to the old model, so it
works after that model is gone) and the new model's embeddings of the same texts
(Drift-Adapter, EMNLP 2025). A query is then embedded with the new model and mapped,
and the live version is searched as it is, while the full re-index runs.

An adapter is judged before use the way a migration is (``fit_adapter``): the pair
cosine on held-out documents, and retrieval through the adapter against the old model's
own retrieval on the same version (nDCG@10 and recall@100 with a golden file, else
self-retrieval@10 on held-out documents) while the old model can still embed queries;
once it cannot, against ``[adapter] min_self_retrieval``. Below ``min_retention`` it is
refused (``--force`` overrides, and the record says so).

Files: ``<data>/adapters/<index>/<version>/<id>/adapter.json`` and ``weights.npy``
(float32, ``(d_in + 1, d_out)``: the map and, in its last row, the bias). The id is the
start of the adapter's fingerprint, made of both spaces' fingerprints and the weights'
hash. An adapter serves only while the version it maps into is live; when a migration
to its profile goes live it retires itself (``retire_superseded``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe._files import make_dir, write_json
from embedpipe.errors import (
    AdapterRefused,
    ConfigError,
    FingerprintMismatch,
    InputError,
    KeyRefused,
    ModelDeprecated,
    NoAdapter,
    StoreError,
    WeightsNotFound,
)
from embedpipe.layout import Layout

if TYPE_CHECKING:
    from embedpipe.backends import EmbedBatch, Embedder
    from embedpipe.config import Settings
    from embedpipe.index import IndexVersions, Version
    from embedpipe.profiles import Profile

__all__ = [
    "KINDS",
    "AdaptedEmbedder",
    "Adapter",
    "AdapterReport",
    "active_adapter",
    "adapt",
    "adapters_of",
    "apply_map",
    "fit_adapter",
    "fit_map",
    "live_model_state",
    "query_embedder",
    "reinstate",
    "retire_superseded",
]

KINDS = ("procrustes", "ridge", "lowrank")
# Errors that mean "this model will not embed queries again": an adapter stands in.
# (A timeout or a 5xx is not one of them: replicas and retries handle those.)
GONE = (ModelDeprecated, KeyRefused, WeightsNotFound, FingerprintMismatch, ConfigError)


# --- the map ------------------------------------------------------------------------------


def fit_map(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fit ``x @ W[:-1] + W[-1] ~ y``; returns ``W`` of shape ``(d_in + 1, d_out)``.

    * ``procrustes``: the orthogonal (semi-orthogonal when the widths differ) map that
      best rotates ``x`` onto ``y``; no bias. Keeps angles: never overfits, and the
      weakest when the two spaces differ in more than a rotation.
    * ``ridge``: the least-squares affine map with an L2 penalty chosen on a tenth of the
      pairs held back from the fit.
    * ``lowrank``: the ridge map cut to its leading singular directions (a quarter of the
      smaller width), which drops directions the pairs cannot pin down.
    """
    if kind not in KINDS:
        raise ConfigError(f"adapter kind {kind!r} is not one of {', '.join(KINDS)}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if kind == "procrustes":
        u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
        return np.vstack([u @ vt, np.zeros((1, y.shape[1]))]).astype(np.float32)
    w = _ridge(x, y, seed)
    if kind == "lowrank":
        rank = max(1, min(x.shape[1], y.shape[1]) // 4)
        u, s, vt = np.linalg.svd(w[:-1], full_matrices=False)
        w = np.vstack([(u[:, :rank] * s[:rank]) @ vt[:rank], w[-1:]])
    return w.astype(np.float32)


def _ridge_solve(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    xa = np.hstack([x, np.ones((len(x), 1))])
    penalty = lam * np.eye(xa.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    return np.linalg.solve(xa.T @ xa + penalty, xa.T @ y)


def _ridge(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Ridge with the penalty that maps a held-back tenth of the pairs best (mean cosine)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    cut = max(1, len(x) // 10)
    held, fit = order[:cut], order[cut:]
    scale = float(np.mean(np.sum(x * x, axis=1)))  # lambdas relative to the inputs' norm
    best, best_lam = -2.0, 1.0
    for rel in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        lam = rel * scale
        score = _mean_cosine(apply_map(_ridge_solve(x[fit], y[fit], lam), x[held]), y[held])
        if score > best:
            best, best_lam = score, lam
    return _ridge_solve(x, y, best_lam)


def apply_map(weights: np.ndarray, vectors: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Map row vectors with ``weights`` (``fit_map``'s layout); L2-normalise when asked."""
    out = np.asarray(vectors, dtype=weights.dtype) @ weights[:-1] + weights[-1]
    if normalize:
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        out = out / np.where(norms == 0, 1, norms)
    return out


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)))


# --- the record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """One fitted adapter, as its ``adapter.json`` describes it."""

    id: str
    index: str
    target: str  # the version (collection) it maps into
    target_fingerprint: str
    target_profile: str
    profile: str  # the profile whose query embeddings it maps
    source_fingerprint: str
    kind: str
    dims_in: int
    dims_out: int
    normalize: bool  # the target space's vectors are unit length
    weights_sha256: str
    fingerprint: str
    state: str  # accepted | refused | replaced | retired
    forced: bool
    created_at: str
    pairs: int
    validation: dict[str, Any] = field(default_factory=dict)
    retired_reason: str | None = None

    @property
    def retention(self) -> float | None:
        return self.validation.get("retention")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What status, search results and the watch report show."""
        return {"id": self.id, "profile": self.profile, "kind": self.kind, "state": self.state,
                "retention": self.retention, "forced": self.forced, "created_at": self.created_at}


def adapter_fingerprint(source: str, target: str, weights_sha256: str) -> str:
    """The identity of a mapped space: the two spaces it joins and the map itself."""
    identity = json.dumps({"source": source, "target": target, "weights": weights_sha256},
                          sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(identity.encode()).hexdigest()


def _folder(settings: Settings, index: str, target: str) -> Path:
    return Layout(settings.data_dir).adapters(index) / target


def adapters_of(settings: Settings, version: Version) -> list[Adapter]:
    """Every adapter into ``version``, newest first (unreadable records are skipped)."""
    folder = _folder(settings, version.index, version.collection)
    found = []
    for meta in folder.glob("*/adapter.json") if folder.is_dir() else ():
        try:
            found.append(Adapter(**json.loads(meta.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(found, key=lambda a: a.created_at, reverse=True)


def active_adapter(settings: Settings, version: Version) -> Adapter | None:
    """The adapter queries of ``version`` go through when they must: the newest accepted
    one fitted for exactly that version's space."""
    for adapter in adapters_of(settings, version):
        if adapter.state == "accepted" and adapter.target_fingerprint == version.fingerprint:
            return adapter
    return None


def _weights(settings: Settings, adapter: Adapter) -> np.ndarray:
    path = _folder(settings, adapter.index, adapter.target) / adapter.id / "weights.npy"
    try:
        weights = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"adapter {adapter.id}'s weights at {path} are unreadable ({exc}); "
                         f"fit it again with `embedpipe adapt --index {adapter.index} --to "
                         f"{adapter.profile}`") from None
    if hashlib.sha256(weights.tobytes()).hexdigest() != adapter.weights_sha256:
        raise StoreError(f"adapter {adapter.id}'s weights at {path} changed since it was "
                         f"validated; fit it again with `embedpipe adapt --index {adapter.index} "
                         f"--to {adapter.profile}`")
    return weights


def _save(settings: Settings, adapter: Adapter, weights: np.ndarray | None = None) -> Adapter:
    folder = _folder(settings, adapter.index, adapter.target) / adapter.id
    if weights is not None:
        make_dir(folder)
        tmp = folder / ".weights.npy.tmp"
        with tmp.open("wb") as fh:
            np.save(fh, weights, allow_pickle=False)
        tmp.chmod(0o600)
        tmp.replace(folder / "weights.npy")
    write_json(folder / "adapter.json", adapter.to_dict(), durable=True)
    return adapter


def _set_state(settings: Settings, adapter: Adapter, state: str, reason: str | None = None) -> Adapter:
    return _save(settings, replace(adapter, state=state, retired_reason=reason))


def retire_superseded(settings: Settings, index: str, live: Version, versions: Sequence[Version]) -> list[Adapter]:
    """After a cutover: adapters from ``live``'s space into an older version of ``index``
    are no longer needed (queries now embed natively); they retire themselves."""
    retired = []
    for version in versions:
        if version.collection == live.collection:
            continue
        for adapter in adapters_of(settings, version):
            if adapter.state == "accepted" and adapter.source_fingerprint == live.fingerprint:
                reason = (f"index {index!r} went live on {live.collection} in "
                          f"{adapter.profile!r}'s own space")
                retired.append(_set_state(settings, adapter, "retired", reason))
    return retired


def reinstate(settings: Settings, version: Version) -> Adapter | None:
    """After a rollback to ``version``: the adapter it had serves again (the model it was
    fitted around may still be gone)."""
    if active_adapter(settings, version) is not None:
        return None
    for adapter in adapters_of(settings, version):
        if adapter.state == "retired" and adapter.target_fingerprint == version.fingerprint:
            return _set_state(settings, adapter, "accepted")
    return None


# --- queries through an adapter ---------------------------------------------------------------


class AdaptedEmbedder:
    """Embeds queries with the adapter's profile and maps them into the target space.

    Documents are never embedded through an adapter: a version holds only its own
    model's vectors. ``profile`` is the profile the text goes to (the sovereignty check
    judges that one)."""

    def __init__(self, adapter: Adapter, inner: Embedder, weights: np.ndarray) -> None:
        if inner.fingerprint != adapter.source_fingerprint:
            raise FingerprintMismatch(
                f"adapter {adapter.id} maps queries of {adapter.profile!r} as it was "
                f"({adapter.source_fingerprint[:12]}), but that profile now produces "
                f"{inner.fingerprint[:12]}; fit it again with `embedpipe adapt --index "
                f"{adapter.index} --to {adapter.profile}`")
        self.adapter = adapter
        self.inner = inner
        self.profile: Profile = inner.profile  # type: ignore[attr-defined]
        self._weights = weights

    @property
    def fingerprint(self) -> str:
        return self.adapter.fingerprint

    @property
    def concurrency(self) -> int:
        return self.inner.concurrency

    @property
    def max_tokens(self) -> int | None:
        return self.inner.max_tokens

    def check(self) -> None:
        self.inner.check()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.inner.token_spans(text)

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        raise InputError("an adapter maps queries only; documents are embedded by the "
                         "version's own model (or a migration)")

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return apply_map(self._weights, self.inner.embed_queries(texts), self.adapter.normalize)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_queries([text])[0]


def adapted(settings: Settings, adapter: Adapter) -> AdaptedEmbedder:
    from embedpipe.backends import build_embedder

    inner = build_embedder(settings.profile(adapter.profile), settings)
    return AdaptedEmbedder(adapter, inner, _weights(settings, adapter))


def query_embedder(settings: Settings, version: Version) -> tuple[Embedder, Adapter | None]:
    """The embedder queries of ``version`` go through, and the adapter when it is one.

    The version's own model when it can embed; its accepted adapter when the index says
    ``query_via = "adapter"``, or when the model is gone (retired by its provider, its
    weights or key or profile removed, its weights changed)."""
    from embedpipe.backends import build_embedder
    from embedpipe.index import check_fingerprint

    adapter = active_adapter(settings, version)
    if settings.index_settings(version.index).query_via == "adapter":
        if adapter is None:
            raise NoAdapter(
                f"index {version.index!r} sets query_via = \"adapter\" but its live version "
                f"{version.collection} has no accepted adapter; fit one with `embedpipe adapt "
                f"--index {version.index} --to PROFILE`")
        return adapted(settings, adapter), adapter
    profile = settings.profiles.get(version.profile)
    if adapter is not None and (profile is None or profile.deprecation.status() == "retired"):
        return adapted(settings, adapter), adapter
    try:
        profile = settings.profile(version.profile)
        embedder = build_embedder(profile, settings)
        check_fingerprint(version, embedder.fingerprint, profile.name)
    except GONE as exc:
        if adapter is None:
            raise
        _log_fallback(version, adapter, exc)
        return adapted(settings, adapter), adapter
    return embedder, None


def live_model_state(settings: Settings, version: Version, probe: bool = False) -> dict[str, Any]:
    """Whether ``version``'s own model can still embed queries, why not, and the adapter
    that stands in. ``probe`` embeds one query (a hosted request); without it only what
    needs no request is checked (the catalogue's shutdown date, weights, key, fingerprint)."""
    from embedpipe.backends import build_embedder
    from embedpipe.index import check_fingerprint
    from embedpipe.validation import old_embedder

    reason = None
    if probe:
        embedder, why, transient = old_embedder(settings, version)
        reason = why if embedder is None and not transient else None
    else:
        try:
            profile = settings.profile(version.profile)
            if profile.deprecation.status() == "retired":
                raise ModelDeprecated(f"profile {profile.name!r} was retired on {profile.deprecation.shutdown}")
            check_fingerprint(version, build_embedder(profile, settings).fingerprint, profile.name)
        except GONE as exc:
            reason = str(exc).splitlines()[0]
    adapter = active_adapter(settings, version)
    return {"can_query": reason is None, "reason": reason, "adapter": adapter.summary() if adapter else None}


def _log_fallback(version: Version, adapter: Adapter, exc: Exception) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "index %r: its model cannot embed queries (%s); searching through adapter %s (%s)",
        version.index, str(exc).splitlines()[0], adapter.id, adapter.profile)


# --- fitting and judging ----------------------------------------------------------------------


@dataclass
class AdapterReport:
    """What ``embedpipe adapt`` did: the pairs, the fit, the checks, the verdict."""

    index: str
    target: str
    profile: str
    kind: str
    adapter: str | None  # the id, when stored
    state: str  # accepted | refused
    forced: bool
    pairs: int
    held_out: int
    embedded: int  # texts the new model embedded (the rest came from its vector store)
    pair_cosine: float
    mode: str  # golden | self-retrieval
    old_can_query: bool
    old_reason: str | None
    metrics: dict[str, dict[str, float | None]]  # metric -> {"old", "adapter", "retention"}
    retention: float | None
    min_retention: float
    min_self_retrieval: float
    map_us_per_query: float
    seconds: float
    verdict: str
    candidates: dict[str, dict[str, float | None]] = field(default_factory=dict)  # kind -> metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapt(settings: Settings, index: str, to: str, sample: int | None = None, kind: str | None = None,
          golden: Path | None = None, force: bool = False, progress: Any = None) -> dict[str, Any]:
    """``embedpipe adapt``: fit, judge and store an adapter from ``to`` into ``index``'s
    live version (one adapt per index at a time; ingests, syncs and a running migration
    go on). ``progress`` is a factory as the ingest's: ``progress(total)(n)``."""
    from embedpipe.index import IndexVersions
    from embedpipe.locks import index_lock

    with index_lock(settings, index, timeout=0, what="adapt"):
        report = fit_adapter(settings, IndexVersions.open(settings), index, to, sample=sample,
                             kind=kind, golden=golden, force=force, progress=progress)
    return report.to_dict()


def fit_adapter(
    settings: Settings,
    versions: IndexVersions,
    index: str,
    to: str,
    sample: int | None = None,
    kind: str | None = None,
    golden: Path | None = None,
    force: bool = False,
    progress: Any = None,
) -> AdapterReport:
    """Fit an adapter from ``to``'s space into ``index``'s live version, judge it, and
    store it (accepted, or refused and recorded). Raises :class:`AdapterRefused` when it
    is refused and not ``force``d. ``kind`` "auto" fits every kind and keeps the one that
    retrieves best (on Cranfield the best kind depends on the direction: bench/adapters.py)."""
    from embedpipe.backends import build_embedder
    from embedpipe.evaluation import read_golden

    started = time.perf_counter()
    cfg = settings.adapter
    kind = kind or cfg.kind
    if kind not in (*KINDS, "auto"):
        raise ConfigError(f"--kind {kind!r} is not one of {', '.join(KINDS)}, auto")
    sample = sample or cfg.sample
    queries = read_golden(golden) if golden else None  # a bad file fails before any work
    live = versions.require_live(index)
    profile = settings.profile(to)
    if live.chunking is not None:
        raise InputError(f"index {index!r} is chunked; adapters map whole-document spaces "
                         "only for now: migrate with `embedpipe migrate --to PROFILE`")
    embedder = build_embedder(profile, settings)
    if embedder.fingerprint == live.fingerprint:
        raise InputError(f"index {index!r} already lives in {to!r}'s space; no adapter is needed")
    embedder.check()
    pairs = _pairs(settings, index, live, profile, embedder, sample, cfg.holdout, progress)
    queried = _RememberedQueries(embedder)  # each candidate maps the same query embeddings
    candidates = {}
    for k in (KINDS if kind == "auto" else (kind,)):
        weights = fit_map(k, pairs.x_fit, pairs.y_fit)
        candidates[k] = AdaptedEmbedder(_record(live, to, embedder.fingerprint, k, weights, len(pairs.x_fit)),
                                        queried, weights)
    judged = _judge(settings, versions, live, candidates, pairs, queries)
    chosen = candidates[judged["kind"]]
    adapter, weights = chosen.adapter, chosen._weights
    pair_cosine = _mean_cosine(apply_map(weights, pairs.x_held, adapter.normalize), pairs.y_held)
    ok = judged["ok"]
    state = "accepted" if ok or force else "refused"
    adapter = replace(adapter, state=state, forced=bool(force and not ok), validation={
        "pair_cosine": round(pair_cosine, 4), "mode": judged["mode"], "metrics": judged["metrics"],
        "retention": judged["retention"], "old_can_query": judged["old_embedder"] is not None,
        "old_reason": judged["old_reason"], "verdict": judged["verdict"],
        "candidates": judged["candidates"]})
    if state == "accepted":
        for older in adapters_of(settings, live):
            if older.state == "accepted":
                _set_state(settings, older, "replaced", f"replaced by {adapter.id}")
    _save(settings, adapter, weights)
    report = AdapterReport(
        index=index, target=live.collection, profile=to, kind=adapter.kind, adapter=adapter.id, state=state,
        forced=adapter.forced, pairs=len(pairs.x_fit), held_out=len(pairs.x_held),
        embedded=pairs.embedded, pair_cosine=round(pair_cosine, 4), mode=judged["mode"],
        old_can_query=judged["old_embedder"] is not None, old_reason=judged["old_reason"],
        metrics=judged["metrics"], retention=judged["retention"], min_retention=cfg.min_retention,
        min_self_retrieval=cfg.min_self_retrieval, map_us_per_query=_map_cost(weights),
        seconds=round(time.perf_counter() - started, 3), verdict=judged["verdict"],
        candidates=judged["candidates"],
    )
    if state == "refused":
        raise AdapterRefused(
            f"adapter {adapter.id} ({adapter.kind}) from {to!r} into {live.collection} was refused: "
            f"{judged['verdict']}; a full re-index is needed (`embedpipe migrate --to {to} "
            f"--index {index}`), or pass --force to use it anyway")
    return report


def _record(live: Version, to: str, source_fp: str, kind: str, weights: np.ndarray, pairs: int) -> Adapter:
    """The record of a candidate map (``refused`` until it is judged)."""
    sha = hashlib.sha256(weights.tobytes()).hexdigest()
    fp = adapter_fingerprint(source_fp, live.fingerprint, sha)
    return Adapter(
        id=fp[:12], index=live.index, target=live.collection, target_fingerprint=live.fingerprint,
        target_profile=live.profile, profile=to, source_fingerprint=source_fp, kind=kind,
        dims_in=int(weights.shape[0] - 1), dims_out=int(weights.shape[1]),
        normalize=live_normalize(live), weights_sha256=sha, fingerprint=fp, state="refused",
        forced=False, created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        pairs=pairs,
    )


class _RememberedQueries:
    """An embedder that embeds each query text once, however many candidates ask."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.fingerprint = inner.fingerprint
        self.profile = inner.profile  # type: ignore[attr-defined]
        self._seen: dict[str, np.ndarray] = {}

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._seen))
        if new:
            self._seen.update(zip(new, self.inner.embed_queries(new)))
        return np.stack([self._seen[t] for t in texts])


def live_normalize(version: Version) -> bool:
    """Whether the version's vectors are unit length (cosine spaces always compare them so)."""
    return bool(version.profile_data.get("normalize", True)) or version.distance == "cosine"


@dataclass
class _Pairs:
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_held: np.ndarray
    y_held: np.ndarray
    held_ids: list[str]  # held-out documents: the self-retrieval queries come from these
    texts: dict[str, str]  # doc id -> text (held-out documents)
    embedded: int


def _pairs(settings: Settings, index: str, live: Version, profile: Profile, embedder: Embedder,
           sample: int, holdout: int, progress: Any) -> _Pairs:
    """(new model's vector, live version's stored vector) for a sample of the corpus's
    texts: ``sample`` to fit on, up to ``holdout`` of the rest held out."""
    from embedpipe.corpus import CorpusStore
    from embedpipe.validation import sample_ids
    from embedpipe.vectors import VectorStore

    old_store = VectorStore.existing(settings.data_dir, live.fingerprint, live.dims)
    if old_store is None:
        raise StoreError(
            f"the vector store holds no vectors of {live.collection}'s space "
            f"({live.fingerprint[:12]}); an adapter is fitted on them. Without them the index "
            f"needs a full re-index: `embedpipe migrate --to {profile.name} --index {index}`")
    corpus = CorpusStore.for_index(settings.data_dir, index)
    # Ids and hashes only in this pass: the texts are read for the sampled documents alone,
    # so a corpus of millions is never held in memory.
    doc_of: dict[str, str] = {}  # content hash -> a document id with that text
    for batch in corpus.iter_batches(columns=["id", "content_hash"]):
        for doc, h in zip(batch.column("id").to_pylist(), batch.column("content_hash").to_pylist()):
            doc_of.setdefault(h, doc)
    present = sorted(old_store.present(doc_of))
    if len(present) < 32:
        raise StoreError(
            f"the vector store holds {len(present)} vectors of {live.collection}'s corpus; an "
            "adapter needs at least 32 pairs. Re-index instead: "
            f"`embedpipe migrate --to {profile.name} --index {index}`")
    fit_n = min(sample, len(present) - max(8, len(present) // 5))  # always keep some held out
    fit = sample_ids(present, fit_n, f"adapter-fit-{live.collection}")
    rest = sorted(set(present) - set(fit))
    held = sample_ids(rest, holdout, f"adapter-held-{live.collection}")
    wanted = fit + held
    rows = corpus.get([doc_of[h] for h in wanted])
    by_hash = {h: (doc_of[h], rows[doc_of[h]]["text"]) for h in wanted}  # (a doc id, its text)
    new_vectors, embedded = _new_vectors(settings, profile, embedder, wanted,
                                         [by_hash[h][1] for h in wanted], progress)
    old_vectors = old_store.lookup(wanted)
    fit = [h for h in fit if h in new_vectors and h in old_vectors]
    held = [h for h in held if h in new_vectors and h in old_vectors]

    def stack(hashes: list[str], vectors: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([vectors[h] for h in hashes]).astype(np.float32)

    return _Pairs(stack(fit, new_vectors), stack(fit, old_vectors), stack(held, new_vectors),
                  stack(held, old_vectors), [by_hash[h][0] for h in held],
                  {by_hash[h][0]: by_hash[h][1] for h in held}, embedded)


def _new_vectors(settings: Settings, profile: Profile, embedder: Embedder, hashes: list[str],
                 texts: list[str], progress: Any) -> tuple[dict[str, np.ndarray], int]:
    """The new model's vectors of these texts: from its vector store, else embedded and
    added there, so the migration that follows reuses them (nothing is embedded twice)."""
    from embedpipe.vectors import VectorStore

    store = VectorStore(settings.data_dir, embedder.fingerprint, profile.dims, profile.name)
    found = store.lookup(hashes)
    todo = [(h, t) for h, t in zip(hashes, texts) if h not in found]
    advance = progress(len(todo)) if progress is not None else None
    embedded = 0
    for start in range(0, len(todo), 1024):
        window = todo[start:start + 1024]
        batch = embedder.embed_documents([t for _, t in window])
        keep = [n for n in range(len(window)) if n not in batch.failed]
        if keep:
            got = [window[n][0] for n in keep]
            store.add(got, batch.vectors[keep])
            found.update(zip(got, batch.vectors[keep]))
        embedded += len(window)
        if advance is not None:
            advance(len(window))
    return found, embedded


def _judge(settings: Settings, versions: IndexVersions, live: Version,
           candidates: dict[str, AdaptedEmbedder], pairs: _Pairs, queries: list[Any] | None) -> dict[str, Any]:
    """Retrieval of each candidate map against the old model's own on the live version;
    the best candidate, its metrics and the verdict on it."""
    from embedpipe.evaluation import first_sentence, mean, ndcg_at_k, recall_at_k
    from embedpipe.validation import old_embedder, rankings

    cfg = settings.adapter
    old, reason, _ = old_embedder(settings, live)
    sides: dict[str, Any] = dict(candidates)
    if old is not None:
        sides["old"] = old
    scores: dict[str, dict[str, float]] = {}  # metric -> side -> value
    if queries:
        for side, emb in sides.items():
            ranked = rankings(versions, live, emb, [q.query for q in queries], 100)
            scores.setdefault("nDCG@10", {})[side] = mean([ndcg_at_k(r, q.gains, 10) for r, q in zip(ranked, queries)])
            scores.setdefault("recall@100", {})[side] = mean([recall_at_k(r, q.gains, 100) for r, q in zip(ranked, queries)])
    ids = pairs.held_ids[:cfg.sample_queries]
    if ids:
        texts = [first_sentence(pairs.texts[i]) for i in ids]
        for side, emb in sides.items():
            ranked = rankings(versions, live, emb, texts, 10)
            scores.setdefault("self-retrieval@10", {})[side] = mean([1.0 if i in r else 0.0 for i, r in zip(ids, ranked)])
    gated = ["nDCG@10", "recall@100"] if queries else ["self-retrieval@10"]

    def score(kind: str) -> float:  # retention against the old model, else the adapter alone
        if old is None:
            return scores["self-retrieval@10"][kind]
        return min(scores[m][kind] / scores[m]["old"] if scores[m]["old"] else 0.0 for m in gated)

    best = max(candidates, key=score)
    metrics = {m: {"old": _r(v.get("old")), "adapter": _r(v[best]),
                   "retention": _r(v[best] / v["old"]) if v.get("old") else None} for m, v in scores.items()}
    others = {k: {m: _r(v[k]) for m, v in scores.items()} for k in candidates}
    if old is not None:
        retention = _r(score(best))
        ok = retention >= cfg.min_retention
        verdict = (f"it keeps {retention:.1%} of the old model's {' and '.join(gated)} "
                   f"(need {cfg.min_retention:.0%})")
    else:
        retention = None
        ok = score(best) >= cfg.min_self_retrieval
        verdict = (f"the old model cannot embed queries ({reason}); judged on its own: "
                   f"self-retrieval@10 {score(best):.3f} (need >= {cfg.min_self_retrieval})")
    return {"ok": ok, "kind": best, "metrics": metrics, "retention": retention, "verdict": verdict,
            "candidates": others, "mode": "golden" if queries else "self-retrieval",
            "old_embedder": old, "old_reason": reason}


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _map_cost(weights: np.ndarray, n: int = 200) -> float:
    """Microseconds to map one query vector (measured here, on this machine)."""
    q = np.random.default_rng(0).standard_normal((1, weights.shape[0] - 1)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(n):
        apply_map(weights, q, True)
    return round((time.perf_counter() - started) / n * 1e6, 2)


def remove_adapters(settings: Settings, index: str, collection: str) -> None:
    """Delete the adapters into a version (``retire`` drops the version itself)."""
    shutil.rmtree(_folder(settings, index, collection), ignore_errors=True)
