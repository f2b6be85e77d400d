"""Keeping an index in sync with its source: what changed is embedded, what is gone goes.

``embedpipe sync`` and the scheduled Prefect flow (``embedpipe/flows/ingest.py``) run these steps:

1. **read** the source named under ``[indexes.NAME]`` into a staged segment
   (:func:`read_source`). A file that cannot be read is reported with its reason and
   skipped whole; the rest goes on, and the next run retries it;
2. **apply** (:func:`apply`), under the index lock:

   * documents the source no longer has are the ones to delete, less those of files
     that failed to read (they are kept as indexed, never deleted for a read error);
     above ``max_delete_fraction`` of the index the run stops, changing nothing, and
     asks for ``--allow-mass-delete``: a source that came back empty is more likely an
     unmounted share than a wish to empty the index;
   * deletions leave every version (live, the standby kept for rollback, one a
     migration builds), then the corpus;
   * new and changed documents go through ``ingest``: unchanged ones (same record
     hash) are skipped without embedding; while a migration runs they are written
     into its new version too;
3. **record** the run's summary in ``<data>/runs/<index>.jsonl`` (``embedpipe status``
   shows the last runs); the flow also publishes it as a Prefect artifact. A run that
   fails is recorded too, with its one-line error (a read-only or full disk included);
   when even the run log cannot be written, the error says so.

A dry run stages the source in a temporary folder outside the data directory and takes
no lock: it writes nothing there, so it works on a read-only data directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from embedpipe._files import append_line, storage_error
from embedpipe._segments import read_batches
from embedpipe.config import Settings
from embedpipe.corpus import CorpusStore
from embedpipe.errors import ConfigError, DataDirError, EmbedpipeError, MassDeleteRefused
from embedpipe.ingest import (
    ProgressFactory,
    _ids,
    _ingest_staged,
    delete_locked,
    stage,
)
from embedpipe.index import IndexVersions
from embedpipe.layout import Layout, check_index_name
from embedpipe.locks import index_lock
from embedpipe.sources import SourceScan, SourceSpec

__all__ = ["Staged", "SyncReport", "apply", "last_runs", "read_source", "recorded", "sync"]

log = logging.getLogger(__name__)

@dataclass
class SyncReport:
    """What one sync did; ``to_dict()`` is the JSON summary, the artifact and the log line."""

    index: str
    source: str
    started_at: str
    seconds: float = 0.0
    status: str = "ok"  # ok | partial (some documents or files failed) | error
    collection: str | None = None
    profile: str | None = None
    files: int = 0  # files read from the source
    documents: int = 0  # documents the source holds (readable ones)
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0  # documents or files that could not be read or embedded
    embedded: int = 0  # texts (documents or chunks) sent to a model
    reused: int = 0  # vectors taken from the vector store
    tokens: int | None = 0  # tokens the model processed (None: the backend does not count)
    truncated: int = 0
    dry_run: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"path"?, "id"?, "reason"}
    # Symbolic links left out by rule (follow_symlinks): {"path", "reason"}; not failures.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    migration_writes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Staged:
    """A source read into a staged segment, and what could not be read."""

    path: Path | None  # the staged segment (None: no readable documents)
    scan: SourceScan
    started: float
    scratch: Path | None = None  # a dry run's temporary folder, outside the data directory

    def discard(self) -> None:
        """Remove the staged segment (and a dry run's folder)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def source_spec(settings: Settings, index: str) -> SourceSpec:
    """The source configured for ``index``; a ConfigError says how to add one."""
    cfg = settings.index_settings(index)
    if cfg.source is None:
        where = settings.config_path or "embedpipe.toml"
        raise ConfigError(
            f"index {index!r} has no source; add `source = \"PATH\"` under [indexes.{index}] "
            f"in {where}, or ingest files with `embedpipe ingest PATH --index {index}`"
        )
    return SourceSpec.of(cfg.source, glob=cfg.glob, id_field=cfg.id_field,
                         text_field=cfg.text_field, metadata_fields=cfg.metadata_fields,
                         follow_symlinks=cfg.follow_symlinks)


def read_source(settings: Settings, index: str, dry_run: bool = False) -> Staged:
    """Step 1: read the source into a staged segment (nothing visible is written); a dry
    run stages it in a temporary folder outside the data directory."""
    check_index_name(index)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="embedpipe-dry-run-")) if dry_run else None
    corpus = CorpusStore(scratch) if scratch else CorpusStore.for_index(settings.data_dir, index)
    scan = SourceScan(source_spec(settings, index))
    try:
        path = stage(corpus, scan)
        if path is not None and scan.failed:  # a failed file counts not at all
            path = _drop_sources(corpus, path, scan.failed)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Staged(path, scan, started, scratch)


