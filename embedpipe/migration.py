"""Re-index migrations as plain functions: plan, build, catch up, validate, cut over,
roll back, retire.

``embedpipe/flows/migrate.py`` strings these steps into a Prefect flow; tests call them directly.
The order is what keeps the invariants (docs/architecture.md):

1. **plan** counts documents and tokens, probes the target's throughput and finds the
   vectors already stored for the target's fingerprint; it writes nothing;
2. **prepare** checks the target model, then creates version N+1 in state ``building``
   (or resumes the one an interrupted run left);
3. **backfill** writes the corpus into it from the Parquet corpus, never from the old
   collection, reusing stored vectors. Each upsert is acknowledged before the batch
   counts as done, so the collection itself is the checkpoint: a killed run resumes
   by comparing it with the corpus (``todo``) and skipping what is already there;
4. **catch_up** brings in what ingests added, changed or deleted meanwhile (ingests
   keep writing the live version while this one builds);
5. **validate** (``validation.py``) gates the cutover;
6. **cutover** takes the index lock (so no ingest is half-done), catches up one last
   time, and moves the alias in one atomic call once the version holds exactly the
   corpus. The old version becomes ``standby``.

``catchup.sync_version`` is the one catch-up: backfill, catch-up, the final pass and
rollback all make a version hold exactly the corpus through it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe._files import make_dir, write_json
from embedpipe.backends import build_embedder
from embedpipe.catchup import SyncStats, stale_ids, sync_version, write_documents
from embedpipe.corpus import CorpusStore
from embedpipe.errors import FingerprintMismatch, MigrationError, NothingToMigrate
from embedpipe.index import IndexVersions, Version, check_fingerprint
from embedpipe.layout import Layout
from embedpipe.locks import index_lock
from embedpipe.profiles import Profile, fingerprint
from embedpipe.vectors import VectorStore

if TYPE_CHECKING:
    from embedpipe.execution import EmbedAhead
    from embedpipe.backends import EmbedBatch, Embedder
    from embedpipe.config import Settings
    from embedpipe.validation import ValidationReport

__all__ = [
    "Migration",
    "MigrationPlan",
    "SyncStats",
    "plan_migration",
    "retire",
    "rollback",
    "sync_version",
]

Progress = Callable[[int], None]
ProgressFactory = Callable[[int], Progress]

# How long a cutover or rollback waits for a running ingest to release the index.
CUTOVER_WAIT_S = 600.0
IN_PROGRESS = ("building", "validating")


class LazyEmbedder:
    """An embedder built only when something must really be embedded.

    A rollback whose vectors are all stored needs no model at all, so it still works
    when the old model is gone. When it is built, its fingerprint must be the
    recorded one: a rollback never writes vectors of another space.
    """

    def __init__(self, profile: Profile, settings: Settings, recorded: Version) -> None:
        self.profile = profile
        self.settings = settings
        self.recorded = recorded
        self._real: Embedder | None = None

    @property
    def fingerprint(self) -> str:
        return self.recorded.fingerprint

    @property
    def concurrency(self) -> int:
        return self.profile.limits.concurrency if self.profile.is_hosted else 1

    def real(self) -> Embedder:
        if self._real is None:
            embedder = build_embedder(self.profile, self.settings)
            check_fingerprint(self.recorded, embedder.fingerprint, self.profile.name)
            embedder.check()
            self._real = embedder
        return self._real

    def check(self) -> None:
        self.real()

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        return self.real().embed_documents(texts)

    def embed_query(self, text: str) -> np.ndarray:
        return self.real().embed_query(text)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.real().embed_queries(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.real().count_tokens(texts)

    @property
    def max_tokens(self) -> int | None:
        return self.real().max_tokens

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self.real().token_spans(text)


# --- where migrations keep their files ---------------------------------------------


def migrations_dir(settings: Settings, index: str) -> Path:
    """``<data>/migrations/<index>/``: state, validation reports and final reports."""
    return make_dir(Layout(settings.data_dir).migrations(index))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- plan ------------------------------------------------------------------------------


@dataclass
class MigrationPlan:
    """What a migration will do and cost; all that ``--dry-run`` prints."""

    index: str
    from_profile: str
    from_collection: str
    to_profile: str
    to_fingerprint: str
    documents: int  # live corpus documents
    to_embed: int  # distinct texts with no stored vector for the target
    reusable: int  # distinct texts whose target vector is already stored
    already_written: int  # documents a resumed version already holds
    resume_collection: str | None
    tokens: int | None  # of the texts to embed, by the target's tokenizer
    tokens_exact: bool  # exact as the hosted API bills (tiktoken); local: the model's tokenizer
    over_limit: int  # texts longer than the target's max_tokens (truncated or chunked)
    estimated_usd: float | None
    estimated_seconds: float | None
    probe_docs_per_s: float | None
    probe_embedded: int  # texts the probe embedded
    storage_bytes: dict[str, int]
    deprecation: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    probe_kept: int = 0  # probe vectors stored for the build once the user said yes
    # Whether the live model still embeds queries, and the adapter standing in
    # (``adapters.live_model_state``): the CLI offers an adapter first when it cannot.
    from_model: dict[str, Any] = field(default_factory=dict)
    # Through the Batch API (``--batch``, OpenAI-protocol targets): the same tokens at the
    # batch price, and the longest the provider may take (its completion window).
    estimated_usd_batch: float | None = None
    batch_window_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keep_probe(self, settings: Settings) -> int:
        """Store the probe's vectors (held in memory until now) so the build reuses them
        instead of embedding those texts again. Call once the migration goes ahead."""
        probe = getattr(self, "_probe", None)
        if not probe or not probe[0]:
            return 0
        hashes, vectors = probe
        profile = settings.profile(self.to_profile)
        VectorStore(settings.data_dir, self.to_fingerprint, profile.dims, profile.name).add(hashes, vectors)
        self.probe_kept = len(hashes)
        return self.probe_kept


def window_seconds(window: str) -> float | None:
    """``"24h"`` -> 86400.0: a Batch API completion window in seconds (None if unreadable)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = window[:-1], window[-1:]
    try:
        return float(number) * units[unit]
    except (ValueError, KeyError):
        return None


