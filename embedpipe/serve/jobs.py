"""Long work that ``embedpipe serve`` runs for its clients: ingest, sync, migrate,
rollback, retire, adapt, and the plans before them.

A client posts a job (``POST /v1/jobs``) and follows it (``GET /v1/jobs/{id}``); the CLI
does so when a server owns the data directory, so ``embedpipe migrate --to X`` works
the same with a server as without. The job runs in a thread of the server, through the
same library function the CLI calls in-process, so its checks, locks and reports are
those of the command:

* **Locks are the library's.** Two writers of one index meet the index lock and the
  second fails at once with IndexBusy, as two CLI processes would; a sync goes on
  during a migration of the same index, as it does without a server. Searches never
  wait for a job.
* **Cancelling is cooperative.** ``POST /v1/jobs/{id}/cancel`` (or the server
  stopping) sets the job's flag; the job raises :class:`JobCancelled` at its next
  progress report, which is a batch boundary: what was acknowledged is kept and the
  rest never began. An ingest or sync then settles its index (``ingest.settle``: a
  batch the corpus took is whole, any other absent); a migration keeps its checkpoint,
  and the same command resumes it.
* **Records outlive the server.** Each job is ``<data>/jobs/<id>.json`` (0600), written
  at every change of state and at most every ``RECORD_EVERY_S`` while it runs. A
  record still ``running`` when a server starts was cut short by a kill: it is marked
  ``interrupted`` with the command that resumes it.

A job's parameters hold paths and profile names, never a secret, and no job logs its
parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe._files import write_json
from embedpipe.errors import EmbedpipeError, JobCancelled, JobNotFound, MigrationError, NothingToMigrate
from embedpipe.layout import Layout, check_index_name

if TYPE_CHECKING:
    from embedpipe.config import Settings

__all__ = ["FINISHED", "KINDS", "Job", "Jobs"]

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled", "interrupted")
RECORD_EVERY_S = 2.0  # a running job's record on disk trails its progress by at most this
KEEP_RECORDS = 200  # finished job records kept on disk (the oldest go first)


@dataclasses.dataclass
class Job:
    """One job: what was asked, where it is, how it ended."""

    id: str
    kind: str
    index: str
    params: dict[str, Any]
    state: str = "queued"  # queued | running | succeeded | failed | cancelled | interrupted
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0  # which progress bar (a migration has a backfill, then a catch-up)
    done: int = 0
    total: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {type, message, exit_code}
    cancel_requested: bool = False
    _cancel: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _saved: float = dataclasses.field(default=0.0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "index": self.index, "params": self.params,
                "state": self.state, "created": self.created, "started": self.started,
                "finished": self.finished, "progress": {"step": self.step, "done": self.done,
                                                        "total": self.total},
                "result": self.result, "error": self.error, "cancel_requested": self.cancel_requested}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Job:
        progress = raw.get("progress") or {}
        return cls(id=raw["id"], kind=raw["kind"], index=raw["index"], params=raw.get("params") or {},
                   state=raw["state"], created=raw["created"], started=raw.get("started"),
                   finished=raw.get("finished"), step=progress.get("step", 0),
                   done=progress.get("done", 0), total=progress.get("total"), result=raw.get("result"),
                   error=raw.get("error"), cancel_requested=bool(raw.get("cancel_requested")))

    @property
    def running(self) -> bool:
        return self.state not in FINISHED

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.id} ({self.kind} of index {self.index!r}) was cancelled at "
                               f"a batch boundary; what it wrote is kept: {resume_hint(self)}")

    def progress(self, total: int | None) -> Callable[[int], None]:
        """The library's progress factory: a new bar per call; each advance is a batch
        boundary, where a cancelled job stops."""
        self.check_cancelled()
        self.step += 1
        self.done, self.total = 0, total

        def advance(n: int) -> None:
            self.done += n
            self.check_cancelled()

        return advance


def resume_hint(job: Job) -> str:
    """The command that picks the job up again."""
    p, index = job.params, job.index
    commands = {
        "ingest": f"embedpipe ingest {p.get('path')} --index {index}",
        "sync": f"embedpipe sync --index {index}",
        "migrate": f"embedpipe migrate --to {p.get('to')} --index {index}",
        "rollback": f"embedpipe rollback --index {index}",
        "retire": f"embedpipe retire --index {index}",
        "adapt": f"embedpipe adapt --index {index} --to {p.get('to')}",
    }
    return f"`{commands[job.kind]}` resumes it" if job.kind in commands else "run it again"


# -- what each kind runs: the library functions the CLI calls ---------------------------

Progress = Callable[[int | None], Callable[[int], None]]


def _ingest(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from embedpipe.ingest import ingest

    return ingest(settings, index, Path(p["path"]), profile=p.get("profile"), progress=progress,
                  dry_run=bool(p.get("dry_run")), skip_invalid=p.get("skip_invalid")).to_dict()


def _sync(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    if p.get("prefect"):  # a Prefect flow run, reported to PREFECT_API_URL (or a temporary server)
        from embedpipe.flows.ingest import run_sync

        return run_sync(settings, index, allow_mass_delete=bool(p.get("allow_mass_delete")),
                        dry_run=bool(p.get("dry_run")), progress=progress)
    from embedpipe.sync import sync

    return sync(settings, index, allow_mass_delete=bool(p.get("allow_mass_delete")),
                dry_run=bool(p.get("dry_run")), progress=progress).to_dict()


def _plan(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """What ``migrate --dry-run`` prints; without ``dry_run`` the plan a migration then
    runs on (a hosted probe's vectors are stored, so the build reuses them)."""
    from embedpipe.migration import plan_migration

    dry_run = bool(p.get("dry_run"))
    try:
        plan = plan_migration(settings, index, p["to"], dry_run=dry_run,
                              probe=True if p.get("probe") else None)
    except NothingToMigrate as exc:
        return {"status": "nothing_to_do", "index": index, "to_profile": p["to"], "detail": str(exc)}
    if not dry_run:
        plan.keep_probe(settings)
    return {"status": "planned", "plan": plan.to_dict()}


def _migrate(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from embedpipe.flows.migrate import run_migration

    golden = Path(p["golden"]) if p.get("golden") else None
    return run_migration(settings, index, p["to"], golden=golden, force=bool(p.get("force")),
                         tolerance=p.get("tolerance"), plan=p.get("plan"), progress=progress)


def _rollback(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from embedpipe.migration import rollback

    return rollback(settings, index, progress=progress, force=bool(p.get("force")))


def _retire(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from embedpipe.migration import retire

    return retire(settings, index, keep=int(p.get("keep", 1)), dry_run=bool(p.get("dry_run")),
                  abandon=bool(p.get("abandon")))


def _adapt(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from embedpipe.adapters import adapt

    return adapt(settings, index, p["to"], sample=p.get("sample"), kind=p.get("adapter_kind"),
                 golden=Path(p["golden"]) if p.get("golden") else None, force=bool(p.get("force")),
                 progress=progress)


def _watch(settings: Settings, index: str, p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """``embedpipe watch`` for one index (the CLI starts one job per index): the report
    with its row, recorded in the server's ``<data>/watch/last.json``."""
    from embedpipe.watch import watch_here

    return watch_here(settings, [index], warn_days=p.get("warn_days")).to_dict()


KINDS: dict[str, Callable[[Settings, str, dict[str, Any], Progress], dict[str, Any]]] = {
    "watch": _watch,
    "ingest": _ingest, "sync": _sync, "plan": _plan, "migrate": _migrate, "rollback": _rollback,
    "retire": _retire, "adapt": _adapt,
}
SETTLES = ("ingest", "sync")  # kinds whose cut-short write ingest.settle puts right


class Jobs:
    """The server's jobs: start, look up, cancel, and stop them all with the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.folder = Layout(settings.data_dir).jobs
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._load()

    # -- records ----------------------------------------------------------------------
    def _load(self) -> None:
        """Earlier servers' records; one left running was cut short by a kill."""
        import json

        try:
            paths = sorted(self.folder.glob("*.json"))
        except OSError:
            return
        for path in paths:
            try:
                job = Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable job record %s", path.name)
                continue
            if job.running:
                job.state, job.finished = "interrupted", time.time()
                job.error = {"type": "JobCancelled", "exit_code": JobCancelled.exit_code,
                             "message": f"the server stopped while job {job.id} ran; {resume_hint(job)}"}
                self._save(job)
            self._jobs[job.id] = job

    def _save(self, job: Job, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - job._saved < RECORD_EVERY_S:
            return
        job._saved = now
        try:
            write_json(self.folder / f"{job.id}.json", job.to_dict())
        except (OSError, EmbedpipeError) as exc:  # a record is a convenience, the job goes on
            log.warning("could not write the record of job %s: %s", job.id, exc)

    def _prune(self) -> None:
        finished = sorted((j for j in self._jobs.values() if not j.running), key=lambda j: j.created)
        for job in finished[:max(0, len(finished) - KEEP_RECORDS)]:
            self._jobs.pop(job.id, None)
            (self.folder / f"{job.id}.json").unlink(missing_ok=True)

    # -- the API ----------------------------------------------------------------------
    def start(self, kind: str, index: str, params: dict[str, Any]) -> Job:
        """Start a job in a thread of its own and return it at once (state ``queued`` or
        ``running``); what it finds wrong lands in its ``error``."""
        if kind not in KINDS:
            from embedpipe.errors import InputError

            raise InputError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
        check_index_name(index)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        job = Job(id=f"{stamp}-{kind}-{secrets.token_hex(3)}", kind=kind, index=index, params=params)
        thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job.id}", daemon=True)
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
            self._threads[job.id] = thread
        self._save(job)
        thread.start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in this server; `embedpipe jobs` lists them")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop at its next batch boundary (a finished job stays as it ended)."""
        job = self.get(job_id)
        if job.running:
            job.cancel_requested = True
            job._cancel.set()
            self._save(job)
        return job

    def stop(self, wait_s: float) -> list[str]:
        """The server is stopping: cancel every running job and wait up to ``wait_s`` for
        them to reach a batch boundary. Returns the ids still running after the wait."""
        running = [j for j in self.list() if j.running]
        for job in running:
            job._cancel.set()
        deadline = time.monotonic() + wait_s
        for job in running:
            thread = self._threads.get(job.id)
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return [j.id for j in running if j.running]

    # -- the thread -------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        job.state, job.started = "running", time.time()
        self._save(job)

        def progress(total: int | None) -> Callable[[int], None]:
            advance = job.progress(total)

            def step(n: int) -> None:
                advance(n)
                self._save(job, force=False)

            return step

        try:
            job.check_cancelled()
            job.result = KINDS[job.kind](self.settings, job.index, job.params, progress)
            job.state = "succeeded"
        except JobCancelled as exc:
            job.state, job.error = "cancelled", _error(exc)
            self._settle(job)
        except EmbedpipeError as exc:
            job.state, job.error = "failed", _error(exc)
            report = getattr(exc, "report", None)  # a failed migration's report (validation, failures)
            if isinstance(exc, MigrationError) and report is not None:
                job.result = report
            if job._cancel.is_set():  # cancelled while the library was converting the error
                self._settle(job)
        except Exception:  # a bug: its traceback goes to the server's log, not to the client
            log.exception("job %s (%s of index %r) failed", job.id, job.kind, job.index)
            job.state = "failed"
            job.error = {"type": "InternalError", "exit_code": 1,
                         "message": f"job {job.id} failed on an internal error; the server's log has "
                                    "its traceback"}
        finally:
            job.finished = time.time()
            with self._lock:
                self._threads.pop(job.id, None)
            self._save(job)

    def _settle(self, job: Job) -> None:
        """After a cancelled ingest or sync, put the index back in agreement with its
        corpus now rather than at the next write."""
        if job.kind not in SETTLES or job.params.get("dry_run"):
            return
        from embedpipe.ingest import settle

        try:
            said = settle(self.settings, job.index)
        except EmbedpipeError as exc:
            log.warning("job %s: index %r not settled after cancelling: %s", job.id, job.index,
                        str(exc).splitlines()[0])
            return
        if said:
            log.info("job %s: %s", job.id, said)


def _error(exc: EmbedpipeError) -> dict[str, Any]:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"type": type(exc).__name__, "message": message, "exit_code": exc.exit_code}
