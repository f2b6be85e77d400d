"""The ``embedpipe`` command. Thin: parse, call the library, print.

User mistakes end in one line on stderr (``error: ...``) and a non-zero exit code,
never a traceback. ``--json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

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


@app.callback()
def _root(
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["config"] = config
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


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A .jsonl file, a .parquet file or a directory of .txt/.md files.")],
    index: IndexOpt,
    profile: Annotated[Optional[str], typer.Option("--profile", "-p", help="Model profile for a new index (see `embedpipe models`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and diff only: say what would be embedded, write nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Add or update documents in an index; unchanged documents are not re-embedded."""
    from embedpipe.ingest import ingest as run_ingest

    settings = _settings()
    show = not as_json and not dry_run and sys.stderr.isatty()
    with _progress(show, f"embedding into {index}") as progress:
        report = run_ingest(settings, index, path, profile=profile, progress=progress, dry_run=dry_run)
    if as_json:
        _print_json(report.to_dict())
        _exit_if_failures(report)
        return
    if dry_run:
        typer.echo(
            f"dry run, nothing written: {report.index} -> {report.collection}: "
            f"{report.documents} documents, {report.added} to add, {report.updated} to update, "
            f"{report.unchanged} unchanged; {report.embedded} texts to embed, "
            f"{report.reused} vectors reusable"
            + (f"; {report.tokens:,} tokens" if report.tokens is not None else "")
            + (f", about ${report.estimated_usd:.4f}" if report.estimated_usd is not None else "")
        )
        return
    rate = f" ({report.embedded / report.seconds:,.0f} docs/s)" if report.embedded else ""
    typer.echo(
        f"{report.index} -> {report.collection}: {report.documents} documents, "
        f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.failed} failed; {report.embedded} embedded, {report.reused} reused"
        + (f", {report.truncated} truncated" if report.truncated else "")
        + (f", {report.chunked} chunked" if report.chunked else "")
        + f" in {report.seconds:.1f}s{rate}"
    )
    for failure in report.failures[:10]:
        typer.echo(f"failed: {failure['id']}: {failure['reason']}", err=True)
    if len(report.failures) > 10:
        typer.echo(f"... and {len(report.failures) - 10} more failures (--json lists all)", err=True)
    _exit_if_failures(report)


PARTIAL_EXIT = 3  # some documents failed; the rest were ingested


def _exit_if_failures(report: Any) -> None:
    if report.failed:
        raise typer.Exit(PARTIAL_EXIT)


def _parse_filters(pairs: list[str]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--filter")
        try:  # numbers and booleans match typed metadata; anything else is a string
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out or None


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="The query.")],
    index: IndexOpt,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="How many results.")] = 10,
    filter: Annotated[list[str], typer.Option("--filter", "-f", help="Metadata KEY=VALUE (repeatable).")] = [],
    as_json: JsonOpt = False,
) -> None:
    """Search an index; the query is embedded with the index's own model."""
    from embedpipe.index import Index

    idx = Index(index, _settings())
    hits = idx.search(text, k=k, filter=_parse_filters(filter))
    if as_json:
        _print_json([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits])
        return
    if not hits:
        typer.echo("no results")
    for rank, hit in enumerate(hits, start=1):
        snippet = " ".join((hit.text or "").split())[:100]
        typer.echo(f"{rank:>3}. {hit.score:.4f}  {hit.id}  {snippet}")


@app.command()
def status(
    index: Annotated[Optional[str], typer.Option("--index", "-i", help="Only this index.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Indexes: the alias target and every version with profile, fingerprint, state and size."""
    from embedpipe.status import index_status

    data = index_status(_settings(), index)
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
        for v in entry["versions"]:
            mark = "*" if v["live"] else " "
            warn = "" if v["deprecation"] == "active" else f"  [{v['deprecation']}]"
            typer.echo(
                f"  {mark} v{v['version']:<3} {v['collection']:<40} {v['profile']:<16} "
                f"{v['fingerprint_short']}  {v['state']:<9} {v['points']:>8} points  "
                f"{v['created_at']}{warn}"
            )


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """Model profiles: provider, dims, fingerprint, usable here, deprecation."""
    from embedpipe.status import profile_status

    data = profile_status(_settings())
    if as_json:
        _print_json(data)
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


@app.command()
def cost(
    since: Annotated[Optional[str], typer.Option("--since", help="Only from this day on (YYYY-MM-DD).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hosted usage: requests, tokens and USD per day and profile, from the cost ledger."""
    import datetime as dt

    from embedpipe.errors import InputError
    from embedpipe.usage import UsageLedger, cost_summary

    try:
        start = dt.date.fromisoformat(since) if since else None
    except ValueError:
        raise InputError(f"--since {since!r} is not a date; use YYYY-MM-DD") from None
    rows = cost_summary(UsageLedger(_settings().data_dir), start)
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


def main() -> None:
    """Entry point: run the app, turning embedpipe errors into one line and an exit code."""
    try:
        app(standalone_mode=False)
    except EmbedpipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if isinstance(exc, click.exceptions.Exit):
            raise SystemExit(exc.exit_code) from None
        if isinstance(exc, click.exceptions.Abort):
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