def _deprecation(profile: Profile | None) -> dict[str, Any]:
    if profile is None:
        return {"status": "unknown profile", "shutdown": None, "replacement": None}
    dep = profile.deprecation
    return {
        "status": dep.status(),
        "shutdown": dep.shutdown.isoformat() if dep.shutdown else None,
        "replacement": dep.replacement,
    }


def plan_migration(
    settings: Settings, index: str, to: str, dry_run: bool = False, probe: bool | None = None
) -> MigrationPlan:
    """Plan moving ``index`` to profile ``to``; writes nothing to the index.

    The plan times the target on a sample of the texts (``probe``): a local model is
    loaded, a hosted endpoint is sent (and bills) up to ``migration.probe_size`` texts.
    ``dry_run`` sends nothing billable unless ``probe=True`` asks for it, and does not
    repair recorded states either: it only reads.
    """
    m = Migration(settings, index, to, dry_run=dry_run)
    if probe is None:
        probe = not (dry_run and m.profile.is_hosted)
    return m.plan(probe=probe)


# --- the migration -----------------------------------------------------------------


@dataclass
class MigrationReport:
    """The result of a migration, as ``--json`` prints it and the flow returns it."""

    status: str  # live | failed | validation_failed | nothing_to_do
    index: str
    from_profile: str
    to_profile: str
    from_collection: str
    collection: str
    documents: int = 0
    embedded: int = 0  # texts sent to a model while building (backfill and catch-up)
    reused: int = 0  # vectors taken from the vector store
    truncated: int = 0
    chunked: int = 0
    caught_up: dict[str, int] = field(default_factory=lambda: {"written": 0, "deleted": 0})
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: bool = False
    forced: bool = False
    validation: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    seconds: float = 0.0
    report_file: str | None = None
    # Query adapters from the new space into older versions, retired by the cutover.
    adapters_retired: list[str] = field(default_factory=list)
    # Where the backfill was embedded (``execution.PreEmbedStats``); None: in process.
    executor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Migration:
    """One migration of one index to one profile: the state its steps share.

    Build it, then call ``prepare``, ``backfill`` (once per slice of ``todo``),
    ``catch_up``, ``validate`` and ``cutover`` in that order, or let the Prefect flow
    do so. Every step can be re-run: a new ``Migration`` over the same arguments
    resumes where a killed one stopped.
    """

    def __init__(
        self, settings: Settings, index: str, to: str, force: bool = False, dry_run: bool = False
    ) -> None:
        self.settings = settings
        self.index = index
        self.force = force
        self.dry_run = dry_run
        self.versions = IndexVersions.open(settings)
        self.corpus = CorpusStore.for_index(settings.data_dir, index)
        if not dry_run:  # the alias decides what is live; a dry run only reads
            self.versions.repair_states(index)  # a crash right after an earlier alias move
        self.source = self.versions.require_live(index)
        self.profile = settings.profile(to)
        self.fingerprint = fingerprint(self.profile)
        # New versions chunk as the config says now (a change of chunking alone is a
        # migration too: the same model, re-chunked).
        self.chunking = settings.index_chunking(index)
        self.target: Version | None = None
        self.started = time.perf_counter()
        self.stats = SyncStats()
        self.caught_up = SyncStats()
        self.written = 0  # points upserted by this run so far (the progress record)
        self.progress: ProgressFactory | None = None
        self.resumed = False
        self.adapters_retired: list[str] = []  # by the cutover (see adapters.retire_superseded)
        self.executor: dict[str, Any] | None = None  # what a pre-embed on Ray did
        # content hash -> reason, for texts the Batch API could not embed (``--batch``)
        self.unembeddable: dict[str, str] = {}
        self._store: VectorStore | None = None
        self.pre_embedded = 0  # vectors it stored (the build then finds them stored)
        self._embedder: Embedder | None = None
        self._check_target()

    # -- checks and shared pieces -------------------------------------------------------

    def _check_target(self) -> None:
        if self.fingerprint == self.source.fingerprint and self.chunking == self.source.chunking:
            raise NothingToMigrate(
                f"index {self.index!r} is already live on {self.profile.name!r} "
                f"({self.source.collection}) with chunking {self.chunking or 'off'}; nothing to migrate"
            )
        state = self.profile.deprecation.status()
        if state == "retired" and not self.force:
            fix = self.profile.deprecation.replacement or "another profile"
            raise MigrationError(
                f"profile {self.profile.name!r} was retired by its provider; migrate to "
                f"{fix} instead (or pass --force)"
            )

    @property
    def embedder(self) -> Embedder:
        """The target's embedder, checked (model loaded, endpoint probed) on first use."""
        if self._embedder is None:
            embedder = build_embedder(self.profile, self.settings)
            embedder.check()
            self._embedder = embedder
        return self._embedder

    def store(self, create: bool = True) -> VectorStore | None:
        """The target's vector store: one object for the run, so what a background
        executor (``embed_ahead``) adds is what the backfill finds (a store reads its
        hash index once)."""
        if not create:
            return VectorStore.existing(self.settings.data_dir, self.fingerprint, self.profile.dims)
        if self._store is None:
            self._store = VectorStore(self.settings.data_dir, self.fingerprint, self.profile.dims,
                                      self.profile.name)
        return self._store

    @property
    def folder(self) -> Path:
        return migrations_dir(self.settings, self.index)

    def _resumable(self) -> Version | None:
        """A version of the target's space to build on: one an interrupted migration left,
        else a standby (e.g. the one a rollback left), which then only needs catching up."""
        mine = [v for v in reversed(self.versions.versions(self.index))
                if v.fingerprint == self.fingerprint and v.chunking == self.chunking]
        for state in (*IN_PROGRESS, "standby"):
            for version in mine:
                if version.state == state:
                    return version
        return None

    def save_state(self, phase: str, **extra: Any) -> None:
        """The progress record (``embedpipe status`` and people read it; resuming reads the
        collection itself)."""
        write_json(self.folder / "state.json", {
            "index": self.index,
            "from_collection": self.source.collection,
            "to_profile": self.profile.name,
            "collection": self.target.collection if self.target else None,
            "phase": phase,
            "written": self.written,
            "updated_at": _now(),
            **extra,
        })

    # -- plan -----------------------------------------------------------------------------

    def plan(self, probe: bool = True) -> MigrationPlan:
        """Documents, tokens, cost, time, storage, reusable vectors and deprecation.

        Tokens are counted offline; ``probe`` also times the target on a sample (for a
        hosted model: requests that are billed)."""
        known = self.corpus.known()
        resume = self._resumable()
        held = self.versions.contents(resume.collection) if resume else {}
        already = sum(1 for i, k in known.items() if held.get(i) == k.record_hash)
        store = self.store(create=False)
        hashes = {k.content_hash for k in known.values()}
        stored = store.present(hashes) if store is not None else set()
        todo = hashes - stored
        texts, text_bytes, meta_bytes = self._texts_of(todo)
        tokens, over = self._count_tokens(texts)
        rate, probed, kept = self._probe(texts) if probe and texts else (None, 0, ([], None))
        usd = self.profile.usd(tokens)
        if not self.profile.is_hosted:
            usd = 0.0
        dims_bytes = self.profile.dims * 4
        payload = (text_bytes if self.settings.index_store_text(self.index) else 0) + meta_bytes
        source_profile = self.settings.profiles.get(self.source.profile)
        plan = MigrationPlan(
            index=self.index,
            from_profile=self.source.profile,
            from_collection=self.source.collection,
            to_profile=self.profile.name,
            to_fingerprint=self.fingerprint,
            documents=len(known),
            to_embed=len(todo),
            reusable=len(stored),
            already_written=already,
            resume_collection=resume.collection if resume else None,
            tokens=tokens,
            tokens_exact=self.profile.is_hosted,
            over_limit=over,
            estimated_usd=usd,
            estimated_seconds=self._estimate_seconds(len(todo), tokens, rate),
            probe_docs_per_s=round(rate, 2) if rate else None,
            probe_embedded=probed,
            storage_bytes={
                "qdrant": len(known) * (dims_bytes + 160) + payload,
                "vector_store": len(todo) * dims_bytes,
            },
            deprecation={"from": _deprecation(source_profile), "to": _deprecation(self.profile)},
        )
        if self.profile.provider == "openai":
            plan.estimated_usd_batch = self.profile.usd(tokens, batch=True) if self.profile.is_hosted else 0.0
            plan.batch_window_s = window_seconds(self.profile.batch.completion_window)
        from embedpipe.adapters import live_model_state

        plan.from_model = live_model_state(self.settings, self.source, probe=not self.dry_run)
        plan.warnings = self._plan_warnings(plan)
        if not probe and texts and self.profile.is_hosted:
            plan.warnings.append(
                "not probed: the time is estimated from tokens_per_minute alone; --probe "
                f"measures it by sending up to {self.settings.migration.probe_size} texts (billed)")
        plan._probe = kept  # type: ignore[attr-defined]  # in memory only; see keep_probe
        return plan

    def _texts_of(self, hashes: set[str]) -> tuple[list[str], int, int]:
        """One text per hash to embed, and the bytes of all texts and metadata (storage)."""
        texts: dict[str, str] = {}
        text_bytes = meta_bytes = 0
        for batch in self.corpus.iter_batches(columns=["text", "content_hash", "metadata"]):
            for text, h, meta in zip(batch.column("text").to_pylist(),
                                     batch.column("content_hash").to_pylist(),
                                     batch.column("metadata").to_pylist()):
                text_bytes += len(text.encode("utf-8"))
                meta_bytes += len(meta or "")
                if h in hashes and h not in texts:
                    texts[h] = text
        return list(texts.values()), text_bytes, meta_bytes

    def _count_tokens(self, texts: list[str]) -> tuple[int, int]:
        if not texts:
            return 0, 0
        # Counting needs the tokenizer only: no check request to a hosted endpoint.
        counter = self._embedder or build_embedder(self.profile, self.settings)
        counts: list[int] = []
        for start in range(0, len(texts), 4096):
            counts.extend(counter.count_tokens(texts[start:start + 4096]))
        limit = self.profile.max_tokens
        return sum(counts), sum(1 for c in counts if limit and c > limit)

    def _probe(self, texts: list[str]) -> tuple[float, int, tuple[list[str], np.ndarray]]:
        """docs/s of the target on a sample of the texts to embed, and the sample's vectors
        (kept in memory: a plan writes nothing, the user may still say no)."""
        rng = random.Random(self.index)  # the same corpus probes the same texts
        sample = rng.sample(texts, min(len(texts), self.settings.migration.probe_size))
        embedder = self.embedder
        if not self.profile.is_hosted:
            embedder.embed_documents(sample[:2])  # warm-up: first-call costs are not throughput
        start = time.perf_counter()
        batch = embedder.embed_documents(sample)
        seconds = max(time.perf_counter() - start, 1e-6)
        from embedpipe.corpus import content_hash

        ok = [i for i in range(len(sample)) if i not in batch.failed]
        kept = ([content_hash(sample[i]) for i in ok], batch.vectors[ok])
        return len(ok) / seconds, len(sample), kept

    def _estimate_seconds(self, n: int, tokens: int | None, rate: float | None) -> float | None:
        if n == 0:
            return 0.0
        limits = self.profile.limits
        if not rate:  # not probed: a hosted model's rate limit still bounds the time
            if self.profile.is_hosted and tokens and limits.tokens_per_minute:
                return round(tokens / limits.tokens_per_minute * 60, 1)
            return None
        seconds = n / (rate * (limits.concurrency if self.profile.is_hosted else 1))
        if self.profile.is_hosted and tokens and limits.tokens_per_minute:
            seconds = max(seconds, tokens / limits.tokens_per_minute * 60)
        return round(seconds, 1)

    def _plan_warnings(self, plan: MigrationPlan) -> list[str]:
        out = []
        to = plan.deprecation["to"]
        if to["status"] != "active":
            out.append(f"target profile {plan.to_profile!r} is {to['status']}"
                       + (f"; consider {to['replacement']}" if to["replacement"] else ""))
        frm = plan.deprecation["from"]
        if frm["status"] != "active":
            out.append(f"source profile {plan.from_profile!r} is {frm['status']}: the old version "
                       "may not be able to embed queries for validation")
        gone = plan.from_model
        if gone and not gone["can_query"]:
            a = gone.get("adapter")
            out.append(f"the live model cannot embed queries ({gone['reason']}): " + (
                f"searches go through adapter {a['id']} ({a['profile']}) until this migration goes live"
                if a else f"searches of {plan.index!r} fail until this migration goes live, unless "
                f"`embedpipe adapt --index {plan.index} --to {plan.to_profile}` fits a query adapter first"))
        if plan.over_limit:
            how = "chunked" if self.profile.is_hosted and self.profile.long_inputs == "chunk" else (
                "rejected" if self.profile.is_hosted else "truncated")
            out.append(f"{plan.over_limit} texts exceed {plan.to_profile}'s {self.profile.max_tokens}-token "
                       f"limit and will be {how}")
        return out

    # -- build --------------------------------------------------------------------------------

    def prepare(self) -> Version:
        """Check the target model, then create version N+1 (``building``) or resume one."""
        self.embedder  # noqa: B018 - a bad model fails here, before any collection exists
        resume = self._resumable()
        if resume is not None:
            self.target = self.versions.set_state(resume, "building")
            self.resumed = True
        else:
            self.target = self.versions.create_version(self.index, self.profile, self.fingerprint,
                                                       self.chunking)
        self.save_state("building")
        return self.target

    def _require_target(self) -> Version:
        if self.target is None:
            raise MigrationError("call prepare() before building the new version")
        return self.target

    def todo(self) -> list[str]:
        """Corpus ids the new version lacks or holds stale: the backfill's work, after resume."""
        stale, gone = stale_ids(self.versions, self.corpus, self._require_target())
        if gone:
            self.versions.delete_documents(self.target.collection, gone)  # type: ignore[union-attr]
        return stale

    def slices(self, ids: Sequence[str]) -> list[list[str]]:
        """The backfill's batches of work (one Prefect task each)."""
        size = self.settings.migration.slice_size
        return [list(ids[i:i + size]) for i in range(0, len(ids), size)]

    def backfill(self, ids: Sequence[str], progress: Progress | None = None,
                 ahead: EmbedAhead | None = None, number: int = 0) -> SyncStats:
        """Embed and write one slice of documents into the new version. With ``ahead``
        (from :meth:`embed_ahead`, slice ``number`` of its slices) the slice's works wait
        for the cluster's vectors instead of being embedded here."""
        target = self._require_target()
        gate = functools.partial(ahead.gate, number) if ahead is not None else None
        embedder = ahead.write_embedder(self.embedder) if ahead is not None else self.embedder
        stats = write_documents(
            self.versions, self.corpus, target, ids, embedder, self.store(), self.settings,
            progress=progress, on_batch=self._upserted, gate=gate,
        )
        self.stats.add(stats)
        return stats

    @contextlib.contextmanager
    def embed_ahead(self, slices: Sequence[Sequence[str]], executor: str,
                    progress: ProgressFactory | None = None, resubmit: bool = True) -> Iterator[EmbedAhead]:
        """Embed the backfill of ``slices`` on ``executor`` ("ray": a Ray cluster;
        "batch": the provider's Batch API) in the background, committed to the vector
        store as it comes, while the caller backfills slice after slice with ``ahead=``:
        the embedding and the engine writes overlap. A no-op for "local". Resumable: a
        re-run embeds only what the store lacks, and a batch run polls the batches its
        state file names instead of submitting them again."""
        from embedpipe.execution import EmbedAhead, migration_streams

        self._require_target()
        state = Layout(self.settings.data_dir).batch_state(self.index, self.fingerprint)
        ahead = EmbedAhead(self.settings, self.profile, self.fingerprint,
                           migration_streams(self, slices), self.store(), executor, progress,
                           batch_state=state, resubmit=resubmit)
        with ahead:
            yield ahead
        self.unembeddable.update(ahead.failed)  # the catch-up does not send them again
        if executor != "local":
            self.pre_embedded += ahead.stats.embedded
            self.executor = ahead.stats.to_dict()

    def pre_embed(self, ids: Sequence[str], executor: str,
                  progress: ProgressFactory | None = None) -> dict[str, Any]:
        """Embed what the backfill of ``ids`` needs on ``executor`` into the vector store
        and return when it is stored (:meth:`embed_ahead` without the overlap); the
        backfill then reuses the vectors."""
        with self.embed_ahead([ids], executor, progress) as ahead:
            ahead.wait()
        return dict(self.executor or {})

    def _upserted(self, n: int) -> None:
        """After each acknowledged upsert: advance the progress record."""
        self.written += n
        self.save_state("building")

    def catch_up(self, passes: int = 3) -> SyncStats:
        """Bring in what was ingested, changed or deleted since the backfill read the
        corpus; repeats while ingests keep changing it (the cutover does a last pass
        under the index lock)."""
        target = self._require_target()
        total = SyncStats()
        embedder = self._catch_up_embedder()
        for _ in range(passes):
            stats = sync_version(self.versions, self.corpus, target, embedder, self.store(),
                                 self.settings, progress=self.progress)
            total.add(stats)
            if not (stats.written or stats.deleted):
                break
        self._count_catch_up(total)
        self.save_state("caught_up")
        return total

    def _catch_up_embedder(self) -> Embedder:
        """The embedder of the catch-up passes: the target's, except that a text the
        Batch API could not embed in this run is reported, not sent at the full price."""
        if not self.unembeddable:
            return self.embedder
        from embedpipe.execution.batch_embed import BatchOnly

        return BatchOnly(self.embedder, self.unembeddable, others_to_inner=True)  # type: ignore[return-value]

    def _count_catch_up(self, stats: SyncStats) -> None:
        self.caught_up.add(stats)
        self.stats.embedded += stats.embedded
        self.stats.reused += stats.reused
        self.stats.truncated += stats.truncated
        self.stats.chunked += stats.chunked
        self.stats.failures.update(stats.failures)

    def validate(self, golden: Path | None = None, tolerance: float | None = None) -> ValidationReport:
        """Run the validation gate; the report is saved whatever the outcome."""
        from embedpipe.validation import validate

        # The backfill (and catch-up) ended: build the search index once, and validate
        # the version as it will serve.
        self.save_state("indexing")
        self.versions.build_index(self._require_target().collection)
        target = self.versions.set_state(self._require_target(), "validating")
        self.target = target
        self.save_state("validating")
        report = validate(
            self.settings, self.versions, self.corpus, old=self.source, new=target,
            new_embedder=self.embedder, golden=golden, tolerance=tolerance, force=self.force,
        )
        path = write_json(self.folder / f"{target.collection}.validation.json", report.to_dict())
        report.path = str(path)
        return report

    def cutover(self, report: ValidationReport) -> SyncStats:
        """Last catch-up under the index lock, then the one atomic alias move."""
        from embedpipe.errors import ValidationFailed

        target = self._require_target()
        if not report.passed:
            self.save_state("validation_failed")
            raise ValidationFailed(
                f"{target.collection} failed validation ({report.summary()}); the alias still "
                f"points at {self.source.collection}. See {report.path}; re-run with --force to "
                "cut over anyway"
            )
        with index_lock(self.settings, self.index, timeout=CUTOVER_WAIT_S):
            stats = sync_version(self.versions, self.corpus, target, self._catch_up_embedder(),
                                 self.store(), self.settings)
            self._count_catch_up(stats)
            # A document that failed once and was written by a later pass is no failure.
            self.stats.failures = dict(stats.failures)
            if stats.failures:
                first = next(iter(sorted(stats.failures.items())))
                raise MigrationError(
                    f"{len(stats.failures)} documents could not be embedded with "
                    f"{self.profile.name!r} (first: {first[0]}: {first[1]}); the alias was not "
                    "moved. The report lists them all; fix them or the profile and re-run"
                )
            self.versions.go_live(self.index, target, self.corpus.ids())
        from embedpipe.adapters import retire_superseded

        live = self.versions.require_live(self.index)
        self.adapters_retired = [a.id for a in retire_superseded(
            self.settings, self.index, live, self.versions.versions(self.index))]
        self.save_state("live")
        return stats

    def report(self, status: str, validation: ValidationReport | None = None,
               plan: dict[str, Any] | None = None) -> MigrationReport:
        """The migration's report, written to ``<data>/migrations/<index>/``."""
        target = self.target
        # Probe vectors the plan kept were embedded by this run; the build found them stored.
        # So were the vectors a pre-embed (Ray) stored for it.
        kept = min(int((plan or {}).get("probe_kept", 0)) + self.pre_embedded, self.stats.reused)
        report = MigrationReport(
            status=status,
            index=self.index,
            from_profile=self.source.profile,
            to_profile=self.profile.name,
            from_collection=self.source.collection,
            collection=target.collection if target else "",
            documents=self.corpus.count(),
            embedded=self.stats.embedded + kept,
            reused=self.stats.reused - kept,
            truncated=self.stats.truncated,
            chunked=self.stats.chunked,
            caught_up={"written": self.caught_up.written, "deleted": self.caught_up.deleted},
            failed=len(self.stats.failures),
            failures=[{"id": i, "reason": r} for i, r in sorted(self.stats.failures.items())],
            resumed=self.resumed,
            forced=bool(validation and validation.forced),
            validation=validation.to_dict() if validation else None,
            plan=plan,
            seconds=round(time.perf_counter() - self.started, 3),
            adapters_retired=list(self.adapters_retired),
            executor=self.executor,
        )
        if target is not None:
            path = self.folder / f"{target.collection}.report.json"
            report.report_file = str(path)
            write_json(path, report.to_dict())
        return report


