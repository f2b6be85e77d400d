"""The deprecation watch: is the model behind each live index going away, and what then?

For the live version of every index, :func:`watch` gathers three kinds of evidence:

1. **the catalogue**: the profile's ``[deprecation]`` data (announced, shutdown,
   replacement), as ``embedpipe models`` shows it;
2. **the provider** (OpenAI-protocol profiles, hosted or self-hosted): ``GET /v1/models``
   (is the model still listed, does its card announce a ``shutdown_date``) and a one-text
   probe. Both go through the profile's own client (``backends._openai``: the same
   base_url, key rule, deadline and retries as embeddings; the probe's tokens go to the
   cost ledger), so no key is ever read or sent by another rule. A probe answered 404
   ``model_not_found`` or 410 Gone means **retired**; one that times out, meets a 5xx or
   finds no key means **unreachable** (reported with the reason, never as retired). In
   sovereign mode hosted providers are not asked at all;
3. **the way out**: the plan of a migration to the profile's ``replacement`` (what
   ``migrate --dry-run`` prints: documents, tokens, cost, time; a plan that cannot be made
   is reported in the row) and whether a query adapter (``embedpipe adapt``) keeps search
   up meanwhile.

Each index gets a :class:`WatchRow` with a status (``ok``, ``deprecated``, ``retired``,
``unreachable``, ``unlisted``, ``unknown-profile``), the days left before the earliest
known shutdown, and the commands to run. A row **needs action** when the model is retired,
unreachable, no longer listed, its profile is gone, or a deprecation is announced with a
shutdown within ``[watch] warn_days`` (or no date at all); ``embedpipe watch`` then exits 6.
An unreachable model counts: a key that is gone means search is already down.

Every check is recorded in ``<data>/watch/last.json`` (atomically), so ``embedpipe
status`` and ``models`` repeat its warnings, with the time of the check, without asking
the network again. When ``embedpipe serve`` owns the data directory the checks run in it,
one ``watch`` job per index (:func:`watch` goes through it, as the CLI does for every
command that opens the engine).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe._files import write_json
from embedpipe.errors import EmbedpipeError, ModelDeprecated, SovereigntyError
from embedpipe.layout import Layout

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.index import Version
    from embedpipe.profiles import Profile
    from embedpipe.serve.client import Client

__all__ = ["STATUSES", "ProviderCheck", "WatchReport", "WatchRow", "last_report", "watch",
           "watch_here", "watch_warnings"]

log = logging.getLogger(__name__)

OK, DEPRECATED, RETIRED, UNREACHABLE, UNLISTED, UNKNOWN_PROFILE = (
    "ok", "deprecated", "retired", "unreachable", "unlisted", "unknown-profile")
STATUSES = (OK, DEPRECATED, RETIRED, UNREACHABLE, UNLISTED, UNKNOWN_PROFILE)
SCHEMA = 1
_record_lock = threading.Lock()  # a server runs one watch job per index, maybe at once


@dataclass
class ProviderCheck:
    """What the provider said: ``listed`` (None: /v1/models could not be read),
    ``shutdown_date`` from the model's card, and the probe: ``ok``, ``retired``,
    ``unreachable`` or ``skipped``, with ``detail`` in our words (never a key)."""

    endpoint: str
    listed: bool | None = None
    shutdown_date: str | None = None
    probe: str = "skipped"
    detail: str = ""
    models_error: str | None = None


@dataclass
class WatchRow:
    """One live index: its model's status, the evidence, and the way out."""

    index: str
    collection: str
    fingerprint: str
    profile: str
    model: str | None
    provider: str | None
    status: str
    needs_action: bool
    days_left: int | None  # to the earliest known shutdown (negative: past it)
    shutdown: str | None
    shutdown_source: str | None  # "catalogue" or "provider"
    replacement: str | None
    reasons: list[str] = field(default_factory=list)
    provider_check: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None  # migrate --dry-run's numbers, to the replacement
    plan_error: str | None = None
    adapter: dict[str, Any] | None = None  # the live version's accepted query adapter
    adapter_note: str = ""
    actions: list[str] = field(default_factory=list)
    checked_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WatchRow:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def warning(self) -> str:
        """One line for ``status`` and ``models``: what the check found and what to do."""
        days = f", {self.days_left} days left" if self.status == DEPRECATED and self.days_left is not None else ""
        why = "; ".join(self.reasons) or self.status
        todo = f"; {self.actions[-1]}" if self.actions else ""
        return (f"watch ({self.checked_at}): index {self.index!r} on profile {self.profile!r} is "
                f"{self.status}{days}: {why}{todo}")


