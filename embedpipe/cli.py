"""The ``embedpipe`` command. Thin: parse, call the library, print.

User mistakes end in one line on stderr (``error: ...``) and a non-zero exit code,
never a traceback. ``--json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from embedpipe._files import storage_error
from embedpipe.errors import EmbedpipeError

app = typer.Typer(
    name="embedpipe",
    help="Own your embedding layer: local or hosted models, Parquet corpus and vectors, "
    "versioned Qdrant indexes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"config": None}

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="embedpipe.toml to use (default: $EMBEDPIPE_CONFIG, ./embedpipe.toml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
IndexOpt = Annotated[str, typer.Option("--index", "-i", help="Index name (the alias applications query).")]


def _print_version(value: bool) -> None:
    if value:
        from embedpipe import __version__

        typer.echo(f"embedpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["config"] = config
    _state["verbose"] = verbose
    # Prefect logs every task state at INFO; the CLI prints its own progress and report.
    _state["prefect_log_level_set"] = "PREFECT_LOGGING_LEVEL" in os.environ
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # The temporary server's telemetry heartbeat races its own SQLite writes ("database
    # is locked" tracebacks); nothing leaves this machine anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _settings() -> Any:
    from embedpipe.config import load_settings

    return load_settings(_state["config"])


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Callable[[int], Callable[[int], None]] | None]:
    """A rich progress bar on stderr (rate and ETA), or nothing for --json / no terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} docs/s" if speed else "- docs/s")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:

        def start(total: int) -> Callable[[int], None]:
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start


ExecutorOpt = Annotated[Optional[str], typer.Option(
    "--executor", help="Where to embed: local (this process) or ray (a Ray cluster, see [execution]; "
    "pip install 'embedpipe[ray]'). Default: [execution] engine.")]


BatchOpt = Annotated[bool, typer.Option(
    "--batch", help="Embed through the provider's Batch API (OpenAI profiles): half the price, results "
    "within its completion window (24 h); resumable, nothing submitted twice.")]
ResubmitOpt = Annotated[bool, typer.Option(
    "--resubmit/--no-resubmit", help="With --batch: submit again what failed, expired or cancelled "
    "batches did not complete (up to [profiles.X.batch] max_attempts), or report it failed.")]


def _executor(settings: Any, to: str | None, flag: str | None, batch: bool = False) -> str:
    """The executor a run uses; with Ray, checks it is installed (one line if not). A hosted
    target stays on this machine, said in one line (for ingest, ``to`` None, the report's
    warning says it: the profile is known once the index is read). ``--batch``: the
    provider's Batch API, for an OpenAI-protocol target only."""
    from embedpipe.errors import ConfigError
    from embedpipe.execution import hosted_note, resolve_executor

    if batch:
        if flag is not None:
            raise ConfigError("--batch and --executor are two ways to embed; pass one of them")
        if to is not None:
            from embedpipe.execution.batch_embed import require_batch_profile

            require_batch_profile(settings.profile(to))
        return "batch"
    chosen = resolve_executor(settings, flag)
    if chosen == "ray":
        if to is not None and not settings.profile(to).is_local:
            typer.echo(f"note: {hosted_note(to)}", err=True)
            return "local"
        from embedpipe.execution.ray_embed import require_ray

        require_ray()
    return chosen


CancelOpt = Annotated[bool, typer.Option(
    "--cancel-on-interrupt",
    help="Through a server: Ctrl-C cancels the job (at its next batch boundary) instead of leaving it running.")]


def _server(settings: Any) -> Any:
    """The client of the server that owns the data directory (or ``[server] url``), or None:
    then the command opens the engine itself."""
    from embedpipe.serve.client import server_for

    return server_for(settings)


def _job(client: Any, kind: str, index: str, label: str, show: bool, cancel_on_interrupt: bool,
         **params: Any) -> dict[str, Any]:
    """Run a command as a job of the server: follow its progress (a bar on a terminal)
    and return its report, or raise its error. Ctrl-C detaches, leaving the job running,
    unless ``cancel_on_interrupt``."""
    from embedpipe.serve.client import job_result

    job = client.start_job(kind, index, **params)
    if show:
        typer.echo(f"job {job['id']} runs in embedpipe serve at {client.url} (Ctrl-C detaches)", err=True)
    try:
        with _progress(show, label) as start:
            job = client.follow(job, _bar_updater(start))
    except KeyboardInterrupt:
        job_id = job["id"]
        if cancel_on_interrupt:
            client.cancel(job_id)
            typer.echo(f"cancelling job {job_id}: it stops at its next batch boundary, keeping what it "
                       f"wrote; `embedpipe jobs show {job_id}` says when", err=True)
        else:
            typer.echo(f"detached: job {job_id} goes on in embedpipe serve at {client.url}; "
                       f"`embedpipe jobs follow {job_id}` watches it, `embedpipe jobs cancel {job_id}` "
                       "stops it", err=True)
        raise typer.Exit(130) from None
    return job_result(job)