@contextlib.contextmanager
def migration_lock(settings: Settings, index: str) -> Iterator[None]:
    """One migration, rollback or retire per index at a time (ingests may go on)."""
    with index_lock(settings, index, timeout=0, what="migrate"):
        yield


# --- rollback and retire ---------------------------------------------------------------


def rollback(
    settings: Settings, index: str, progress: ProgressFactory | None = None, force: bool = False
) -> dict[str, Any]:
    """Point the alias back at the standby version, atomically.

    The standby first catches up with the corpus (documents ingested since the cutover
    went only to the live version). Stored vectors make that free for anything a
    version of the same fingerprint ever embedded; the old model embeds documents only
    if a text truly needs it. Unless ``force``, one query is embedded first: rolling back
    to a model that can no longer embed queries would break every search.
    """
    from embedpipe.status import deprecation_warning

    with migration_lock(settings, index):
        versions = IndexVersions.open(settings)
        versions.repair_states(index)
        live = versions.require_live(index)
        standby = _standby(versions, index, live)
        profile = settings.profile(standby.profile)
        embedder = LazyEmbedder(profile, settings, standby)
        if not force:
            _check_queries(settings, embedder, standby)
        store = VectorStore(settings.data_dir, standby.fingerprint, standby.dims, profile.name)
        corpus = CorpusStore.for_index(settings.data_dir, index)
        started = time.perf_counter()
        with index_lock(settings, index, timeout=CUTOVER_WAIT_S):
            try:
                stats = sync_version(versions, corpus, standby, embedder, store, settings, progress)
            except FingerprintMismatch as exc:
                raise MigrationError(f"cannot catch {standby.collection} up: {exc}") from None
            if stats.failures:
                raise MigrationError(
                    f"{len(stats.failures)} documents could not be embedded for "
                    f"{standby.collection}; the alias was not moved"
                )
            versions.go_live(index, standby, corpus.ids())
        from embedpipe.adapters import reinstate

        reinstated = reinstate(settings, standby)
        warning = deprecation_warning(profile, index)
        return {
            "index": index,
            "from_collection": live.collection,
            "collection": standby.collection,
            "profile": standby.profile,
            "written": stats.written,
            "deleted": stats.deleted,
            "embedded": stats.embedded,
            "reused": stats.reused,
            "seconds": round(time.perf_counter() - started, 3),
            "warnings": [warning] if warning else [],
            "adapter_reinstated": reinstated.id if reinstated else None,
        }