@dataclass
class WatchReport:
    """Every live index checked once; ``needs_action`` decides the exit code."""

    checked_at: str
    warn_days: int
    rows: list[WatchRow] = field(default_factory=list)
    via: str | None = None  # the server that ran the checks, if one did

    @property
    def needs_action(self) -> bool:
        return any(row.needs_action for row in self.rows)

    @property
    def actions(self) -> list[str]:
        """Every row's actions, each prefixed with its index."""
        return [f"{row.index}: {a}" for row in self.rows if row.needs_action for a in row.actions]

    def to_dict(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at, "warn_days": self.warn_days,
                "needs_action": self.needs_action, "via": self.via,
                "rows": [row.to_dict() for row in self.rows], "actions": self.actions}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- the entry points ------------------------------------------------------------------------


def watch(settings: Settings, warn_days: int | None = None, today: dt.date | None = None) -> WatchReport:
    """Check every live index (see the module docstring), through ``embedpipe serve`` when
    one owns the data directory, else here."""
    from embedpipe.serve.client import server_for

    client = server_for(settings)
    if client is None:
        return watch_here(settings, warn_days=warn_days, today=today)
    with client:
        return _through_server(client, settings, warn_days)


def watch_here(settings: Settings, indexes: list[str] | None = None, warn_days: int | None = None,
               today: dt.date | None = None) -> WatchReport:
    """Check the live version of every index (or of ``indexes``: each must have one) in
    this process, and record the rows in ``<data>/watch/last.json``."""
    from embedpipe.index import IndexVersions

    horizon = settings.watch.warn_days if warn_days is None else warn_days
    today = today or dt.date.today()
    versions = IndexVersions.open(settings)
    if indexes is None:
        aliases = versions.aliases()
        live = [v for v in versions.versions() if aliases.get(v.index) == v.collection]
    else:
        live = [versions.require_live(name) for name in indexes]
    report = WatchReport(checked_at=_now(), warn_days=horizon)
    for version in live:
        report.rows.append(check_version(settings, version, horizon, today))
    for row in report.rows:
        row.checked_at = report.checked_at
    _record(settings.data_dir, report, complete=indexes is None)
    return report


def _through_server(client: Client, settings: Settings, warn_days: int | None) -> WatchReport:
    """One ``watch`` job per live index the key may read; the server records them."""
    names = sorted(e["index"] for e in client.indexes() if e.get("alias"))
    report = WatchReport(checked_at=_now(), warn_days=settings.watch.warn_days if warn_days is None
                         else warn_days, via=client.url)
    for name in names:
        result = client.run_job("watch", name, warn_days=warn_days)
        report.warn_days = int(result.get("warn_days", report.warn_days))
        report.rows += [WatchRow.from_dict(row) for row in result.get("rows", [])]
    return report


# --- one index -----------------------------------------------------------------------------