def _bar_updater(start: Any) -> Callable[[dict[str, Any]], None]:
    """Move a progress bar as a followed job's ``progress`` moves (a new bar per step)."""
    bar: dict[str, Any] = {"step": 0, "advance": None, "done": 0}

    def update(job: dict[str, Any]) -> None:
        p = job["progress"]
        if start is None or not p["step"]:
            return
        if p["step"] != bar["step"]:
            bar.update(step=p["step"], advance=start(p["total"]), done=0)
        if p["done"] > bar["done"]:
            bar["advance"](p["done"] - bar["done"])
            bar["done"] = p["done"]

    return update


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A .jsonl file, a .parquet file or a directory of .txt/.md files.")],
    index: IndexOpt,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Model profile for a new index (see `embedpipe models`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and diff only: say what would be embedded, write nothing.")] = False,
    skip_invalid: Annotated[Optional[bool], typer.Option("--skip-invalid/--fail-on-invalid", help="Report invalid records (file, line, reason) and ingest the rest, exit 3; default: the index's on_invalid (refuse the whole input).")] = None,
    executor: ExecutorOpt = None,
    batch: BatchOpt = False,
    resubmit: ResubmitOpt = True,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Add or update documents in an index; unchanged documents are not re-embedded.
    With a server running, it reads PATH and does the work (the path must be one it can read)."""
    from embedpipe.errors import ConfigError
    from embedpipe.ingest import ingest as run_ingest

    settings = _settings()
    chosen = _executor(settings, None, executor, batch)  # Ray missing: one line, before anything runs
    show = not as_json and not dry_run and sys.stderr.isatty()
    client = _server(settings)
    if client is not None and (executor is not None or batch):
        raise ConfigError("--executor and --batch apply to an ingest run in this process; the server "
                          "embeds as its own config's [execution] engine says")
    if client is not None:
        report = _job(client, "ingest", index, f"embedding into {index}", show, cancel_on_interrupt,
                      path=str(path.resolve()), profile=profile, dry_run=dry_run, skip_invalid=skip_invalid)
    else:
        with _progress(show, f"embedding into {index}") as progress:
            report = run_ingest(settings, index, path, profile=profile, progress=progress, dry_run=dry_run,
                                skip_invalid=skip_invalid, executor=chosen, resubmit=resubmit).to_dict()
    _print_ingest(report, dry_run, as_json)


def _print_ingest(r: dict[str, Any], dry_run: bool, as_json: bool) -> None:
    if as_json:
        _print_json(r)
        _exit_if_failures(r)
        return
    if dry_run:
        typer.echo(
            f"dry run, nothing written: {r['index']} -> {r['collection']}: "
            f"{r['documents']} documents, {r['added']} to add, {r['updated']} to update, "
            f"{r['unchanged']} unchanged; {r['embedded']} texts to embed, "
            f"{r['reused']} vectors reusable"
            + (f"; {r['tokens']:,} tokens" if r.get("tokens") is not None else "")
            + (f", about ${r['estimated_usd']:.4f}" if r.get("estimated_usd") is not None else "")
            + (f"; {r['failed']} invalid records left out" if r["failed"] else "")
        )
        _print_failures(r["failures"])
        _exit_if_failures(r)
        return
    rate = f" ({r['embedded'] / r['seconds']:,.0f} docs/s)" if r["embedded"] and r["seconds"] else ""
    typer.echo(
        f"{r['index']} -> {r['collection']}: {r['documents']} documents, "
        f"{r['added']} added, {r['updated']} updated, {r['unchanged']} unchanged, "
        f"{r['failed']} failed; {r['embedded']} embedded, {r['reused']} reused"
        + (f", {r['truncated']} truncated" if r.get("truncated") else "")
        + (f", {r['chunked']} chunked" if r.get("chunked") else "")
        + f" in {r['seconds']:.1f}s{rate}"
    )
    _print_executor(r.get("executor"))
    _print_failures(r["failures"])
    for warning in r.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)
    _exit_if_failures(r)


def _print_executor(ran: dict[str, Any] | None) -> None:
    """One line on where the texts were embedded, when not in this process."""
    ran = ran or {}
    if ran.get("executor") == "ray" and not ran.get("note"):
        typer.echo(f"executor ray: {ran['embedded']} texts embedded on the cluster "
                   f"({ran['committed']} of {ran['partitions']} partitions committed, {ran['workers']} workers)")
    elif ran.get("executor") == "batch" and ran.get("batch"):
        b = ran["batch"]
        typer.echo(f"batch API: {ran['embedded']:,} texts stored from {b['batches']} new batches "
                   f"({b['resumed']} resumed, {b['resubmitted']:,} texts resubmitted, {ran['failed']:,} failed); "
                   f"{b['tokens']:,} tokens billed, ${b['usd']:.4f} at the batch price")


def _print_failures(failures: list[dict[str, Any]]) -> None:
    """The first ten failures on stderr, an invalid record by its file and line."""
    for failure in failures[:10]:
        place = failure.get("path")
        if place and failure.get("line") is not None:
            place = f"{place}:{failure['line']}"
        names = [str(n) for n in (place, failure["id"]) if n is not None]
        typer.echo(f"failed: {': '.join(names)}: {failure['reason']}", err=True)
    if len(failures) > 10:
        typer.echo(f"... and {len(failures) - 10} more failures (--json lists all)", err=True)


@app.command()
def sync(
    index: IndexOpt,
    allow_mass_delete: Annotated[bool, typer.Option("--allow-mass-delete", help="Go ahead even if the run deletes more than max_delete_fraction of the index.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and diff only: say what would be added, updated, deleted and embedded.")] = False,
    prefect: Annotated[Optional[bool], typer.Option("--prefect/--no-prefect", help="Run as a Prefect flow (default: when PREFECT_API_URL is set).")] = None,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Sync an index with its configured source: embed what is new or changed, delete
    what is gone. Unchanged documents are not re-embedded."""
    settings = _settings()
    show = not as_json and not dry_run and sys.stderr.isatty()
    as_flow = prefect if prefect is not None else bool(os.environ.get("PREFECT_API_URL"))
    client = _server(settings)
    if client is not None:
        report = _job(client, "sync", index, f"syncing {index}", show, cancel_on_interrupt,
                      allow_mass_delete=allow_mass_delete, dry_run=dry_run, prefect=as_flow)
    else:
        report = _sync_here(settings, index, allow_mass_delete, dry_run, as_flow, show)
    if as_json:
        _print_json(report)
    else:
        _print_sync(report)
    if report["failed"]:
        raise typer.Exit(PARTIAL_EXIT)


def _sync_here(settings: Any, index: str, allow_mass_delete: bool, dry_run: bool, as_flow: bool,
               show: bool) -> dict[str, Any]:
    with _progress(show, f"syncing {index}") as progress:
        if as_flow:
            from embedpipe.flows.ingest import run_sync

            _quiet_run_logs()
            report = run_sync(settings, index, allow_mass_delete=allow_mass_delete,
                              dry_run=dry_run, progress=progress)
        else:
            from embedpipe.sync import sync as run

            report = run(settings, index, allow_mass_delete=allow_mass_delete, dry_run=dry_run,
                         progress=progress).to_dict()
    return report  # type: ignore[no-any-return]


def _print_sync(r: dict[str, Any]) -> None:
    verb = "would be" if r["dry_run"] else ""
    tokens = f", {r['tokens']:,} tokens" if r.get("tokens") else ""
    typer.echo(
        f"{r['index']} <- {r['source']}: {r['documents']} documents; {r['added']} added, "
        f"{r['updated']} updated, {r['deleted']} deleted, {r['unchanged']} unchanged, "
        f"{r['failed']} failed{' (' + verb + ')' if verb else ''}; {r['embedded']} embedded, "
        f"{r['reused']} reused{tokens} in {r['seconds']:.1f}s"
    )
    for collection, n in r.get("migration_writes", {}).items():
        typer.echo(f"  also wrote {n} points into {collection} (a migration is building it)")
    for failure in r["failures"][:10]:
        typer.echo(f"failed: {failure.get('path') or failure.get('id')}: {failure['reason']}", err=True)
    if len(r["failures"]) > 10:
        typer.echo(f"... and {len(r['failures']) - 10} more failures (--json lists all)", err=True)
    for warning in r["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def schedule(
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Only this index (default: every index with a schedule).")] = None,
    cron: Annotated[Optional[str], typer.Option("--cron", help="Cron schedule, overriding the index's `schedule` (e.g. \"*/15 * * * *\").")] = None,
    watch_cron: Annotated[Optional[str], typer.Option("--watch-cron", help="Also serve the deprecation watch on this cron, overriding \\[watch] schedule (e.g. \"0 6 * * *\").")] = None,
) -> None:
    """Serve scheduled sync flows (one Prefect deployment per index) and the deprecation
    watch (`[watch] schedule`) until interrupted.

    Needs a Prefect server: run `prefect server start` and set PREFECT_API_URL.
    """
    if not _state.get("prefect_log_level_set"):
        # Served runs are child processes: their task states and logs belong on the server.
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"
    from embedpipe.flows.schedule import serve_schedules

    _quiet_run_logs()
    serve_schedules(_settings(), index=index, cron=cron, watch_cron=watch_cron)


PARTIAL_EXIT = 3  # some documents failed; the rest were ingested


def _exit_if_failures(report: dict[str, Any]) -> None:
    if report["failed"]:
        raise typer.Exit(PARTIAL_EXIT)


def _parse_filters(pairs: list[str]) -> dict[str, Any] | None:
    from embedpipe.index import Typed

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--filter")
        # CSV metadata are text and JSONL's are typed: a value matches either form
        out[key] = Typed(value)
    return out or None


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="The query.")],
    index: IndexOpt,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="How many results.")] = 10,
    filter: Annotated[list[str], typer.Option("--filter", "-f", help="Metadata KEY=VALUE (repeatable).")] = [],
    group_by_doc: Annotated[bool, typer.Option("--group-by-doc", help="Chunked index: the best chunk of each document.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Search an index; the query is embedded with the index's own model."""
    from embedpipe.index import Index
    from embedpipe.serve.client import RemoteIndex

    settings = _settings()
    client = _server(settings)
    idx = RemoteIndex(index, client) if client is not None else Index(index, settings)
    hits = idx.search(text, k=k, filter=_parse_filters(filter), group_by_doc=group_by_doc)
    if as_json:
        _print_json([{k: v for k, v in h.to_dict().items() if k != "text"} for h in hits])
        return
    if not hits:
        typer.echo("no results")
    elif hits[0].via:
        typer.echo(f"note: the index's model cannot embed queries; served through {hits[0].via}", err=True)
    for rank, hit in enumerate(hits, start=1):
        snippet = " ".join((hit.text or "").split())[:100]
        typer.echo(f"{rank:>3}. {hit.score:.4f}  {hit.chunk_id or hit.id}  {snippet}")


@app.command()
def status(
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Only this index.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Indexes: the alias target and every version with profile, fingerprint, state and size."""
    from embedpipe.layout import mode_warning
    from embedpipe.status import index_status

    settings = _settings()
    unsafe = mode_warning(settings.data_dir, log_it=False)  # said here, once, not logged too
    if unsafe:
        typer.echo(f"warning: {unsafe}", err=True)
    client = _server(settings)
    data = client.indexes(index) if client is not None else index_status(settings, index)
    if as_json:
        _print_json(data)
        return
    if not data:
        typer.echo("no indexes yet; create one with `embedpipe ingest PATH --index NAME`")
    for entry in data:
        typer.echo(f"index {entry['index']}: alias -> {entry['alias'] or '(none)'}, "
                   f"{entry['documents']} documents in the corpus")
        for warning in entry["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        if entry.get("watch"):
            w = entry["watch"]
            dated = w["status"] == "deprecated" and w.get("days_left") is not None
            left = f", {w['days_left']} days left" if dated else ""
            typer.echo(f"  deprecation watch {w['checked_at']}: {w['status']}{left}"
                       + ("; needs action (`embedpipe watch` says what)" if w["needs_action"] else ""))
        if entry.get("migration"):
            m = entry["migration"]
            again = f"embedpipe migrate --to {m['to_profile']} --index {entry['index']}"
            hint = (f"`{again} --force` cuts over anyway; `embedpipe retire --index {entry['index']} "
                    "--abandon` drops it" if m["phase"] == "validation_failed"
                    else f"`{again}` resumes it")
            typer.echo(f"  migration to {m['to_profile']} -> {m['collection']}: {m['phase']} "
                       f"(updated {m['updated_at']}); {hint}")
        for b in entry.get("batches") or []:
            by_status = ", ".join(f"{n} {s}" for s, n in sorted(b["batches"].items()))
            retry = b.get("exhausted", 0) + b.get("unsent", 0)
            again = f", {retry:,} to retry (the --batch command, without --no-resubmit, retries them)" if retry else ""
            typer.echo(f"  batch API ({b['profile']}): {b['stored']:,} of {b['texts']:,} texts stored, "
                       f"{b['in_flight']:,} in flight, {b['failed']:,} failed{again}; batches: {by_status} "
                       f"(updated {b['updated']}); the same --batch command resumes them")
        if entry.get("adapter"):
            a = entry["adapter"]
            kept = f"keeps {a['retention']:.0%} of the model's retrieval" if a.get("retention") else "judged on its own"
            typer.echo(f"  query adapter {a['id']} from {a['profile']} ({a['kind']}, {kept}"
                       f"{', forced' if a.get('forced') else ''}): used {a['in_use']}")
        for run in entry.get("runs", [])[:3]:
            if run["status"] == "error":
                typer.echo(f"  sync {run['started_at']}: error: {run['error']}")
            else:
                typer.echo(f"  sync {run['started_at']}: {run['status']}, {run['added']} added, "
                           f"{run['updated']} updated, {run['deleted']} deleted, "
                           f"{run['unchanged']} unchanged, {run['failed']} failed, "
                           f"{run['embedded']} embedded in {run['seconds']:.1f}s")
        for v in entry["versions"]:
            mark = "*" if v["live"] else " "
            warn = "" if v["deprecation"] == "active" else f"  [{v['deprecation']}]"
            points = "   ? points" if v["points"] is None else f"{v['points']:>8} points"
            typer.echo(
                f"  {mark} v{v['version']:<3} {v['collection']:<40} {v['profile']:<16} "
                f"{v['fingerprint_short']}  {v['state']:<9} {points}  {v['created_at']}{warn}"
            )
            if v.get("error"):
                typer.echo(f"      error: {v['error']}")
            elif v.get("segments") is not None:
                indexed = v.get("indexed_vectors") or 0
                typer.echo(f"      engine: {v['segments']} segments, {indexed} of {v['points']} vectors in "
                           "the HNSW index (the rest are searched exactly)"
                           + (f", {v['disk_bytes'] / 2**20:.1f} MiB on disk" if v.get("disk_bytes") else "")
                           + (f"; vector store: {v['vector_store_segments']} segment files"
                              if v.get("vector_store_segments") is not None else ""))
        if entry["versions"]:
            typer.echo(f"  engine: {entry['engine']}; corpus: {entry['corpus_segments']} segment files")


models_app = typer.Typer()
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every local profile's weights again (ignore the cache) and check the live indexes' fingerprints; exit 2 on a mismatch.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Model profiles: provider, dims, fingerprint, usable here, deprecation (`models pull
    PROFILE` downloads a local profile's weights)."""
    if ctx.invoked_subcommand is not None:
        return
    from embedpipe.status import profile_status

    data = profile_status(_settings(), verify=verify)
    mismatched = any(p.get("mismatched_indexes") for p in data)
    if as_json:
        _print_json(data)
        if mismatched:
            raise typer.Exit(2)
        return
    typer.echo(f"{'profile':<18} {'provider':<22} {'dims':>5}  {'fingerprint':<12}  {'usable':<6}  status")
    for p in data:
        status_text = p["deprecation"]
        if p["shutdown"]:
            status_text += f" (shutdown {p['shutdown']})"
        if p["replacement"]:
            status_text += f" -> {p['replacement']}"
        typer.echo(
            f"{p['name']:<18} {p['provider']:<22} {p['dims']:>5}  {p['fingerprint'] or '-':<12}  "
            f"{'yes' if p['usable'] else 'no':<6}  {status_text}  ({p['where']})"
        )
    for p in data:
        for warning in p["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
    if mismatched:
        raise typer.Exit(2)


@models_app.command("pull")
def models_pull(
    profile: Annotated[str, typer.Argument(help="A local profile (see `embedpipe models`).")],
    as_json: JsonOpt = False,
) -> None:
    """Download a local profile's weights from the Hugging Face Hub.

    Pinned to the profile's revision, from $HF_ENDPOINT when set (a mirror); every file's
    SHA-256 is checked, and the folder appears only when complete and verified."""
    from embedpipe.pull import pull

    report = pull(_settings().profile(profile), progress=not as_json and sys.stderr.isatty())
    if as_json:
        _print_json(report.as_dict())
        return
    typer.echo(_pull_summary(report))


def _pull_summary(r: Any) -> str:
    at = f"{r.repo} at revision {(r.revision or '')[:12]}"
    if r.source != "pulled":
        return f"{r.profile}: served by its {r.source} ({r.where}); nothing to pull"
    if r.already_present:
        return (f"{r.profile}: already pulled ({at}, {len(r.files)} files, {_size(r.bytes)}) in "
                f"{r.where}; nothing downloaded")
    by = {k: sum(f.checked == k for f in r.files) for k in ("catalogue", "hub", "size")}
    return (f"{r.profile}: pulled {len(r.files)} files, {_size(r.bytes)}, {at} from {r.endpoint} "
            f"in {r.seconds:.1f}s\n  into {r.where}\n  checked: {by['catalogue']} against the "
            f"catalogue's SHA-256, {by['hub']} against the Hub's listing"
            + (f", {by['size']} by size only" if by["size"] else ""))


WATCH_EXIT = 6  # embedpipe watch: something needs doing


@app.command()
def watch(
    warn_days: Annotated[Optional[int], typer.Option("--warn-days", min=0, max=3650, help="A shutdown this many days away or fewer needs doing (default: \\[watch] warn_days, 90).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the model behind every live index: the catalogue's deprecation dates, the
    provider's /v1/models and a one-text probe. Prints each index's status, days left, the
    migration plan to its replacement (cost, time) and whether a query adapter keeps search
    up, then what to run. Exits 6 when something needs doing, 0 when nothing does."""
    from embedpipe.watch import watch as run_watch

    report = run_watch(_settings(), warn_days=warn_days)
    if as_json:
        _print_json(report.to_dict())
    else:
        _print_watch(report)
    if report.needs_action:
        raise typer.Exit(WATCH_EXIT)


def _print_watch(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from embedpipe.watch import describe_plan

    if not report.rows:
        typer.echo("no live index to watch; create one with `embedpipe ingest PATH --index NAME`")
        return
    table = Table(title=f"deprecation watch {report.checked_at} (warn_days {report.warn_days})")
    for column in ("index", "profile (model)", "status", "days left", "plan", "adapter"):
        table.add_column(column, overflow="fold")
    for r in report.rows:
        left = "-" if r.days_left is None else str(r.days_left)
        plan = describe_plan(r.plan) if r.plan else (f"no plan: {r.plan_error}" if r.plan_error else "-")
        status = r.status + (" (needs action)" if r.needs_action else "")
        table.add_row(r.index, f"{r.profile} ({r.model or '?'})", status, left, plan, r.adapter_note)
    Console(stderr=False, width=160).print(table)
    for r in report.rows:
        for reason in r.reasons:
            typer.echo(f"  {r.index}: {reason}")
    for action in report.actions:
        typer.echo(f"action: {action}")
    typer.echo(f"{sum(r.needs_action for r in report.rows)} of {len(report.rows)} indexes need action"
               if report.needs_action else "nothing needs doing")


cost_app = typer.Typer()
app.add_typer(cost_app, name="cost")
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="Only from this day on (YYYY-MM-DD).")]


def _since(since: str | None) -> Any:
    import datetime as dt

    from embedpipe.errors import InputError

    try:
        return dt.date.fromisoformat(since) if since else None
    except ValueError:
        raise InputError(f"--since {since!r} is not a date; use YYYY-MM-DD") from None


@cost_app.callback(invoke_without_command=True)
def cost(
    ctx: typer.Context,
    since: SinceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hosted usage: requests, tokens and USD per day and profile, from the cost ledger
    (`cost report`: build vs buy, per month, against a local model)."""
    if ctx.invoked_subcommand is not None:
        return
    from embedpipe.usage import UsageLedger, cost_summary

    rows = cost_summary(UsageLedger(_settings().data_dir), _since(since))
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("no hosted usage recorded yet")
        return
    typer.echo(f"{'day':<10}  {'profile':<18} {'kind':<10} {'requests':>9} {'tokens':>12} {'USD':>10}")
    for r in rows:
        typer.echo(f"{r['day']:<10}  {r['profile']:<18} {r['kind']:<10} {r['requests']:>9,} "
                   f"{r['tokens']:>12,} {r['usd']:>10.4f}")
    total_t = sum(r["tokens"] for r in rows)
    total_usd = sum(r["usd"] for r in rows)
    typer.echo(f"{'total':<10}  {'':<18} {'':<10} {sum(r['requests'] for r in rows):>9,} "
               f"{total_t:>12,} {total_usd:>10.4f}")


@cost_app.command("report")
def cost_report(
    since: SinceOpt = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="A local profile to compare the hosted usage against (its model is probed on this machine).")] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="The machine to price local hours with: a row of configs/gpus.toml (default on a CPU-only machine: cpu-2vcpu).")] = None,
    gpu_usd_per_hour: Annotated[Optional[float], typer.Option("--gpu-usd-per-hour", min=0, help="Hourly price of the local machine (overrides --gpu's).")] = None,
    throughput: Annotated[Optional[float], typer.Option("--throughput", min=0.001, help="Documents/s of the local profile on that machine (skips the probe); converted to tokens/s with the ledger's tokens per input.")] = None,
    gpu_hours_per_month: Annotated[float, typer.Option("--gpu-hours-per-month", min=1, max=744, help="Hours a reserved machine is billed each month (730: 24/7).")] = 730.0,
    as_json: JsonOpt = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw cumulative cost against months for each option to this PNG (needs embedpipe[plot]).")] = None,
) -> None:
    """Build or buy: hosted tokens and USD per month and the trend, the same volume on a
    local model (hours at a measured throughput times an hourly price), the one-off cost
    of moving each live index, and the break-even."""
    from embedpipe.cost import build_report, check_plot_path, plot_report

    start = _since(since)
    if plot is not None:
        check_plot_path(plot)  # a bad --plot fails before the probe, not after
    report = build_report(_settings(), since=start, compare=compare, gpu=gpu,
                          gpu_usd_per_hour=gpu_usd_per_hour, throughput=throughput,
                          gpu_hours_per_month=gpu_hours_per_month)
    if plot is not None:
        plot_report(report, plot)
    if as_json:
        _print_json(report.to_dict())
    else:
        _print_cost_report(report)
        if plot is not None:
            typer.echo(f"plot: {plot}")


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}" if abs(value) >= 100 else f"${value:,.4f}"


def _print_cost_report(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    months = Table(title=f"hosted usage per month (ledger {report.ledger})")
    for col in ("month", "profile", "kind", "api", "requests", "inputs", "tokens", "USD billed"):
        months.add_column(col, justify="right" if col in ("requests", "inputs", "tokens", "USD billed") else "left")
    for r in report.months:
        months.add_row(r.month, r.profile, r.kind, r.api, f"{r.requests:,}", f"{r.inputs:,}",
                       f"{r.tokens:,}", _usd(r.usd))
    console.print(months)
    if report.trend:
        console.print(_trend_table(report))
    v = report.volume
    if v is not None:
        typer.echo(f"mean month ({v.months} months): {v.tokens_per_month:,.0f} tokens, "
                   f"{v.inputs_per_month:,.0f} inputs ({v.tokens_per_input:,.1f} tokens/input); "
                   f"hosted sync {_usd(v.usd_sync_per_month)}, batch {_usd(v.usd_batch_per_month)}, "
                   f"billed {_usd(v.usd_billed_per_month)}")
    if report.local is not None:
        _print_local(report)
    if report.migrations:
        console.print(_moves_table(report))
    for line in report.assumptions:
        typer.echo(f"assumes: {line}")
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if report.local is None and v is not None:
        typer.echo("compare with a local model: embedpipe cost report --compare PROFILE [--gpu NAME]")


def _trend_table(report: Any) -> Any:
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1f}%"

    table = Table(title="hosted embeddings: trend")
    for col in ("month", "tokens", "change", "billed", "change", "all sync", "all batch"):
        table.add_column(col, justify="left" if col == "month" else "right")
    for m in report.trend:
        table.add_row(m.month, f"{m.tokens:,}", pct(m.tokens_change_pct), _usd(m.usd_billed),
                      pct(m.usd_change_pct), _usd(m.usd_sync), _usd(m.usd_batch))
    return table


def _print_local(report: Any) -> None:
    loc, t = report.local, report.local.throughput
    typer.echo(f"local {loc.profile} ({loc.model}) on {loc.gpu.name} at ${loc.gpu.usd_per_hour}/h "
               f"({loc.gpu.source or 'given'}{', ' + loc.gpu.date if loc.gpu.date else ''})")
    typer.echo(f"  throughput      {t.tokens_per_s:,.0f} tokens/s, {t.docs_per_s:,.1f} docs/s "
               f"({'probe on ' + t.device if t.source == 'probe' else '--throughput'})")
    typer.echo(f"  mean month      {loc.hours_per_month:,.2f} h of work: {_usd(loc.usd_per_month_on_demand)} "
               f"on demand (${loc.usd_per_million_tokens:.6f} per million tokens); reserved "
               f"{loc.gpu_hours_per_month:g} h: {_usd(loc.usd_per_month_reserved)} "
               f"(capacity {loc.capacity_tokens_per_month:,.0f} tokens/month)")
    for api, b in (report.break_even or {}).items():
        vol = b["reserved_volume_tokens_per_month"]
        od = "always (cheaper per token)" if b["on_demand_volume_tokens_per_month"] == 0 else "never"
        typer.echo(f"  vs hosted {api:<5} ({_usd(b['hosted_usd_per_million_tokens'])}/M tokens): on demand "
                   f"cheaper {od}, {_months(b['on_demand_months_to_pay_off'])}; reserved "
                   f"cheaper above {'-' if vol is None else f'{vol:,}'} tokens/month"
                   f"{'' if b['reserved_fits_one_machine'] else ' (more than one machine embeds)'}, "
                   f"{_months(b['reserved_months_to_pay_off'])}")


def _months(value: float | None) -> str:
    """When a move to the local model pays for itself."""
    if value is None:
        return "never pays off"
    return "pays off at once" if value == 0 else f"pays off after {value:,.1f} months"


def _moves_table(report: Any) -> Any:
    from rich.table import Table

    table = Table(title="one-off: moving each live index")
    for col in ("index", "live on", "documents", "hosted tokens", "sync", "batch", "local texts",
                "local hours", "local", "notes"):
        table.add_column(col, justify="left" if col in ("index", "live on", "notes") else "right")
    for m in report.migrations:
        hours = "-" if m.local_hours is None else f"{m.local_hours:,.3f}"
        table.add_row(m.index, m.live_profile, f"{m.documents:,}",
                      "-" if m.hosted_tokens is None else f"{m.hosted_tokens:,}", _usd(m.usd_sync),
                      _usd(m.usd_batch), "-" if m.local_texts is None else f"{m.local_texts:,}",
                      hours, _usd(m.usd_local), "; ".join(m.notes))
    return table


def _resolve_index(settings: Any, index: str | None) -> str:
    """The named index (checked before anything starts), or the only one there is."""
    if index:
        from embedpipe.layout import check_index_name

        return check_index_name(index)
    from embedpipe.errors import ConfigError
    from embedpipe.index import IndexVersions

    client = _server(settings)
    if client is not None:
        names = sorted(e["index"] for e in client.indexes())
    else:
        names = sorted({v.index for v in IndexVersions.open(settings).versions()})
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"pass --index NAME (indexes: {', '.join(names)})" if names
        else "no index exists yet; create one with `embedpipe ingest PATH --index NAME`"
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_plan(p: dict[str, Any]) -> None:
    tokens = "-" if p["tokens"] is None else f"{p['tokens']:,}" + (
        " (exact, billed)" if p["tokens_exact"] else " (model tokenizer)")
    usd = "-" if p["estimated_usd"] is None else f"${p['estimated_usd']:.4f}"
    rate = f" at {p['probe_docs_per_s']:,.1f} docs/s (probe)" if p["probe_docs_per_s"] else ""
    dep = p["deprecation"]
    lines = [
        f"migrate {p['index']}: {p['from_profile']} ({p['from_collection']}) -> {p['to_profile']}",
        f"  documents         {p['documents']:,}",
        f"  to embed          {p['to_embed']:,} texts ({p['reusable']:,} vectors already stored for "
        f"{p['to_profile']})",
        f"  tokens            {tokens}" + (f"; {p['over_limit']:,} over the limit" if p["over_limit"] else ""),
        f"  estimated cost    {usd}",
        f"  estimated time    {_duration(p['estimated_seconds'])}{rate}",
    ]
    if p.get("batch_window_s"):  # an OpenAI-protocol target: the Batch API is the other way
        batch_usd = "-" if p["estimated_usd_batch"] is None else f"${p['estimated_usd_batch']:.4f}"
        lines.append(f"  with --batch      {batch_usd}, results within {_duration(p['batch_window_s'])} "
                     "(the provider's completion window)")
    lines += [
        f"  storage           Qdrant ~{_size(p['storage_bytes']['qdrant'])}, "
        f"vector store +{_size(p['storage_bytes']['vector_store'])}",
        f"  deprecation       {p['from_profile']}: {dep['from']['status']}; "
        f"{p['to_profile']}: {dep['to']['status']}",
    ]
    if p["resume_collection"]:
        lines.append(f"  resumes           {p['resume_collection']} "
                     f"({p['already_written']:,} documents already written)")
    typer.echo("\n".join(lines))
    for warning in p["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


def _print_validation(validation: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    verdict = "passed" if validation["checks_passed"] else (
        "FAILED, overridden by --force" if validation["forced"] else "FAILED")
    table = Table(title=f"validation of {validation['new_collection']}: {verdict}")
    for column in ("check", "old", "new", "result", "detail"):
        table.add_column(column, overflow="fold")
    for row in validation["table"]:
        table.add_row(*(str(row[c]) for c in ("check", "old", "new", "result", "detail")))
    Console(stderr=False, width=120).print(table)
    if not validation["old_can_query"]:
        typer.echo(f"note: the old version cannot embed queries ({validation['old_reason']}); "
                   "the new version was judged on its own")


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        from embedpipe.errors import InputError

        raise InputError("not a terminal, so nothing was asked: pass --yes to go ahead")
    if not typer.confirm(question, default=False):
        typer.echo("aborted; nothing was changed", err=True)
        raise typer.Exit(1)


def _quiet_run_logs() -> None:
    """Keep flow and task run logs (tracebacks included) on the Prefect server only: the
    CLI prints its own one-line errors. ``--verbose`` shows them on the terminal too."""
    if not _state.get("verbose"):
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).propagate = False


@app.command()
def migrate(
    to: Annotated[str, typer.Option("--to", help="The profile to move the index to (see `embedpipe models`).")],
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Index to migrate (default: the only one).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (documents, tokens, cost, time, storage) and stop; sends nothing billable and writes nothing.")] = False,
    probe: Annotated[bool, typer.Option("--probe", help="With --dry-run and a hosted target: time it on up to migration.probe_size texts (billed).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before spending.")] = False,
    golden: Annotated[Optional[Path], typer.Option("--golden", help="JSONL of {query, relevant[, grades]}: judge retrieval by nDCG@10 and recall@100.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Cut over even if validation fails (recorded in the report).")] = False,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", min=0.0, max=1.0, help="Allowed metric drop, new vs old (default: migration.tolerance).")] = None,
    adapter: Annotated[Optional[bool], typer.Option("--adapter/--no-adapter", help="When the live model can no longer embed queries: fit a query adapter from the target first, so search works during the backfill (asked on a terminal; default with --yes: yes).")] = None,
    executor: ExecutorOpt = None,
    batch: BatchOpt = False,
    resubmit: ResubmitOpt = True,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Re-index into a new version with another model, validate it, and move the alias.

    Resumable: after a crash or kill, the same command continues where it stopped.
    """
    from embedpipe.errors import ConfigError, MigrationError

    settings = _settings()
    chosen = _executor(settings, to, executor, batch)  # Ray missing: one line, before anything runs
    name = _resolve_index(settings, index)
    if golden is not None:
        from embedpipe.evaluation import read_golden

        read_golden(golden)  # a bad golden file fails before anything is spent
    client = _server(settings)
    if client is not None and (executor is not None or batch):
        raise ConfigError("--executor and --batch apply to a migration run in this process; the server "
                          "embeds as its own config's [execution] engine says")
    if client is None:
        planned, keep_probe = _plan_here(settings, name, to, dry_run, probe, batch)
    else:  # the server stores a probe's vectors as it plans: they were paid for
        planned, keep_probe = _job(client, "plan", name, "planning", False, False, to=to,
                                   dry_run=dry_run, probe=probe), (lambda: None)
    if planned["status"] == "nothing_to_do":  # re-running a finished migration is not an error
        if as_json:
            _print_json(planned)
        else:
            typer.echo(planned["detail"])
        return
    plan = planned["plan"]
    if as_json and dry_run:
        _print_json(planned)
        return
    if not as_json:
        _print_plan(plan)
    if dry_run:
        typer.echo("dry run: nothing was written")
        return
    _confirm(yes, f"Migrate index {name!r} to {to!r}?")
    if _wants_adapter(plan, adapter, yes):
        _adapter_first(settings, name, to, golden, as_json)
    kept = keep_probe()  # the probe's vectors are not embedded twice
    if kept:
        plan["probe_kept"] = kept
    show = not as_json and sys.stderr.isatty()
    try:
        if client is not None:
            report = _job(client, "migrate", name, f"building {name} on {to}", show, cancel_on_interrupt,
                          to=to, golden=str(golden.resolve()) if golden else None, force=force,
                          tolerance=tolerance, plan=plan)
        else:
            from embedpipe.flows.migrate import run_migration

            _quiet_run_logs()
            with _progress(show, f"building {name} on {to}") as progress:
                report = run_migration(settings, name, to, golden=golden, force=force,
                                       tolerance=tolerance, plan=plan, progress=progress,
                                       executor=chosen, resubmit=resubmit)
    except MigrationError as exc:
        failed = getattr(exc, "report", None)
        if failed and as_json:
            _print_json(failed)
        elif failed and failed.get("validation"):
            _print_validation(failed["validation"])
        if failed and not as_json:
            for failure in failed["failures"][:10]:
                typer.echo(f"failed: {failure['id']}: {failure['reason']}", err=True)
        raise
    if as_json:
        _print_json(report)
        return
    _print_validation(report["validation"])
    typer.echo(
        f"{report['index']} -> {report['collection']} ({report['to_profile']}): live. "
        f"{report['documents']:,} documents, {report['embedded']:,} embedded, "
        f"{report['reused']:,} reused, {report['caught_up']['written']:,} caught up, "
        f"{report['caught_up']['deleted']:,} removed in {report['seconds']:.1f}s. "
        f"Previous version {report['from_collection']} is standby: "
        f"`embedpipe rollback --index {report['index']}` undoes this"
    )
    _print_executor(report.get("executor"))


@app.command()
def adapt(
    to: Annotated[str, typer.Option("--to", help="The profile whose query embeddings are mapped (the one you will migrate to).")],
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Index whose live version the adapter maps into (default: the only one).")] = None,
    sample: Annotated[Optional[int], typer.Option("--sample", min=16, help="Pairs to fit on (default: adapter.sample); the rest are held out.")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="procrustes, ridge, lowrank, or auto: fit each and keep the best (default: adapter.kind, auto).")] = None,
    golden: Annotated[Optional[Path], typer.Option("--golden", help="JSONL of {query, relevant[, grades]}: judge by nDCG@10 and recall@100.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Use the adapter even if it keeps less than adapter.min_retention (recorded).")] = False,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Fit a query adapter: search keeps working through another model while the old one is gone.

    Fitted on vectors the vector store already holds for the live version (no call to
    its model) and the new model's embeddings of the same texts, validated like a
    migration, and used when the live model cannot embed queries.
    """
    settings = _settings()
    name = _resolve_index(settings, index)
    if kind is not None and kind not in ("procrustes", "ridge", "lowrank", "auto"):
        from embedpipe.errors import InputError

        raise InputError(f"--kind {kind!r} is not one of procrustes, ridge, lowrank, auto")
    report = _adapt(settings, name, to, sample, kind, golden, force, not as_json and sys.stderr.isatty(),
                    cancel_on_interrupt)
    if as_json:
        _print_json(report)
        return
    _print_adapter(report)


def _adapt(settings: Any, name: str, to: str, sample: int | None, kind: str | None, golden: Path | None,
           force: bool, show: bool, cancel_on_interrupt: bool = False) -> dict[str, Any]:
    """Fit an adapter here, or as a job of the server that owns the data directory."""
    if golden is not None:
        from embedpipe.evaluation import read_golden

        read_golden(golden)  # a bad golden file fails before anything is embedded
    client = _server(settings)
    if client is not None:
        params = {k: v for k, v in {"sample": sample, "adapter_kind": kind, "force": force or None,
                                    "golden": str(golden.resolve()) if golden else None}.items() if v is not None}
        return _job(client, "adapt", name, f"embedding pairs with {to}", show, cancel_on_interrupt, to=to, **params)
    from embedpipe.adapters import adapt

    with _progress(show, f"embedding pairs with {to}") as progress:
        return adapt(settings, name, to, sample=sample, kind=kind, golden=golden, force=force, progress=progress)


def _print_adapter(r: dict[str, Any]) -> None:
    typer.echo(f"adapter {r['adapter']} from {r['profile']} into {r['target']} ({r['kind']}): "
               f"{r['pairs']:,} pairs ({r['embedded']:,} embedded now), pair cosine {r['pair_cosine']:.4f} "
               f"on {r['held_out']:,} held-out documents, {r['map_us_per_query']:.0f} us per query")
    typer.echo(f"  {'metric':<18} {'old model':>10} {'adapter':>10} {'retention':>10}")
    for metric, v in r["metrics"].items():
        old = "-" if v.get("old") is None else f"{v['old']:.4f}"
        kept = "-" if v.get("retention") is None else f"{v['retention']:.1%}"
        typer.echo(f"  {metric:<18} {old:>10} {v['adapter']:>10.4f} {kept:>10}")
    if len(r.get("candidates") or {}) > 1:
        metric = "nDCG@10" if "nDCG@10" in r["metrics"] else "self-retrieval@10"
        tried = ", ".join(f"{k} {v[metric]:.4f}" for k, v in r["candidates"].items())
        typer.echo(f"  kinds tried ({metric} through each): {tried}; kept {r['kind']}")
    verdict = "accepted (forced)" if r["forced"] else r["state"]
    typer.echo(f"{verdict}: {r['verdict']}. Searches of {r['index']} use it when its model cannot embed "
               f"queries; it retires itself when `embedpipe migrate --to {r['profile']}` goes live")


def _wants_adapter(plan: dict[str, Any], asked: bool | None, yes: bool) -> bool:
    """Fit an adapter before the migration? Only when the live model is gone and no
    adapter stands in; ``--adapter/--no-adapter`` decide, else the user (yes by default)."""
    gone = plan.get("from_model") or {}
    if gone.get("can_query", True) or gone.get("adapter") or asked is False:
        return False
    if asked or yes or not sys.stdin.isatty():
        return True
    return typer.confirm(
        f"The live model of {plan['index']!r} cannot embed queries, so its searches fail until the "
        f"migration goes live. Fit a query adapter from {plan['to_profile']!r} first (it embeds up to "
        "a few thousand texts, which the migration then reuses)?", default=True)


def _adapter_first(settings: Any, name: str, to: str, golden: Path | None, as_json: bool) -> None:
    """Fit the adapter ``migrate`` offered; a refused one is said and the migration goes on."""
    from embedpipe.errors import AdapterRefused

    try:
        report = _adapt(settings, name, to, None, None, golden, False, not as_json and sys.stderr.isatty())
    except AdapterRefused as exc:
        typer.echo(f"warning: {exc}; migrating without one", err=True)
        return
    if not as_json:
        _print_adapter(report)


def _plan_here(settings: Any, name: str, to: str, dry_run: bool,
               probe: bool, batch: bool = False) -> tuple[dict[str, Any], Callable[[], Any]]:
    """The migration's plan, made in this process (as a server's ``plan`` job makes it),
    and what stores a hosted probe's vectors once the user says yes. A ``--batch`` run
    probes only when asked: every text should go at the batch price."""
    from embedpipe.errors import NothingToMigrate
    from embedpipe.migration import plan_migration

    if not dry_run:
        from embedpipe.flows._prefect import check_prefect

        check_prefect()  # an unreachable server fails before the model is even loaded
    try:
        plan = plan_migration(settings, name, to, dry_run=dry_run,
                              probe=True if probe else (False if batch else None))
    except NothingToMigrate as exc:
        return {"status": "nothing_to_do", "index": name, "to_profile": to, "detail": str(exc)}, lambda: None
    return {"status": "planned", "plan": plan.to_dict()}, lambda: plan.keep_probe(settings)


@app.command()
def rollback(
    index: IndexOpt,
    force: Annotated[bool, typer.Option("--force", help="Roll back even if the standby's model can no longer embed queries.")] = False,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Point the index's alias back at its standby version (caught up with the corpus first)."""
    from embedpipe.migration import rollback as run_rollback

    settings = _settings()
    show = not as_json and sys.stderr.isatty()
    client = _server(settings)
    if client is not None:
        result = _job(client, "rollback", index, f"catching up {index}", show, cancel_on_interrupt, force=force)
    else:
        with _progress(show, f"catching up {index}") as progress:
            result = run_rollback(settings, index, progress=progress, force=force)
    if as_json:
        _print_json(result)
        return
    typer.echo(
        f"{result['index']} -> {result['collection']} ({result['profile']}): live again; "
        f"{result['from_collection']} is standby. Caught up {result['written']} documents "
        f"({result['embedded']} embedded, {result['reused']} reused), removed {result['deleted']}"
    )
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def retire(
    index: IndexOpt,
    keep: Annotated[int, typer.Option("--keep", min=0, help="Old versions to keep for rollback.")] = 1,
    abandon: Annotated[bool, typer.Option("--abandon", help="Also delete unfinished versions of migrations (e.g. one that failed validation).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete old versions beyond the newest --keep; never the live one. Vectors stay in the store."""
    from embedpipe.migration import retire as run_retire

    settings = _settings()
    client = _server(settings)

    def run(dry: bool) -> dict[str, Any]:
        if client is not None:
            return _job(client, "retire", index, "retiring", False, False, keep=keep, abandon=abandon,
                        dry_run=dry)
        return run_retire(settings, index, keep=keep, dry_run=dry, abandon=abandon)

    planned = run(True)
    doomed = planned["deleted"] + ([planned["removed_local_mode"]] if planned["removed_local_mode"] else [])
    if dry_run or not doomed:
        result = planned
    else:
        if not as_json:
            typer.echo(f"will delete: {', '.join(doomed)}")
        _confirm(yes, f"Delete {', '.join(doomed)} of {index!r}?")
        result = run(False)
    if as_json:
        _print_json(result)
        return
    verb = "would delete" if result["dry_run"] else "deleted"
    typer.echo(f"{index}: live {result['live']}; {verb} {len(result['deleted'])} versions"
               + (f" ({', '.join(result['deleted'])})" if result["deleted"] else "")
               + (f"; kept {', '.join(result['kept'])}" if result["kept"] else ""))
    if result.get("removed_local_mode"):
        typer.echo(f"{verb} {result['removed_local_mode']} (an earlier release's Qdrant local "
                   "mode, converted to the engine)")


@app.command()
def rebuild(
    index: IndexOpt,
    all_versions: Annotated[bool, typer.Option("--all", help="Rebuild every version of the index, not only the live one.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recreate the index's vector engine data from the Parquet corpus and vector store, embedding nothing."""
    from embedpipe.rebuild import rebuild as run_rebuild

    settings = _settings()
    show = not as_json and sys.stderr.isatty()
    with _progress(show, f"rebuilding {index}") as progress:
        report = run_rebuild(settings, index, all_versions=all_versions, progress=progress)
    if as_json:
        _print_json(report.to_dict())
    else:
        typer.echo(f"{index}: rebuilt {', '.join(report.versions)} from the Parquet files: "
                   f"{report.points} points, {report.reused} vectors reused, {report.embedded} "
                   f"embedded, {report.failed} failed in {report.seconds:.1f}s")
        for doc_id, reason in list(report.failures.items())[:20]:
            typer.echo(f"  failed {doc_id}: {reason}", err=True)
    if report.failed:
        raise typer.Exit(3)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (default: [server] host, 127.0.0.1); any other than loopback needs API keys (`embedpipe keys add`).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=0, max=65535, help="Port (default: [server] port, 8765; 0: any free port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the data directory over HTTP: search, documents, OpenAI-compatible embeddings
    and chat. One server per data directory; it writes <data>/server.json (API docs at /docs)."""
    if config is not None:
        _state["config"] = config
    from embedpipe.serve.runner import serve as run_server

    settings = _settings()

    def ready(info: Any) -> None:
        typer.echo(f"embedpipe serve: {info.url} for {settings.data_dir} (API docs at {info.url}/docs; "
                   "Ctrl-C stops)", err=True)

    run_server(settings, host=host, port=port, on_ready=ready)


keys_app = typer.Typer(
    help="API keys of `embedpipe serve`: the key file holds their SHA-256 hashes only.",
    no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="A name for the key (logs and errors use it; letters, digits, '_', '.', '-').")],
    index: Annotated[Optional[list[str]], typer.Option("--index", "-i", help="An index it may use (repeatable, or comma-separated); '*': every index.")] = None,
    scope: Annotated[Optional[list[str]], typer.Option("--scope", "-s", help="read, write or chat (repeatable, or comma-separated).")] = None,
    env: Annotated[bool, typer.Option("--env", help="Print an entry for $EMBEDPIPE_SERVER_KEYS (NAME:SCOPES:INDEXES:KEY) instead; writes nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a random key, print it once, and append its SHA-256 hash to the key file (0600).

    The key goes to stdout alone (`KEY=$(embedpipe keys add app -i docs -s read)`); it is
    written nowhere. A running server that has keys reloads the file at once."""
    from embedpipe.errors import ConfigError
    from embedpipe.serve.keys import SCOPES, add_key, env_key

    if not index:
        raise ConfigError("name the indexes the key may use: --index docs (repeatable), or --index '*' "
                          "for every index")
    if not scope:
        raise ConfigError(f"name what the key may do: --scope {' / --scope '.join(SCOPES)} (repeatable)")
    index = [i.strip() for value in index for i in value.split(",") if i.strip()]  # "-i a,b" too
    scope = [v.strip() for value in scope for v in value.split(",") if v.strip()]
    settings = _settings()
    if env:
        entry, made = env_key(name, index, scope, settings.server.keys_env)
        if as_json:
            _print_json({"name": name, "entry": entry, "sha256": made.sha256, "indexes": list(made.indexes),
                         "scopes": list(made.scopes), "variable": settings.server.keys_env})
            return
        typer.echo(entry)
        typer.echo(f"add it to ${settings.server.keys_env} (entries separated by ';'); the key is shown "
                   "only now and nothing was written", err=True)
        return
    key, added = add_key(settings.key_file, name, index, scope)
    if as_json:
        _print_json({"name": name, "key": key, "sha256": added.sha256, "indexes": list(added.indexes),
                     "scopes": list(added.scopes), "key_file": str(settings.key_file)})
        return
    typer.echo(key)
    typer.echo(f"added key {added.tag} to {settings.key_file}: indexes {', '.join(added.indexes)}; "
               f"scopes {', '.join(added.scopes)}. The key is shown only now: store it. Clients send "
               "'Authorization: Bearer <key>'.", err=True)


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """The keys a server would accept: names, indexes, scopes, hash prefixes (never a key)."""
    from embedpipe.serve.keys import parse_env, read_key_file

    settings = _settings()
    keys = read_key_file(settings.key_file) if settings.key_file.exists() else []
    secret = settings.server.env_keys
    if secret is not None:
        keys = parse_env(secret.get_secret_value(), settings.server.keys_env) + keys
    if as_json:
        _print_json([{**k.to_dict(), "rate_limit_per_minute": settings.server.rate_limit_of(k.name)}
                     for k in keys])
        return
    if not keys:
        typer.echo(f"no API keys ({settings.key_file} holds none, ${settings.server.keys_env} is unset); "
                   "add one with `embedpipe keys add NAME --index INDEX --scope read`")
        return
    typer.echo(f"{'name':<20} {'scopes':<16} {'indexes':<24} {'sha256':<12}  source")
    for k in keys:
        typer.echo(f"{k.name:<20} {','.join(k.scopes):<16} {','.join(k.indexes):<24} {k.sha256[:12]:<12}  "
                   f"{k.source}")


@keys_app.command("remove")
def keys_remove(name: Annotated[str, typer.Argument(help="The key's name (`embedpipe keys list`).")]) -> None:
    """Revoke a key: remove its entry from the key file. A running server refuses it from
    the next request on. (A key in $EMBEDPIPE_SERVER_KEYS goes by removing it there and
    restarting the server.)"""
    from embedpipe.serve.keys import remove_key

    settings = _settings()
    gone = remove_key(settings.key_file, name)
    typer.echo(f"removed key {gone.tag} from {settings.key_file}", err=True)


jobs_app = typer.Typer(help="Jobs of the running embedpipe serve: ingest, sync, migrate, "
                       "rollback, retire started through it.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JobArg = Annotated[str, typer.Argument(help="The job's id (`embedpipe jobs list`).")]


def _jobs_client() -> Any:
    from embedpipe.errors import ServerUnavailable

    settings = _settings()
    client = _server(settings)
    if client is None:
        raise ServerUnavailable(f"no embedpipe serve runs for {settings.data_dir} (no live server.json) "
                                "and [server] url is unset: jobs exist only in a server")
    return client


def _job_line(job: dict[str, Any]) -> str:
    p = job["progress"]
    done = f" {p['done']:,}/{p['total']:,}" if p["total"] else (f" {p['done']:,}" if p["done"] else "")
    why = f": {job['error']['message']}" if job.get("error") and job["state"] != "succeeded" else ""
    return f"{job['id']}  {job['kind']:<8} {job['index']:<16} {job['state']}{done}{why}"


@jobs_app.command("list")
def jobs_list(
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Only this index's jobs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The server's jobs, oldest first: running ones and the last finished ones."""
    found = _jobs_client().jobs(index)
    if as_json:
        _print_json(found)
        return
    if not found:
        typer.echo("no jobs")
    for job in found:
        typer.echo(_job_line(job))


@jobs_app.command("show")
def jobs_show(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """One job: state, progress, and its report or error."""
    job = _jobs_client().job(job_id)
    if as_json:
        _print_json(job)
    else:
        typer.echo(_job_line(job))


@jobs_app.command("follow")
def jobs_follow(
    job_id: JobArg,
    as_json: JsonOpt = False,
    cancel_on_interrupt: CancelOpt = False,
) -> None:
    """Follow a job until it ends (Ctrl-C detaches again); exits as its command would."""
    from embedpipe.serve.client import job_result

    client = _jobs_client()
    job = client.job(job_id)
    show = not as_json and sys.stderr.isatty()
    try:
        with _progress(show, f"{job['kind']} {job['index']}") as start:
            job = client.follow(job, _bar_updater(start))
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            client.cancel(job_id)
        typer.echo(f"{'cancelling' if cancel_on_interrupt else 'detached from'} job {job_id}", err=True)
        raise typer.Exit(130) from None
    if as_json:
        _print_json(job)
    else:
        typer.echo(_job_line(job))
    job_result(job)  # a failed job exits with its error's code


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Ask a job to stop at its next batch boundary; what it wrote is kept, and running its
    command again resumes it."""
    job = _jobs_client().cancel(job_id)
    if as_json:
        _print_json(job)
    elif job["state"] in ("queued", "running"):
        typer.echo(f"job {job_id} stops at its next batch boundary (`embedpipe jobs show {job_id}`)")
    else:
        typer.echo(f"job {job_id} had already ended: {job['state']}")


gateway_app = typer.Typer(help="The chat gateway: routing, breakers, latency.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")


def _gateway() -> Any:
    from embedpipe.gateway import Gateway

    return Gateway.from_settings(_settings())


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Cap the reply.")] = None,
    sensitive: Annotated[bool, typer.Option("--sensitive", help="Never send this to a hosted backend.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Ask the chat gateway: self-hosted backends first, hosted ones as fallback."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    params = {"max_tokens": max_tokens} if max_tokens else {}
    gw = _gateway()
    if stream:
        reply = gw.stream(messages, sensitive=sensitive, **params)
        for piece in reply:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = reply.result
        if not as_json:
            sys.stdout.write("\n")
    else:
        result = gw.chat(messages, sensitive=sensitive, **params)
        if not as_json:
            typer.echo(result.content)
    if as_json:
        _print_json(result.to_dict())
        return
    ttft = f", first token {result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else ""
    fell = f" after {', '.join(f['backend'] + ' ' + f['kind'] for f in result.fallbacks)}" if result.fallbacks else ""
    typer.echo(f"[{result.backend} ({result.model}) in {result.latency_s:.2f}s{ttft}{fell}]", err=True)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    index: IndexOpt,
    k: Annotated[int, typer.Option("-k", min=1, max=50, help="Documents to ground the answer on.")] = 5,
    sensitive: Annotated[bool, typer.Option("--sensitive", help="Never send this to a hosted backend.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Answer from an index: retrieve with its own model, answer through the gateway, cite ids."""
    from embedpipe.index import Index
    from embedpipe.serve.client import RemoteIndex

    settings = _settings()
    client = _server(settings)
    idx = RemoteIndex(index, client) if client is not None else Index(index, settings)
    result = idx.answer(question, k=k, sensitive=sensitive)
    if as_json:
        _print_json(result.to_dict())
        return
    via = next((s["via"] for s in result.sources if s.get("via")), None)
    if via:
        typer.echo(f"note: the index's model cannot embed queries; retrieved through {via}", err=True)
    typer.echo(result.text)
    typer.echo(f"\ncited: {', '.join(result.citations) or '(none)'}; retrieved: "
               f"{', '.join(s['id'] for s in result.sources)}  [{result.backend}, {result.latency_s:.2f}s]")


@gateway_app.command("stats")
def gateway_stats(as_json: JsonOpt = False) -> None:
    """Per backend, from the audit log: requests, errors, p50/p95 latency, TTFT, tokens/s."""
    from embedpipe.gateway import log_stats

    settings = _settings()
    data = log_stats(settings.data_dir, settings.chat.stats_window, settings.chat.breaker_failures)
    if as_json:
        _print_json(data)
        return
    if not data:
        typer.echo("no chat requests recorded yet")
        return
    typer.echo(f"{'backend':<14} {'requests':>8} {'errors':>7} {'p50 s':>7} {'p95 s':>7} "
               f"{'ttft p50':>8} {'tok/s':>7}  breaker")
    for name, st in data.items():
        cells = [st["p50_latency_s"], st["p95_latency_s"], st["p50_ttft_s"], st["output_tokens_per_s"]]
        shown = [f"{c:>7.3f}" if c is not None else f"{'-':>7}" for c in cells]
        typer.echo(f"{name:<14} {st['requests']:>8} {st['errors']:>7} {shown[0]} {shown[1]} "
                   f"{shown[2]:>8} {shown[3]}  {st['breaker']}")


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Click's usage errors, whichever click this typer speaks: typer 0.29 vendors its own
    (``typer._click``), whose classes derive from ``typer.TyperException``, not from
    ``click``'s; older typers raise ``click``'s own."""
    classes: list[type[BaseException]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        classes.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - typer 0.29 does not need click
        pass
    return tuple(classes)


def _data_dir_or_cwd() -> str:
    """The folder to name in a storage error: the data directory when settings load."""
    try:
        return str(_settings().data_dir)
    except Exception:  # noqa: BLE001 - only for a message; the error itself is what matters
        return os.getcwd()


def main() -> None:
    """Entry point: run the app, turning embedpipe errors into one line and an exit code,
    and usage mistakes into click's usage message and exit 2."""
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting.
        code = app(standalone_mode=False)
    except EmbedpipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except (OSError, sqlite3.Error) as exc:
        # A read-only or full disk that no layer below converted: still one line.
        converted = storage_error(exc, _data_dir_or_cwd())
        if converted is None:
            raise
        typer.echo(f"error: {converted}", err=True)
        raise SystemExit(converted.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except _usage_errors() as exc:
        exc.show()  # type: ignore[attr-defined]  # usage line, the error, "did you mean"
        raise SystemExit(exc.exit_code) from None  # type: ignore[attr-defined]
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