def _check_queries(settings: Settings, embedder: LazyEmbedder, standby: Version) -> None:
    """Refuse to roll back to a version no query can reach: its model cannot embed and
    it has no adapter that would stand in."""
    from embedpipe.adapters import adapters_of
    from embedpipe.errors import EmbedpipeError

    try:
        embedder.embed_query("rollback probe")
    except EmbedpipeError as exc:
        if any(a.state in ("accepted", "retired") and a.target_fingerprint == standby.fingerprint
               for a in adapters_of(settings, standby)):
            return  # its adapter serves the searches (reinstated after the alias moves)
        raise MigrationError(
            f"{standby.collection} cannot serve searches: {str(exc).splitlines()[0]}. The alias "
            "was not moved; pass --force to roll back anyway"
        ) from None


def _standby(versions: IndexVersions, index: str, live: Version) -> Version:
    """The version the last cutover replaced; failing that, the newest standby of another
    embedding space (a standby of the live space would roll back nothing)."""
    candidates = [v for v in versions.versions(index)
                  if v.state == "standby" and v.collection != live.collection]
    for v in candidates:
        if v.collection == live.previous:
            return v
    other = [v for v in candidates if v.fingerprint != live.fingerprint]
    if not other:
        raise MigrationError(
            f"index {index!r} has no standby version to roll back to "
            "(`embedpipe status` lists its versions)"
        )
    return other[-1]