def check_version(settings: Settings, version: Version, warn_days: int, today: dt.date) -> WatchRow:
    """The row of one live version: evidence, status, plan, adapter and actions."""
    profile = settings.profiles.get(version.profile)
    if profile is None:
        row = WatchRow(index=version.index, collection=version.collection,
                       fingerprint=version.fingerprint, profile=version.profile, model=None,
                       provider=None, status=UNKNOWN_PROFILE, needs_action=True, days_left=None,
                       shutdown=None, shutdown_source=None, replacement=None,
                       reasons=[f"profile {version.profile!r} is not defined any more (embedpipe.toml)"])
        _way_out(settings, version, row)
        return row
    dep = profile.deprecation
    reasons: list[str] = []
    shutdowns: list[tuple[dt.date, str]] = [(dep.shutdown, "catalogue")] if dep.shutdown else []
    if dep.status(today) != "active":
        reasons.append(_catalogue_words(profile, today))
    check = None
    if profile.provider == "openai":
        check = ask_provider(settings, profile)
        reasons += _provider_words(profile, check)
        announced = _parse_date(check.shutdown_date)
        if announced is not None:
            shutdowns.append((announced, "provider"))
    else:
        missing = _weights_missing(profile)
        if missing:
            check = ProviderCheck(endpoint="local weights", probe="unreachable", detail=missing)
            reasons.append(missing)
    shutdown, source = min(shutdowns) if shutdowns else (None, None)
    days_left = (shutdown - today).days if shutdown else None
    status = _status(check, days_left, announced=bool(shutdowns or dep.announced))
    if status == RETIRED and (days_left is None or days_left > 0):
        days_left = 0  # gone already, whatever date was announced
    if status == DEPRECATED and days_left is not None and days_left <= 0:
        reasons.append("past its shutdown date, yet still served: it may stop any day")
    needs = status != OK and (status != DEPRECATED or days_left is None or days_left <= warn_days)
    if status == DEPRECATED and not needs:
        reasons.append(f"beyond the {warn_days}-day horizon ([watch] warn_days)")
    row = WatchRow(index=version.index, collection=version.collection, fingerprint=version.fingerprint,
                   profile=profile.name, model=profile.model, provider=profile.provider, status=status,
                   needs_action=needs, days_left=days_left,
                   shutdown=shutdown.isoformat() if shutdown else None, shutdown_source=source,
                   replacement=dep.replacement, reasons=reasons,
                   provider_check=asdict(check) if check else None)
    _way_out(settings, version, row)
    return row


def _status(check: ProviderCheck | None, days_left: int | None, announced: bool) -> str:
    probe = check.probe if check else "skipped"
    if probe == RETIRED or (days_left is not None and days_left <= 0 and probe != "ok"):
        return RETIRED
    if probe == UNREACHABLE:
        return UNREACHABLE
    if check is not None and check.listed is False:
        return UNLISTED
    return DEPRECATED if announced else OK


def _catalogue_words(profile: Profile, today: dt.date) -> str:
    dep = profile.deprecation
    if dep.status(today) == "retired":
        return f"the catalogue says {profile.model} shut down on {dep.shutdown}"
    when = [f"announced {dep.announced}"] if dep.announced else []
    when += [f"shutdown {dep.shutdown}"] if dep.shutdown else []
    return f"the catalogue marks {profile.model} deprecated ({', '.join(when)})"


def _provider_words(profile: Profile, check: ProviderCheck) -> list[str]:
    out = []
    if check.shutdown_date:
        out.append(f"{check.endpoint} announces shutdown_date {check.shutdown_date} for {profile.model}")
    if check.listed is False:
        out.append(f"{check.endpoint} no longer lists {profile.model} in /v1/models")
    if check.probe == RETIRED:
        out.append(f"a one-text probe was refused: {check.detail}")
    elif check.probe == UNREACHABLE:
        out.append(f"the provider could not be asked: {check.detail}")
    elif check.probe == "skipped" and check.detail:
        out.append(check.detail)
    return out


def _weights_missing(profile: Profile) -> str | None:
    from embedpipe.profiles import resolve_weights

    try:
        resolve_weights(profile)
    except EmbedpipeError as exc:
        return str(exc).splitlines()[0]
    return None


# --- the provider ------------------------------------------------------------------------------