def apply(
    settings: Settings,
    index: str,
    staged: Staged,
    allow_mass_delete: bool = False,
    dry_run: bool = False,
    progress: ProgressFactory | None = None,
) -> SyncReport:
    """Step 2: delete what the source lost, ingest what is new or changed."""
    spec = source_spec(settings, index)
    report = SyncReport(index=index, source=str(spec.path), started_at=_now(), dry_run=dry_run,
                        files=staged.scan.files)
    corpus = CorpusStore.for_index(settings.data_dir, index)
    # A dry run writes nothing, so it needs no lock (and works on a read-only data dir).
    lock = contextlib.nullcontext() if dry_run else index_lock(settings, index)
    try:
        with lock:
            gone = _gone(settings, index, corpus, staged, allow_mass_delete or dry_run, report)
            if not dry_run and gone:
                versions = IndexVersions.open(settings)
                report.deleted = delete_locked(versions, corpus, index, sorted(gone))
            elif dry_run:
                report.deleted = len(gone)
            if staged.path is not None:
                _add_ingest(report, _ingest_staged(
                    settings, index, corpus, staged.path, None, progress, staged.started, dry_run))
    finally:
        staged.discard()
    report.failures += [e.to_dict() for e in staged.scan.errors]
    report.failed += len(staged.scan.errors)
    report.skipped = [{"path": e.path, "reason": e.reason} for e in staged.scan.skipped]
    report.warnings += [f"skipped {e.path}: {e.reason}" for e in staged.scan.skipped]
    if staged.path is None and not staged.scan.errors:
        report.warnings.append(f"{spec.path} holds no documents")
    report.status = "partial" if report.failed else "ok"
    report.seconds = round(time.perf_counter() - staged.started, 3)
    return report


def sync(
    settings: Settings,
    index: str,
    allow_mass_delete: bool = False,
    dry_run: bool = False,
    progress: ProgressFactory | None = None,
) -> SyncReport:
    """Read, apply and record one sync of ``index`` (the flow runs the same steps as tasks)."""
    check_index_name(index)  # before anything is recorded under that name
    return recorded(settings, index, dry_run, lambda: apply(
        settings, index, read_source(settings, index, dry_run), allow_mass_delete=allow_mass_delete,
        dry_run=dry_run, progress=progress))


def recorded(settings: Settings, index: str, dry_run: bool, steps: Callable[[], SyncReport]) -> SyncReport:
    """Run a sync's ``steps`` and log the run, or why it stopped (a dry run is not logged).

    Every failure is logged, a disk that cannot be written included: it is raised as a
    one-line DataDirError. When the run log cannot be written either, the error says so.
    A run that succeeded but cannot be logged is still a success (with a warning).
    """
    started = time.perf_counter()
    try:
        report = steps()
    except Exception as exc:
        error = _converted(exc, settings)
        if not dry_run:
            _record_or_say(settings, index, error, started)
        if error is exc:
            raise
        raise error from exc
    if not dry_run:
        try:
            record_run(settings, report)
        except DataDirError as exc:
            log.warning("the sync of %r succeeded but is not in its run log: %s", index, exc)
    return report


def _converted(exc: Exception, settings: Settings) -> Exception:
    """A read-only or full disk as a DataDirError; any other error unchanged."""
    if isinstance(exc, (OSError, sqlite3.Error)):
        return storage_error(exc, settings.data_dir) or exc
    return exc


def _record_or_say(settings: Settings, index: str, error: Exception, started: float) -> None:
    try:
        record_failure(settings, index, error, started)
    except DataDirError as exc:
        note = (f"; this failed run could not be recorded in {Layout(settings.data_dir).runs(index)} "
                f"({_reason(exc)})")
        if isinstance(error, EmbedpipeError) and error.args and isinstance(error.args[0], str):
            error.args = (error.args[0] + note, *error.args[1:])  # one line, said once
        else:
            log.warning("%s", note[2:])