def retire(
    settings: Settings, index: str, keep: int = 1, dry_run: bool = False, abandon: bool = False
) -> dict[str, Any]:
    """Delete the index's versions beyond the ``keep`` newest non-live ones. Never the live
    one, nor, unless ``abandon``, an unfinished version a migration may resume. Stored
    vectors are kept: a later migration back costs no embeddings."""
    if keep < 0:
        from embedpipe.errors import InputError

        raise InputError(f"--keep {keep}: keep 0 or more old versions")
    with migration_lock(settings, index):
        versions = IndexVersions.open(settings)
        versions.repair_states(index)
        live = versions.require_live(index)
        every = versions.versions(index)
        unfinished = [v for v in every if v.state in IN_PROGRESS]
        # ``keep`` is spent on the newest standby versions (rollback targets) only.
        finished = [v for v in every if v.collection != live.collection and v not in unfinished]
        doomed = sorted(finished, key=lambda v: v.version, reverse=True)[keep:]
        if abandon:
            doomed += unfinished
        if not dry_run:
            from embedpipe.adapters import remove_adapters

            for version in doomed:
                versions.drop(version)
                remove_adapters(settings, index, version.collection)
        kept = [v for v in every if v.collection != live.collection and v not in doomed]
        return {
            "index": index,
            "live": live.collection,
            "deleted": [v.collection for v in sorted(doomed, key=lambda v: v.version)],
            "kept": [v.collection for v in kept],
            "dry_run": dry_run,
            "removed_local_mode": _remove_local_mode(settings, dry_run),
        }


def _remove_local_mode(settings: Settings, dry_run: bool) -> str | None:
    """The qdrant-client local-mode folder of an earlier release, once converted to the
    engine (``rebuild.convert_local_mode``): removed by retire. Returns its path."""
    import shutil

    from embedpipe.layout import Layout
    from embedpipe.rebuild import CONVERTED

    folder = settings.qdrant_path
    if settings.qdrant.url or not (Layout(settings.data_dir).engine / CONVERTED).is_file():
        return None
    if not (folder / "meta.json").is_file():
        return None
    if not dry_run:
        from embedpipe.qdrant import close_all

        close_all()  # a client a test or tool opened on it
        shutil.rmtree(folder)
    return str(folder)