def ask_provider(settings: Settings, profile: Profile) -> ProviderCheck:
    """``GET /v1/models`` and a one-text probe through the profile's own client."""
    from embedpipe.backends._openai import endpoint
    from embedpipe.backends.hosted import HostedEmbedder

    check = ProviderCheck(endpoint=endpoint(profile))
    try:
        embedder = HostedEmbedder.from_settings(profile, settings)
    except SovereigntyError:
        check.detail = "not asked: sovereign mode sends nothing to a hosted provider"
        return check
    except EmbedpipeError as exc:  # no key, or a key that would cross plain http
        check.probe, check.detail = UNREACHABLE, _first_line(exc)
        return check
    check.listed, check.shutdown_date, check.models_error, down = _listing(embedder.client, profile.model)
    if down:  # the endpoint did not answer at all: a probe would only wait as long again
        check.probe, check.detail = UNREACHABLE, check.models_error or "no answer"
        return check
    try:
        embedder.check()
    except ModelDeprecated as exc:
        check.probe, check.detail = RETIRED, _http_words(exc)
    except EmbedpipeError as exc:  # timeouts, 5xx, a refused key: the model may be fine
        check.probe, check.detail = UNREACHABLE, _first_line(exc)
    else:
        check.probe = "ok"
    return check


def _listing(client: Any, model: str) -> tuple[bool | None, str | None, str | None, bool]:
    """(listed, shutdown_date, error, down) from ``GET /v1/models``; listed is None when
    the endpoint could not be read (a server without it, a 5xx), and ``down`` says the
    server did not answer at all (a timeout, a refused connection)."""
    from embedpipe.backends._openai import classify

    try:
        cards = list(client.models.list())
    except Exception as exc:
        failure = classify(exc)
        if failure is None:
            raise
        return None, None, f"GET /v1/models: {failure.reason}", failure.kind in ("timeout", "connection")
    card = next((c for c in cards if getattr(c, "id", None) == model), None)
    if card is None:
        return False, None, None, False
    announced = _parse_date(getattr(card, "shutdown_date", None))
    return True, announced.isoformat() if announced else None, None, False


def _parse_date(value: Any) -> dt.date | None:
    """A card's ``shutdown_date``: ``YYYY-MM-DD``, an ISO timestamp or Unix seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.date):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        log.warning("ignoring a shutdown_date that is not a date: %r", str(value)[:40])
        return None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _http_words(exc: ModelDeprecated) -> str:
    """``HTTP 404 model_not_found`` (or ``HTTP 410``) out of the retired-model error."""
    found = re.search(r"\((HTTP \d{3}[^)]*)\)", str(exc))
    return found.group(1) if found else _first_line(exc)


# --- the way out ---------------------------------------------------------------------------------


def _way_out(settings: Settings, version: Version, row: WatchRow) -> None:
    """Fill the row's plan, adapter and actions."""
    adapter = _active_adapter(settings, version)
    row.adapter = adapter
    if row.status != OK and row.replacement and row.replacement != row.profile:
        row.plan, row.plan_error = _plan(settings, row.index, row.replacement)
    if adapter is not None:
        retention = adapter.get("retention")
        row.adapter_note = (f"adapter {adapter['id']} via {adapter['profile']}"
                            + (f" (retention {retention:.2f})" if isinstance(retention, (int, float)) else "")
                            + (", forced past its gate" if adapter.get("forced") else ""))
    elif row.status == OK:
        row.adapter_note = "-"
    elif row.replacement:
        row.adapter_note = (f"no adapter: `embedpipe adapt --index {row.index} --to {row.replacement}` "
                            "would keep search up")
    else:
        row.adapter_note = "no adapter (no replacement known to adapt to)"
    row.actions = _actions(row) if row.needs_action else []


def _active_adapter(settings: Settings, version: Version) -> dict[str, Any] | None:
    """The live version's accepted query adapter, as the report shows it; None when there
    is none."""
    from embedpipe.adapters import active_adapter

    try:
        found = active_adapter(settings, version)
    except EmbedpipeError as exc:
        log.warning("index %r: adapter records unreadable: %s", version.index, _first_line(exc))
        return None
    if found is None:
        return None
    return {"id": found.id, "profile": found.profile, "kind": getattr(found, "kind", None),
            "retention": getattr(found, "retention", None), "forced": bool(getattr(found, "forced", False))}