def _gone(
    settings: Settings, index: str, corpus: CorpusStore, staged: Staged, allowed: bool,
    report: SyncReport,
) -> set[str]:
    """Ids the corpus has and the source lost, guarded against mass deletion."""
    known = corpus.known()
    present: set[str] = set()
    if staged.path is not None:
        present = _ids(staged.path)
    # Never a deletion: files that failed to read, links skipped by rule.
    kept = staged.scan.kept_ids | _ids_from(
        corpus, staged.scan.failed | {e.path for e in staged.scan.skipped})
    gone = known.keys() - present - kept
    limit = settings.index_settings(index).max_delete_fraction
    if known and len(gone) > limit * len(known):
        message = (
            f"sync of {index!r} would delete {len(gone)} of its {len(known)} documents "
            f"({len(gone) / len(known):.0%}, above max_delete_fraction = {limit}); the source "
            "may be unmounted or truncated"
        )
        if not allowed:
            raise MassDeleteRefused(
                f"{message}. Nothing was changed; if they really are gone, re-run with "
                "--allow-mass-delete"
            )
        report.warnings.append(message)
    return gone


def _ids_from(corpus: CorpusStore, sources: set[str]) -> set[str]:
    """Corpus ids read from these source files, or from below these folders (``dir/``):
    kept as indexed when they fail to read."""
    if not sources:
        return set()
    folders = tuple(s for s in sources if s.endswith("/"))
    out: set[str] = set()
    for batch in corpus.iter_batches(columns=["id", "source"]):
        for doc_id, source in zip(batch.column("id").to_pylist(), batch.column("source").to_pylist()):
            if source in sources or (folders and (source or "").startswith(folders)):
                out.add(doc_id)
    return out


def _drop_sources(corpus: CorpusStore, staged: Path, sources: set[str]) -> Path | None:
    """A staged segment without the rows of ``sources`` (None when nothing is left)."""
    wanted = pa.array(sorted(sources), pa.string())
    writer = corpus.writer()
    try:
        for batch in read_batches(staged):
            rows = batch.filter(pc.invert(pc.is_in(batch.column("source"), value_set=wanted)))
            if rows.num_rows:
                writer.write(rows)
        out = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        staged.unlink(missing_ok=True)
    return out


def _add_ingest(report: SyncReport, ingested: Any) -> None:
    report.collection = ingested.collection
    report.profile = ingested.profile
    report.documents = ingested.documents
    report.added, report.updated, report.unchanged = ingested.added, ingested.updated, ingested.unchanged
    report.failed += ingested.failed
    report.embedded, report.reused, report.truncated = ingested.embedded, ingested.reused, ingested.truncated
    report.tokens = ingested.tokens if ingested.dry_run else ingested.tokens_embedded
    report.failures += [{"path": None, **f} for f in ingested.failures]
    report.migration_writes = dict(ingested.migration_writes)
    report.warnings += ingested.warnings


# --- the run log ------------------------------------------------------------------------


def _reason(exc: DataDirError) -> str:
    """What stopped the write, in a few words (the message's subject is the folder)."""
    text = str(exc)
    for words in ("read-only", "permission denied", "no space left", "disk quota exceeded"):
        if words in text:
            return words
    return text.splitlines()[0]


def record_run(settings: Settings, report: SyncReport) -> None:
    """Append the run's summary to ``<data>/runs/<index>.jsonl`` (one JSON line, written
    in one call so concurrent appends do not interleave; the file is 0600)."""
    line = json.dumps(report.to_dict(), ensure_ascii=False, default=str) + "\n"
    append_line(Layout(settings.data_dir).runs(report.index), line.encode("utf-8"))


def record_failure(settings: Settings, index: str, exc: Exception, started: float) -> None:
    """A run that stopped (mass delete refused, source missing, index busy, a disk that
    cannot be written, a bug) is logged too, with its error's first line."""
    try:
        source = str(source_spec(settings, index).path)
    except ConfigError:
        source = ""
    message = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, EmbedpipeError):
        message = f"{type(exc).__name__}: {message}"
    report = SyncReport(index=index, source=source, started_at=_now(), status="error",
                        seconds=round(time.perf_counter() - started, 3), error=message)
    record_run(settings, report)


def last_runs(settings: Settings, index: str, n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` most recent runs of ``index``, newest first (a torn last line is skipped)."""
    path = Layout(settings.data_dir).runs(index)
    if not path.exists():
        return []
    out = []
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
        if len(out) == n:
            break
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

