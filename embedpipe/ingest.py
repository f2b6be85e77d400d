"""Ingest: validate input, diff it against the corpus, embed what changed, commit.

The order of steps is what keeps the invariants:

1. the whole input is read and validated into a staged (invisible) segment; any
   bad record raises before anything is written, so corpus and index stay as they were;
2. staged rows are diffed against the corpus by hash: unchanged ones are skipped;
3. changed rows are embedded (reusing stored vectors) and upserted; a document the
   model could not embed (a hosted request out of retries, an over-long text under
   ``long_inputs = "reject"``) is not written and is reported with its reason;
4. only then are the embedded rows committed as a corpus segment. A crash before
   that leaves the corpus untouched, and the re-run redoes idempotent work
   (deterministic point ids, vectors already in the vector store); failed documents
   stay out of the corpus, so the next run retries them. Writes into a live version
   are journaled (``pending/<index>.json``) until the corpus has them: the next run
   repairs what a crash left, and ``settle`` does it without a run (``embedpipe serve``
   settles every index when it starts, so a batch cut by kill -9 is whole or absent).

A new index is built as version 1 in state ``building`` and the alias points at
it only once it holds every document.

With ``executor="ray"`` (``--executor ray``, or ``[execution] engine``), step 3 is
preceded by a pre-embed on a Ray cluster (``embedpipe.execution``): the texts of the
points step 3 will write that the vector store lacks are embedded there and committed
to the store partition by partition; step 3 then reuses them. A killed run's re-run
embeds only what no committed partition holds. A hosted profile stays here (one note).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from embedpipe.backends import build_embedder
from embedpipe._files import write_json
from embedpipe._segments import read_batches
from embedpipe.chunking import Chunker, ChunkSpec, chunker_for, works_for_row
from embedpipe.config import Settings
from embedpipe.corpus import CorpusStore, Document, Known, documents_to_batch
from embedpipe.errors import ConfigError, EmbedpipeError, IndexBusy, InputError
from embedpipe.execution import EmbedAhead, PreEmbedStats, resolve_executor
from embedpipe.index import Holding, IndexVersions, Version, check_fingerprint, point_id
from embedpipe.layout import Layout, check_index_name
from embedpipe.locks import index_lock, migration_running
from embedpipe.pipeline import PipelineStats, Work, embed_and_write
from embedpipe.sources import FileError, SourceSpec, read_documents
from embedpipe.vectors import VectorStore

__all__ = ["IngestReport", "delete", "ingest", "ingest_documents", "settle", "unsettled"]

ProgressFactory = Callable[[int], Callable[[int], None]]
log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    index: str
    collection: str
    profile: str
    fingerprint: str
    documents: int  # documents in the input
    added: int
    updated: int
    unchanged: int
    failed: int
    embedded: int  # texts actually sent to a model
    reused: int  # vectors taken from the vector store
    truncated: int  # texts cut at the model's input limit (local models)
    created_version: bool
    seconds: float
    tokens_embedded: int | None = None  # tokens the model processed (None: not counted)
    dry_run: bool = False
    chunked: int = 0  # long texts embedded in pieces and averaged (hosted models)
    tokens: int | None = None  # dry run, hosted profiles: exact tokens that would be sent
    estimated_usd: float | None = None  # dry run: those tokens at the profile's price
    estimated_usd_batch: float | None = None  # dry run: the same through the Batch API (--batch)
    # Documents not indexed: {"id", "reason"}; an invalid record skipped by --skip-invalid
    # also has its "path" and "line" (its id is None when the line could not be parsed).
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Symbolic links left out by rule (follow_symlinks): {"path", "reason"}; not failures.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Documents also written into a version a running migration builds: collection -> count.
    migration_writes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # What a pre-embed on Ray did (``PreEmbedStats``); None when the executor was local.
    executor: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(
    settings: Settings,
    index: str,
    path: Path,
    profile: str | None = None,
    progress: ProgressFactory | None = None,
    dry_run: bool = False,
    skip_invalid: bool | None = None,
    executor: str | None = None,
    resubmit: bool = True,
) -> IngestReport:
    """Ingest documents from ``path`` into ``index``; see the module docstring.

    ``executor`` ("local", "ray" or "batch"; default ``[execution] engine``) says where
    the texts that need vectors are embedded; ``resubmit`` (batch): texts of failed,
    expired or cancelled batches are submitted again, else reported failed.

    With ``dry_run`` the input is validated and diffed and the report says what would be
    added, updated and embedded; no model is loaded and nothing is written.

    An invalid record (empty text, a malformed line, a duplicate id, non-finite
    metadata) refuses the whole input, unless ``skip_invalid`` (default: the index's
    ``on_invalid = "skip"``): then it is reported as failed, with its file, line and
    reason, and the rest is ingested.
    """
    check_index_name(index)
    started = time.perf_counter()
    corpus = CorpusStore.for_index(settings.data_dir, index)
    options = settings.index_settings(index)
    spec = SourceSpec(Path(path), follow_symlinks=options.follow_symlinks)
    if skip_invalid is None:
        skip_invalid = options.on_invalid == "skip"
    skipped: list[FileError] = []
    invalid: list[FileError] | None = [] if skip_invalid else None
    documents = read_documents(Path(path), spec, skipped, invalid)
    report = _ingest(settings, index, corpus, documents, profile, progress, dry_run, started, executor,
                     resubmit)
    report.skipped = [{"path": e.path, "reason": e.reason} for e in skipped]
    report.warnings += [f"skipped {e.path}: {e.reason}" for e in skipped]
    if invalid:
        report.failures = [{"id": e.id, "path": e.path, "line": e.line, "reason": e.reason}
                           for e in invalid] + report.failures
        report.failed += len(invalid)
    return report


def ingest_documents(
    settings: Settings,
    index: str,
    documents: Iterable[Document],
    profile: str | None = None,
    progress: ProgressFactory | None = None,
    dry_run: bool = False,
    executor: str | None = None,
) -> IngestReport:
    """Ingest documents a caller already holds (``sources.documents_from_records`` checks
    them as ``ingest`` checks a file's records): the same staging, diffing and
    all-or-nothing write as :func:`ingest`. An iterable that raises part way (a bad
    record) leaves corpus and index as they were."""
    check_index_name(index)
    corpus = CorpusStore.for_index(settings.data_dir, index)
    return _ingest(settings, index, corpus, documents, profile, progress, dry_run, time.perf_counter(),
                   executor)


def _ingest(
    settings: Settings, index: str, corpus: CorpusStore, documents: Iterable[Document],
    profile: str | None, progress: ProgressFactory | None, dry_run: bool, started: float,
    executor: str | None = None, resubmit: bool = True,
) -> IngestReport:
    chosen = resolve_executor(settings, executor)  # an unknown name fails before staging
    if dry_run:
        return _dry_run_staged(settings, index, corpus, documents, profile, started)
    staged = stage(corpus, documents)  # validates before any write
    if staged is None:  # read_documents already refuses an empty input; belt and braces
        raise InputError("the input holds no documents")
    try:
        with index_lock(settings, index):
            return _ingest_staged(settings, index, corpus, staged, profile, progress, started,
                                  executor=chosen, resubmit=resubmit)
    finally:
        staged.unlink(missing_ok=True)


def _dry_run_staged(
    settings: Settings, index: str, corpus: CorpusStore, documents: Iterable[Document],
    profile: str | None, started: float,
) -> IngestReport:
    """A dry run stages into a temporary folder outside the data directory and takes no
    lock: it writes nothing there, so it also works on a read-only data directory."""
    with tempfile.TemporaryDirectory(prefix="embedpipe-dry-run-") as scratch:
        staged = stage(CorpusStore(Path(scratch)), documents)
        if staged is None:
            raise InputError("the input holds no documents")
        return _ingest_staged(settings, index, corpus, staged, profile, None, started, dry_run=True)


def _compact_unless_migrating(settings: Settings, index: str, corpus: CorpusStore) -> None:
    """Compact the corpus, unless a migration (which streams its segments) is running.

    Best effort: the documents are committed by now, so a compaction that fails (a full
    disk: it rewrites the whole corpus) is logged and left to the next ingest."""
    try:
        with index_lock(settings, index, timeout=0, what="migrate"):
            corpus.compact_if_needed()
    except IndexBusy:
        pass  # the next ingest compacts
    except EmbedpipeError as exc:
        log.warning("could not compact the corpus of %r (its documents are committed; the next "
                    "ingest tries again): %s", index, str(exc).splitlines()[0])


def stage(corpus: CorpusStore, documents: Iterable[Document]) -> Path | None:
    """Write documents into a staged segment: closed, invisible to readers, not committed.
    Returns its path, or None when there were no documents."""
    writer = corpus.writer()
    try:
        batch: list[Document] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) >= 4096:
                writer.write(documents_to_batch(batch))
                batch = []
        if batch:
            writer.write(documents_to_batch(batch))
        return writer.finish()  # closed but not committed: invisible to readers
    except BaseException:
        writer.abort()
        raise


def _ingest_staged(
    settings: Settings,
    index: str,
    corpus: CorpusStore,
    staged: Path,
    profile_name: str | None,
    progress: ProgressFactory | None,
    started: float,
    dry_run: bool = False,
    executor: str = "local",
    resubmit: bool = True,
) -> IngestReport:
    versions = IndexVersions.open(settings)
    if not dry_run:
        versions.repair_states(index)
    live = versions.live(index)
    if live is not None:
        if profile_name and profile_name != live.profile:
            raise ConfigError(
                f"index {index!r} is live on profile {live.profile!r}; to move it to "
                f"{profile_name!r} run `embedpipe migrate --to {profile_name} --index {index}`"
            )
        profile = settings.profile(live.profile)
    else:
        profile = settings.profile(profile_name or settings.index_profile(index))
    if executor == "batch":
        from embedpipe.execution.batch_embed import require_batch_profile

        require_batch_profile(profile)  # before anything is created
    embedder = build_embedder(profile, settings)
    fp = embedder.fingerprint
    if dry_run:
        return _dry_run(settings, versions, index, live, profile, fp, corpus, staged, started)
    known = corpus.known()
    counts, changed = _diff(staged, known)
    existing = _existing_target(versions, index, live, fp)
    building = existing is None or existing.state != "live"
    # Documents an interrupted run may have left half-written (see _Journal).
    journal = _Journal(settings, index)
    pending = set() if building else journal.read()
    if not changed and not building and not pending:  # nothing to embed: no model is loaded
        check_fingerprint(existing, fp, profile.name)  # type: ignore[arg-type]
        report = _report(index, existing, profile.name, fp, counts, PipelineStats(), False, started,
                         {}, _chunking_warnings(settings, index, existing))  # type: ignore[arg-type]
        if executor != "local":
            report.executor = PreEmbedStats(executor=executor).to_dict()  # nothing to embed there
        return report
    embedder.check()  # a bad model fails here, before any collection or file is made
    chunking = settings.index_chunking(index)
    spec = ChunkSpec.from_dict(chunking)
    if spec is not None and building:
        Chunker(spec, embedder)  # a chunk size the model cannot take fails before any version exists
    if existing is not None and building and existing.chunking != chunking:
        versions.drop(existing)  # a first build never went live: restart it as configured
        existing = None
    target, created = _target_version(versions, index, live, profile, fp, chunking)
    check_fingerprint(target, fp, profile.name)
    chunker = chunker_for(target, embedder)
    warnings = _chunking_warnings(settings, index, target)
    from_corpus = _repair(versions, index, staged, known, pending, changed, counts, warnings)
    # A version that is not live yet must hold the whole corpus, not just the changes.
    staged_ids = _ids(staged) if building else None
    if staged_ids is not None:
        todo = len(staged_ids) + sum(1 for i in known if i not in staged_ids)
    else:
        todo = len(changed) + len(from_corpus)
        journal.write(changed | from_corpus)
    store = VectorStore(settings.data_dir, fp, profile.dims, profile.name)
    store_text = settings.index_store_text(index)
    # What chunked documents held before, so chunks a rewrite no longer has can go.
    held = _held_before(versions, target, chunker, building, changed | from_corpus)
    written: set[str] = set()

    def write(ids: list[str], vectors: Any, payloads: list[dict[str, Any]]) -> None:
        versions.upsert(target.collection, ids, vectors, payloads)
        if chunker is not None:
            written.update(point_id(i) for i in ids)

    def works() -> Iterator[Work]:
        return _work(staged, changed, staged_ids, corpus, store_text, chunker, from_corpus)

    try:
        # With Ray the cluster embeds ahead of the write path, which waits for each
        # vector instead of embedding it (a no-op in process).
        with EmbedAhead(settings, profile, fp, [works], store, executor, resubmit=resubmit,
                        batch_state=Layout(settings.data_dir).batch_state(index, fp)) as ahead:
            stats = embed_and_write(
                ahead.gate(0, works()), ahead.write_embedder(embedder), write, store, window=settings.window,
                # a chunked document is several points: the bar counts points, total unknown
                progress=progress(None if chunker else todo) if progress else None,  # type: ignore[arg-type]
            )
        pre = ahead.stats if executor != "local" else None
    except BaseException:
        if created and versions.count(target.collection) == 0:
            versions.drop(target)  # nothing reached it: leave no empty version behind
        raise
    # Chunks rewritten documents no longer have go before the corpus moves on: a crash
    # in between leaves the journal, and the next run redoes those documents.
    _drop_leftovers(versions, target, held, written, stats)
    # Documents that failed to embed stay out of the corpus too, so the next run
    # sees them as new (or changed) and tries again; their old points are untouched.
    _commit_corpus(corpus, staged, changed - stats.failures.keys())
    for doc_id in stats.failures.keys() & changed:  # added/updated: what landed
        counts["updated" if doc_id in known else "added"] -= 1
    migration_writes = {} if building else _write_to_migrations(
        settings, versions, corpus, index, target, sorted((changed | from_corpus) - stats.failures.keys()))
    if building:
        corpus_ids = corpus.ids()
        if corpus_ids:
            versions.build_index(target.collection)  # the bulk write ended: once, not per batch
            versions.go_live(index, target, corpus_ids)
        elif created:  # every document failed: leave no empty version behind
            versions.drop(target)
    else:
        versions.refresh_index(target.collection)
    journal.clear()
    _compact_unless_migrating(settings, index, corpus)
    report = _report(index, target, profile.name, fp, counts, stats, created, started, migration_writes,
                     warnings)
    if pre is not None:
        _add_pre_embed(report, pre)
    return report


def _add_pre_embed(report: IngestReport, pre: PreEmbedStats) -> None:
    """Count the vectors the pre-embed stored as embedded by this run (the write path
    found them stored), and say where they were embedded."""
    kept = min(pre.embedded, report.reused)
    report.embedded += kept
    report.reused -= kept
    report.executor = pre.to_dict()
    if pre.note:
        report.warnings.append(pre.note)


def _report(
    index: str, target: Version, profile: str, fp: str, counts: dict[str, int], stats: PipelineStats,
    created: bool, started: float, migration_writes: dict[str, int], warnings: list[str],
) -> IngestReport:
    return IngestReport(
        index=index,
        collection=target.collection,
        profile=profile,
        fingerprint=fp,
        **counts,  # documents, added, updated, unchanged
        failed=len(stats.failures),
        embedded=stats.embedded,
        reused=stats.reused,
        truncated=stats.truncated,
        chunked=stats.chunked,
        created_version=created,
        seconds=round(time.perf_counter() - started, 3),
        tokens_embedded=stats.tokens,
        failures=[{"id": i, "reason": r} for i, r in sorted(stats.failures.items())],
        migration_writes=migration_writes,
        warnings=warnings,
    )


def _held_before(
    versions: IndexVersions, target: Version, chunker: Chunker | None, building: bool, ids: set[str]
) -> dict[str, Holding]:
    """What the documents about to be rewritten hold now (chunked versions only: one point
    per document is simply overwritten)."""
    if chunker is None:
        return {}
    if building:  # everything is rewritten: any point not rewritten is a leftover
        return versions.holdings(target.collection)
    return versions.holdings(target.collection, sorted(ids)) if ids else {}


def _drop_leftovers(
    versions: IndexVersions, target: Version, held: dict[str, Holding], written: set[str],
    stats: PipelineStats,
) -> None:
    """After a chunked write: drop the chunks rewritten documents no longer have (a text
    that got shorter). A document that failed was not written at all and keeps its points."""
    leftovers = [p for doc, h in held.items() if doc not in stats.failures
                 for p in h.points if p not in written]
    versions.delete_points(target.collection, leftovers)


class _Journal:
    """The documents a run is writing into the live version, kept until the corpus has
    them (``<data>/pending/<index>.json``).

    A run killed mid-write can leave a document half-written (some of its chunks new,
    some old) or written but not in the corpus; the corpus alone cannot tell, since it
    only moves on after the writes. The next run reads the journal and rewrites those
    documents, or deletes them from every version when they are gone; ``settle`` does the
    same with the corpus alone.
    """

    def __init__(self, settings: Settings, index: str) -> None:
        self.path = Layout(settings.data_dir).pending(index)

    def read(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return set()
        except ValueError:  # a torn file cannot exist (atomic writes); treat as empty
            return set()

    def write(self, ids: set[str]) -> None:
        write_json(self.path, sorted(ids | self.read()))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def unsettled(settings: Settings) -> list[str]:
    """Indexes whose journal (``pending/<index>.json``) says a write was interrupted, or is
    running now."""
    folder = Layout(settings.data_dir).root / "pending"
    try:
        return sorted(p.stem for p in folder.glob("*.json"))
    except OSError:
        return []


def settle(settings: Settings, index: str) -> str | None:
    """Put the live version of ``index`` back in agreement with its corpus after a write
    was interrupted (its journal lists the documents it was writing): a document the
    corpus never received is deleted from every version, and one the corpus holds is
    rewritten from the corpus (its vector reused from the vector store, so usually no
    model is called). An interrupted batch is thus whole (it reached the corpus) or
    absent (it did not), as the corpus says, without waiting for the next write.

    Returns a one-line account, or None when nothing was pending. A document that could
    not be rewritten (its model failed) stays in the journal, and the next ingest of the
    index retries it; ``EmbedpipeError`` is raised for it.
    """
    check_index_name(index)
    journal = _Journal(settings, index)
    if not journal.path.exists():
        return None
    corpus = CorpusStore.for_index(settings.data_dir, index)
    with index_lock(settings, index):
        pending = journal.read()
        versions = IndexVersions.open(settings)
        versions.repair_states(index)
        live = versions.live(index)
        if not pending or live is None:  # a journal is only kept for a live version
            journal.clear()
            return None
        known = corpus.known()
        gone = sorted(pending - known.keys())
        for version in versions.versions(index) if gone else []:
            versions.delete_documents(version.collection, gone)
        redo = pending & known.keys()
        failures: dict[str, str] = {}
        if redo:
            profile = settings.profile(live.profile)
            embedder = build_embedder(profile, settings)
            check_fingerprint(live, embedder.fingerprint, profile.name)
            chunker = chunker_for(live, embedder)
            store = VectorStore(settings.data_dir, live.fingerprint, profile.dims, profile.name)
            store_text = settings.index_store_text(index)
            held = _held_before(versions, live, chunker, False, redo)
            written: set[str] = set()

            def write(ids: list[str], vectors: Any, payloads: list[dict[str, Any]]) -> None:
                versions.upsert(live.collection, ids, vectors, payloads)
                written.update(point_id(i) for i in ids)

            items = (work for batch in corpus.iter_batches() for row in batch.to_pylist()
                     if row["id"] in redo for work in works_for_row(row, store_text, chunker))
            stats = embed_and_write(items, embedder, write, store, window=settings.window)
            _drop_leftovers(versions, live, held, written, stats)
            failures = stats.failures
        versions.refresh_index(live.collection)
        if failures:
            write_json(journal.path, sorted(failures))
            reason = sorted(failures.items())[0][1]  # no document id: the server logs this
            raise EmbedpipeError(
                f"index {index!r}: {len(failures)} documents an interrupted write left could not be "
                f"rewritten from the corpus ({reason}); the next ingest retries them")
        journal.clear()
    return (f"index {index!r}: an interrupted write left {len(pending)} documents unsettled; "
            f"removed {len(gone)} the corpus never received, rewrote {len(redo)} from the corpus")


def _repair(
    versions: IndexVersions, index: str, staged: Path, known: dict[str, Known], pending: set[str],
    changed: set[str], counts: dict[str, int], warnings: list[str],
) -> set[str]:
    """Documents an interrupted run left behind: those in the input are rewritten from it
    (added to ``changed``), those only in the corpus are rewritten from the corpus (the
    ids returned), and those in neither are deleted from every version."""
    if not pending:
        return set()
    staged_ids = _ids(staged)
    redo = (pending & staged_ids) - changed
    changed |= redo
    counts["unchanged"] -= len(redo & known.keys())
    counts["updated"] += len(redo & known.keys())
    counts["added"] += len(redo - known.keys())
    from_corpus = (pending & known.keys()) - staged_ids
    orphans = sorted(pending - staged_ids - known.keys())
    for version in versions.versions(index) if orphans else []:
        versions.delete_documents(version.collection, orphans)
    warnings.append(f"an interrupted run left {len(pending)} documents unsettled; rewrote "
                    f"{len(redo) + len(from_corpus)} and removed {len(orphans)}")
    return from_corpus


def _write_to_migrations(
    settings: Settings,
    versions: IndexVersions,
    corpus: CorpusStore,
    index: str,
    live: Version,
    ids: list[str],
) -> dict[str, int]:
    """While a migration builds a new version, documents an ingest wrote to the live
    version go into that version too (with its own model), so its cutover's catch-up
    finds nothing left to do. Best effort: what fails here, the catch-up redoes."""
    from embedpipe.catchup import write_documents

    if not ids or not migration_running(settings, index):
        return {}
    out: dict[str, int] = {}
    for version in versions.versions(index):
        if version.state not in ("building", "validating") or version.collection == live.collection:
            continue
        try:
            profile = settings.profile(version.profile)
            embedder = build_embedder(profile, settings)
            check_fingerprint(version, embedder.fingerprint, profile.name)
            store = VectorStore(settings.data_dir, version.fingerprint, version.dims, profile.name)
            stats = write_documents(versions, corpus, version, ids, embedder, store, settings)
        except EmbedpipeError as exc:
            log.warning("could not write %d documents into %s (the migration's catch-up will): %s",
                        len(ids), version.collection, str(exc).splitlines()[0])
            continue
        out[version.collection] = stats.written
    return out


def _chunking_warnings(settings: Settings, index: str, target: Version) -> list[str]:
    wanted = settings.index_chunking(index)
    if wanted == target.chunking:
        return []
    return [
        f"[indexes.{index}] asks for chunking {wanted or 'off'} but {target.collection} was built "
        f"with {target.chunking or 'none'}; it keeps its own. To re-chunk, run "
        f"`embedpipe migrate --to {target.profile} --index {index}`"
    ]


def _existing_target(versions: IndexVersions, index: str, live: Version | None, fp: str) -> Version | None:
    if live is not None:
        return live
    # Resume an interrupted first build rather than starting another version.
    for version in reversed(versions.versions(index)):
        if version.state == "building" and version.fingerprint == fp:
            return version
    return None


def _target_version(
    versions: IndexVersions, index: str, live: Version | None, profile: Any, fp: str,
    chunking: dict[str, int] | None,
) -> tuple[Version, bool]:
    existing = _existing_target(versions, index, live, fp)
    if existing is not None:
        return existing, False
    return versions.create_version(index, profile, fp, chunking), True


def _dry_run(
    settings: Settings,
    versions: IndexVersions,
    index: str,
    live: Version | None,
    profile: Any,
    fp: str,
    corpus: CorpusStore,
    staged: Path,
    started: float,
) -> IngestReport:
    """What an ingest would do, from hashes alone: no model, no writes."""
    target = _existing_target(versions, index, live, fp)
    if target is not None:
        check_fingerprint(target, fp, profile.name)
    known = corpus.known()
    counts, changed = _diff(staged, known)
    table = pq.read_table(staged, columns=["id", "content_hash"])
    building = target is None or target.state != "live"
    hashes = {
        doc_id: h
        for doc_id, h in zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist())
        if building or doc_id in changed
    }
    if building:  # the rest of the corpus goes into a version that is not live yet
        hashes.update({i: k.content_hash for i, k in known.items() if i not in hashes})
    store = VectorStore.existing(settings.data_dir, fp, profile.dims)
    stored = store.present(hashes.values()) if store is not None else set()
    tokens, usd = _estimate(profile, set(hashes.values()) - stored, staged, corpus, building)
    return IngestReport(
        index=index,
        collection=target.collection if target else f"{index}__{profile.name}__v(new)",
        profile=profile.name,
        fingerprint=fp,
        **counts,  # documents, added, updated, unchanged
        failed=0,
        embedded=len(set(hashes.values()) - stored),
        reused=sum(1 for h in hashes.values() if h in stored),
        truncated=0,
        created_version=target is None,
        seconds=round(time.perf_counter() - started, 3),
        dry_run=True,
        tokens=tokens,
        estimated_usd=usd,
        estimated_usd_batch=profile.usd(tokens, batch=True),
    )


def _estimate(
    profile: Any, todo: set[str], staged: Path, corpus: CorpusStore, building: bool
) -> tuple[int | None, float | None]:
    """Exact tokens (and USD at the profile's price) a hosted profile would be sent."""
    if profile.provider != "openai" or not todo:
        return (0, 0.0) if profile.provider == "openai" else (None, None)
    from embedpipe.tokens import TokenCounter

    counter = TokenCounter(profile.tokenizer)
    prompt = profile.document_prompt
    tokens = 0
    sources = [read_batches(staged, ["text", "content_hash"])]
    if building:
        sources.append(corpus.iter_batches(columns=["text", "content_hash"]))
    for source in sources:
        for batch in source:
            texts = [
                prompt + t
                for t, h in zip(batch.column("text").to_pylist(), batch.column("content_hash").to_pylist())
                if h in todo
            ]
            todo -= set(batch.column("content_hash").to_pylist())
            tokens += sum(counter.count(texts)) if texts else 0
    return tokens, profile.usd(tokens)


def _ids(staged: Path) -> set[str]:
    return {i for batch in read_batches(staged, ["id"]) for i in batch.column("id").to_pylist()}


def _diff(staged: Path, known: dict[str, Known]) -> tuple[dict[str, int], set[str]]:
    counts = {"documents": 0, "added": 0, "updated": 0, "unchanged": 0}
    changed: set[str] = set()
    for batch in read_batches(staged, ["id", "record_hash"]):
        counts["documents"] += batch.num_rows
        for doc_id, rh in zip(batch.column("id").to_pylist(), batch.column("record_hash").to_pylist()):
            before = known.get(doc_id)
            if before is None:
                counts["added"] += 1
            elif before.record_hash != rh:
                counts["updated"] += 1
            else:
                counts["unchanged"] += 1
                continue
            changed.add(doc_id)
    return counts, changed


def _commit_corpus(corpus: CorpusStore, staged: Path, ids: set[str]) -> None:
    """Commit the staged rows of ``ids`` as one new corpus segment."""
    if not ids:
        return
    segment = corpus.writer()
    try:
        for batch in read_batches(staged):
            rows = batch.filter([i in ids for i in batch.column("id").to_pylist()])
            if rows.num_rows:
                segment.write(rows)
        with corpus.folder.locked():
            segment.commit()
    except BaseException:
        segment.abort()
        raise


def _work(
    staged: Path, changed: set[str], staged_ids: set[str] | None, corpus: CorpusStore,
    store_text: bool, chunker: Chunker | None, from_corpus: set[str] = frozenset(),  # type: ignore[assignment]
) -> Iterator[Work]:
    """Points to embed: of changed staged rows, and for a version still building (given
    every staged id) of the whole corpus too, else of the ``from_corpus`` ids."""
    building = staged_ids is not None
    for batch in read_batches(staged):
        rows = batch if building else batch.filter(
            [doc_id in changed for doc_id in batch.column("id").to_pylist()])
        for row in rows.to_pylist():
            yield from works_for_row(row, store_text, chunker)
    if building or from_corpus:
        done = staged_ids if building else changed  # the staged rows just yielded
        for batch in corpus.iter_batches():
            for row in batch.to_pylist():
                if row["id"] not in done and (building or row["id"] in from_corpus):
                    yield from works_for_row(row, store_text, chunker)


def delete(settings: Settings, index: str, ids: Iterable[str]) -> int:
    """Remove documents from every version of the index and from the corpus. Returns how
    many the corpus held."""
    check_index_name(index)
    ids = sorted({str(i) for i in ids})
    if not ids:
        return 0
    corpus = CorpusStore.for_index(settings.data_dir, index)
    with index_lock(settings, index):
        versions = IndexVersions.open(settings)
        versions.require_live(index)
        return delete_locked(versions, corpus, index, ids)


def delete_locked(versions: IndexVersions, corpus: CorpusStore, index: str, ids: list[str]) -> int:
    """``delete`` for a caller that holds the index lock.

    Points go first (from the live version, the standby kept for rollback and any
    version a migration builds), then the corpus markers: a crash in between leaves
    documents the corpus still lists, and the same call finishes the job.
    """
    present = corpus.known().keys() & set(ids)
    for version in versions.versions(index):
        versions.delete_documents(version.collection, ids)
    corpus.delete(present)
    return len(present)