PLAN_FIELDS = ("to_profile", "documents", "to_embed", "reusable", "tokens", "estimated_usd",
               "estimated_seconds", "probe_docs_per_s", "warnings")


def _plan(settings: Settings, index: str, to: str) -> tuple[dict[str, Any] | None, str | None]:
    """``migrate --dry-run``'s plan to ``to`` (nothing billed, nothing written), or why
    there is none (weights missing, an unknown or retired target...)."""
    from embedpipe.migration import plan_migration

    try:
        plan = plan_migration(settings, index, to, dry_run=True).to_dict()
    except EmbedpipeError as exc:
        return None, _first_line(exc)
    return {k: plan[k] for k in PLAN_FIELDS}, None


def describe_plan(plan: dict[str, Any] | None) -> str:
    """``1,400 docs, $0.0046, ~2 min``: a plan in a table cell."""
    if not plan:
        return "-"
    usd = "cost unknown" if plan["estimated_usd"] is None else f"${plan['estimated_usd']:,.4f}"
    return f"{plan['to_embed']:,} docs to embed, {usd}, {_duration(plan['estimated_seconds'])}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "time unknown"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 5400 else f"~{seconds / 3600:.1f} h"


def _actions(row: WatchRow) -> list[str]:
    """The commands to run, in order: keep search up, then migrate."""
    index, out = row.index, []
    if row.status == UNKNOWN_PROFILE:
        return [f"define [profiles.{row.profile}] again in embedpipe.toml (the live version was built "
                f"by it), or migrate: `embedpipe migrate --to PROFILE --index {index}`"]
    if row.status == UNREACHABLE:
        detail = (row.provider_check or {}).get("detail") or "the model cannot be reached"
        out.append(f"{detail}; until that is fixed its queries fail")
    if not row.replacement:
        out.append(f"pick a replacement from `embedpipe models`, set replacement = \"NAME\" under "
                   f"[profiles.{row.profile}.deprecation], then `embedpipe migrate --to NAME --index {index}`")
        return out
    if row.adapter is None and row.status != UNREACHABLE:
        out.append(f"keep search up now: `embedpipe adapt --index {index} --to {row.replacement}`")
    plan = f" ({describe_plan(row.plan)})" if row.plan else (
        f" (no plan: {row.plan_error})" if row.plan_error else "")
    out.append(f"migrate: `embedpipe migrate --to {row.replacement} --index {index}`{plan}")
    return out


# --- the record ------------------------------------------------------------------------------


def _record_path(data_dir: Path) -> Path:
    return Layout(Path(data_dir)).watch_report


def _record(data_dir: Path, report: WatchReport, complete: bool) -> None:
    """Merge the report's rows into ``last.json``; a ``complete`` check (every live index)
    drops the rows of indexes that are no longer live."""
    with _record_lock:
        kept = {} if complete else dict((last_report(data_dir) or {}).get("rows", {}))
        kept.update({row.index: row.to_dict() for row in report.rows})
        write_json(_record_path(data_dir), {"schema": SCHEMA, "checked_at": report.checked_at,
                                            "warn_days": report.warn_days, "rows": kept})


def last_report(data_dir: Path) -> dict[str, Any] | None:
    """The recorded checks: ``{checked_at, warn_days, rows: {index: row}}``, or None."""
    try:
        raw = json.loads(_record_path(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA or not isinstance(raw.get("rows"), dict):
        return None
    return raw


def last_row(data_dir: Path, index: str, fingerprint: str) -> WatchRow | None:
    """The last check of ``index`` while it was live in this embedding space (a check of
    a version since replaced says nothing about this one)."""
    raw = ((last_report(data_dir) or {}).get("rows") or {}).get(index)
    if not isinstance(raw, dict) or raw.get("fingerprint") != fingerprint:
        return None
    try:
        return WatchRow.from_dict(raw)
    except TypeError:
        return None


def watch_warnings(data_dir: Path, index: str, fingerprint: str) -> list[str]:
    """The last check's warning for a live index, when it found something to do."""
    row = last_row(data_dir, index, fingerprint)
    return [row.warning()] if row is not None and row.needs_action else []
