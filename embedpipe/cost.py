"""Build or buy: what hosted embeddings cost, from the usage ledger, against self-hosting.

``embedpipe cost report`` is made of these plain functions:

1. **usage**: tokens and USD per month, profile, kind and API (sync or batch) from the
   ledger (``usage.py``), and the month-over-month trend of hosted embedding volume;
2. **volume**: the mean month of the window (tokens, inputs, tokens per input) and what
   it costs on the hosted profiles, synchronously and through the Batch API. Prices are
   applied only by ``Profile.usd`` (the ledger's own USD is shown too: what was billed);
3. **local**: the hours a local profile needs for that volume, at a throughput measured
   by a short probe on this machine with the profile's real model (or one the user
   passes), times an hourly price from the catalogue (``configs/gpus.toml``). Two ways
   to pay for the machine: **on demand** (billed only while it embeds) and **reserved**
   (``gpu_hours_per_month`` billed whatever the volume, 730 for a box kept 24/7);
4. **migrations**: the one-off cost of moving each live index, from the migration plan
   (``migration.plan_migration``, a dry run that writes nothing): to the hosted profile
   synchronously and in batch, and to the local profile (its plan's own probe, or the
   given throughput, times the hourly price);
5. **break-even**: the monthly volume above which self-hosting is cheaper, and the
   months until the local migration pays for itself; and the cumulative cost of each
   option month by month (the plot's series).

What the local cost leaves out, said in every report: engineering and operations time,
storage, network, idle time between jobs (on-demand mode), and more machines than one.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.errors import ConfigError, EmbedpipeError, InputError, NothingToMigrate
from embedpipe.usage import UsageLedger, UsageRecord

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.profiles import Profile

__all__ = [
    "CostReport",
    "Gpu",
    "IndexMove",
    "Throughput",
    "build_report",
    "break_even",
    "cumulative_series",
    "gpu_price",
    "load_gpus",
    "monthly_usage",
    "probe_throughput",
    "trend",
]

HOURS_PER_MONTH = 730.0  # 24 * 365 / 12: a machine reserved all month
HORIZON_MONTHS = 24


# --- the hourly-price catalogue ---------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One row of ``configs/gpus.toml``: a machine's on-demand price and where it came from."""

    name: str
    usd_per_hour: float
    source: str = ""
    date: str = ""
    description: str = ""


def _gpus_path() -> Path:
    """The packaged table in a wheel, else ``configs/gpus.toml`` of a source checkout."""
    packaged = Path(__file__).with_name("gpus.toml")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "configs" / "gpus.toml"


def load_gpus(path: Path | None = None) -> dict[str, Gpu]:
    """The hourly-price table, keyed by row name."""
    import tomllib

    path = path or _gpus_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"the GPU price table is missing at {path}; reinstall embedpipe") from exc
    out = {}
    for name, row in (data.get("gpus") or {}).items():
        price = row.get("usd_per_hour")
        if not isinstance(price, (int, float)) or price < 0:
            raise ConfigError(f"{path}: gpus.{name}.usd_per_hour must be a number >= 0")
        out[name] = Gpu(name, float(price), str(row.get("source", "")), str(row.get("date", "")),
                        str(row.get("description", "")))
    return out


def gpu_price(name: str | None, usd_per_hour: float | None) -> Gpu | None:
    """The machine to price local hours with: a catalogue row, the row with its price
    overridden, or a price alone (``None`` when neither is given)."""
    if name is None:
        if usd_per_hour is None:
            return None
        return Gpu("custom", usd_per_hour, "--gpu-usd-per-hour", dt.date.today().isoformat())
    gpus = load_gpus()
    if name not in gpus:
        raise ConfigError(f"unknown --gpu {name!r}; known: {', '.join(sorted(gpus))} "
                          "(or pass --gpu-usd-per-hour X)")
    row = gpus[name]
    if usd_per_hour is None:
        return row
    return Gpu(row.name, usd_per_hour, "--gpu-usd-per-hour", dt.date.today().isoformat(),
               row.description)


# --- usage from the ledger --------------------------------------------------------------


@dataclass(frozen=True)
class MonthRow:
    """Usage of one (month, profile, kind, api) from the ledger."""

    month: str  # YYYY-MM
    profile: str
    model: str
    kind: str
    api: str
    requests: int
    inputs: int
    tokens: int
    usd: float  # as billed (the price in force when each request was made)


def _records(ledger: UsageLedger, since: dt.date | None) -> list[UsageRecord]:
    start = since.isoformat() if since else ""
    return [r for r in ledger.records() if r.day >= start]


def monthly_usage(records: Iterable[UsageRecord]) -> list[MonthRow]:
    """Requests, inputs, tokens and billed USD per (month, profile, kind, api), oldest first."""
    sums: dict[tuple[str, str, str, str], list[Any]] = {}
    for rec in records:
        key = (rec.ts[:7], rec.profile, rec.kind, rec.api)
        row = sums.setdefault(key, [rec.model, 0, 0, 0, 0.0])
        row[1] += rec.requests
        row[2] += rec.inputs
        row[3] += rec.tokens
        row[4] += rec.usd
    return [MonthRow(k[0], k[1], v[0], k[2], k[3], v[1], v[2], v[3], round(v[4], 10))
            for k, v in sorted(sums.items())]


def _months_between(first: str, last: str) -> list[str]:
    """Every YYYY-MM from first to last inclusive (months with no usage count as zero)."""
    year, month = int(first[:4]), int(first[5:7])
    out = []
    while f"{year:04d}-{month:02d}" <= last:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


@dataclass(frozen=True)
class MonthTotal:
    """Hosted embedding volume of one month, priced both ways."""

    month: str
    tokens: int
    inputs: int
    usd_billed: float
    usd_sync: float  # the same tokens, all through synchronous requests
    usd_batch: float  # the same tokens, all through the Batch API
    tokens_change_pct: float | None  # against the month before (None: no month before, or it was 0)
    usd_change_pct: float | None


def _pct(now: float, before: float | None) -> float | None:
    if not before:
        return None
    return round((now - before) / before * 100, 1)


def _price_row(row: MonthRow, profiles: dict[str, Profile]) -> tuple[float, float]:
    """(sync USD, batch USD) of a row's tokens; a profile no longer configured keeps
    what was billed for both (its price is unknown now)."""
    profile = profiles.get(row.profile)
    if profile is None:
        return row.usd, row.usd
    sync = profile.usd(row.tokens)
    batch = profile.usd(row.tokens, batch=True)
    return (row.usd if sync is None else sync), (row.usd if batch is None else batch)


def trend(rows: Sequence[MonthRow], profiles: dict[str, Profile]) -> list[MonthTotal]:
    """Hosted embedding tokens and USD per month (every month of the span, empty ones as
    0), with the change against the month before."""
    emb = [r for r in rows if r.kind == "embeddings"]
    if not emb:
        return []
    totals: dict[str, list[float]] = {m: [0, 0, 0.0, 0.0, 0.0]
                                      for m in _months_between(emb[0].month, emb[-1].month)}
    for r in emb:
        sync, batch = _price_row(r, profiles)
        t = totals[r.month]
        t[0] += r.tokens
        t[1] += r.inputs
        t[2] += r.usd
        t[3] += sync
        t[4] += batch
    out: list[MonthTotal] = []
    for month, (tokens, inputs, billed, sync, batch) in totals.items():
        before = out[-1] if out else None
        out.append(MonthTotal(month, int(tokens), int(inputs), round(billed, 6), round(sync, 6),
                              round(batch, 6), _pct(tokens, before.tokens if before else None),
                              _pct(billed, before.usd_billed if before else None)))
    return out


@dataclass(frozen=True)
class Volume:
    """The mean month of the window: what the comparison prices."""

    months: int
    tokens_per_month: float
    inputs_per_month: float
    tokens_per_input: float
    usd_billed_per_month: float
    usd_sync_per_month: float
    usd_batch_per_month: float
    hosted_profile: str | None  # the hosted embedding profile with the most tokens


def mean_volume(months: Sequence[MonthTotal], rows: Sequence[MonthRow]) -> Volume:
    n = max(len(months), 1)
    tokens = sum(m.tokens for m in months)
    inputs = sum(m.inputs for m in months)
    by_profile: dict[str, int] = {}
    for r in rows:
        if r.kind == "embeddings":
            by_profile[r.profile] = by_profile.get(r.profile, 0) + r.tokens
    top = max(by_profile, key=lambda p: by_profile[p]) if by_profile else None
    return Volume(
        months=len(months),
        tokens_per_month=tokens / n,
        inputs_per_month=inputs / n,
        tokens_per_input=tokens / inputs if inputs else 0.0,
        usd_billed_per_month=sum(m.usd_billed for m in months) / n,
        usd_sync_per_month=sum(m.usd_sync for m in months) / n,
        usd_batch_per_month=sum(m.usd_batch for m in months) / n,
        hosted_profile=top,
    )


# --- local throughput -------------------------------------------------------------------

# Plain English words: probe texts of a chosen length without shipping a corpus.
_WORDS = (
    "the model embeds each document once and stores its vector beside the text so a "
    "later search compares the query with every stored vector in the same space while "
    "engineers measure how many documents per second a machine can handle before the "
    "index grows too large for one server and the team decides whether to rent more "
    "hardware or keep paying for hosted requests at a price per million tokens"
).split()
PROBE_TEXTS = 128


@dataclass(frozen=True)
class Throughput:
    """How fast the local profile embeds, in the ledger's units (tiktoken tokens)."""

    docs_per_s: float
    tokens_per_s: float
    tokens_per_doc: float  # of the texts measured (or the ledger's tokens per input)
    source: str  # "probe" (measured here) or "given" (--throughput)
    device: str  # where the probe ran ("cpu (2 cores)", "cuda (NVIDIA L4)"), or "given"
    texts: int = 0  # texts the probe embedded


def probe_texts(tokens: int, n: int = PROBE_TEXTS, seed: int = 0) -> list[str]:
    """``n`` distinct texts of about ``tokens`` tiktoken tokens each (one word ~ one token)."""
    import random

    rng = random.Random(seed)
    words = max(int(tokens), 1)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(n)]


def _device_name(embedder: Any) -> str:
    import os

    device = str(getattr(embedder, "device", "server"))
    if device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    if device == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return device


def probe_throughput(settings: Settings, profile: Profile, tokens_per_input: float,
                     n: int = PROBE_TEXTS) -> Throughput:
    """Time ``profile``'s real model on ``n`` texts as long as the ledger's average input
    (capped at the model's limit: longer inputs are counted as pieces of that size)."""
    from embedpipe.backends import build_embedder
    from embedpipe.tokens import TokenCounter

    cap = profile.max_tokens or 512
    texts = probe_texts(min(max(tokens_per_input, 1.0), cap), n)
    tokens = sum(TokenCounter().count(texts))
    embedder = build_embedder(profile, settings)
    embedder.embed_documents(texts[:2])  # warm-up: loading and first-call costs are not throughput
    start = time.perf_counter()
    embedder.embed_documents(texts)
    seconds = max(time.perf_counter() - start, 1e-6)
    return Throughput(round(n / seconds, 3), round(tokens / seconds, 3), round(tokens / n, 2),
                      "probe", _device_name(embedder), n)


def given_throughput(docs_per_s: float, tokens_per_input: float) -> Throughput:
    """A throughput the user measured (documents/s), in tokens/s at the ledger's tokens per input."""
    return Throughput(docs_per_s, round(docs_per_s * tokens_per_input, 3),
                      round(tokens_per_input, 2), "given", "given")


# --- the local comparison ----------------------------------------------------------------


@dataclass(frozen=True)
class Local:
    """The mean month's volume on one machine of the local profile."""

    profile: str
    model: str
    gpu: Gpu
    throughput: Throughput
    hours_per_month: float  # of embedding work for the mean month's tokens
    usd_per_month_on_demand: float  # those hours, billed while the machine works
    gpu_hours_per_month: float  # hours paid in reserved mode, whatever the volume
    usd_per_month_reserved: float
    capacity_tokens_per_month: float  # what the reserved hours can embed
    usd_per_million_tokens: float  # on demand: the hourly price over tokens per hour


def local_month(profile: Profile, volume: Volume, throughput: Throughput, gpu: Gpu,
                gpu_hours_per_month: float) -> Local:
    hours = volume.tokens_per_month / throughput.tokens_per_s / 3600
    return Local(
        profile=profile.name,
        model=profile.model,
        gpu=gpu,
        throughput=throughput,
        hours_per_month=round(hours, 6),
        usd_per_month_on_demand=round(hours * gpu.usd_per_hour, 6),
        gpu_hours_per_month=gpu_hours_per_month,
        usd_per_month_reserved=round(gpu_hours_per_month * gpu.usd_per_hour, 6),
        capacity_tokens_per_month=round(gpu_hours_per_month * 3600 * throughput.tokens_per_s),
        usd_per_million_tokens=round(gpu.usd_per_hour / (throughput.tokens_per_s * 3600) * 1e6, 6),
    )


# --- the one-off cost of moving each live index -------------------------------------------


@dataclass
class IndexMove:
    """Moving one live index: hosted (sync and batch) and local, from migration plans."""

    index: str
    live_profile: str
    documents: int = 0
    hosted_profile: str | None = None
    hosted_tokens: int | None = None  # exact (tiktoken), texts without a stored vector
    usd_sync: float | None = None
    usd_batch: float | None = None
    local_profile: str | None = None
    local_texts: int | None = None  # texts the local model would embed
    local_hours: float | None = None
    usd_local: float | None = None
    notes: list[str] = field(default_factory=list)


def live_indexes(settings: Settings) -> dict[str, str]:
    """index -> profile of its live version; opens no engine where none was ever made."""
    from embedpipe.layout import Layout

    if settings.qdrant.url is None and not Layout(settings.data_dir).engine.exists():
        return {}
    from embedpipe.index import IndexVersions

    versions = IndexVersions.open(settings)
    out = {}
    for index in sorted(versions.aliases()):
        live = versions.live(index)
        if live is not None:
            out[index] = live.profile
    return out


def _plan(move: IndexMove, settings: Settings, to: Profile, probe: bool) -> tuple[Any, bool]:
    """(the dry-run migration plan of ``move``'s index to ``to``, whether the index is
    live there already); the plan is None with the reason noted on ``move`` otherwise."""
    from embedpipe.migration import plan_migration

    try:
        return plan_migration(settings, move.index, to.name, dry_run=True, probe=probe), False
    except NothingToMigrate:
        move.notes.append(f"already live on {to.name}")
        return None, True
    except EmbedpipeError as exc:
        move.notes.append(f"no plan to {to.name}: {exc}")
        return None, False


def _hosted_move(move: IndexMove, settings: Settings, hosted: Profile) -> None:
    move.hosted_profile = hosted.name
    plan, live = _plan(move, settings, hosted, probe=False)
    if live:
        move.hosted_tokens, move.usd_sync, move.usd_batch = 0, 0.0, 0.0
    if plan is None:
        return
    move.documents = plan.documents
    move.hosted_tokens = plan.tokens
    move.usd_sync = hosted.usd(plan.tokens)
    move.usd_batch = hosted.usd(plan.tokens, batch=True)


def _local_move(move: IndexMove, settings: Settings, local: Profile, gpu: Gpu,
                given: Throughput | None) -> None:
    move.local_profile = local.name
    # The plan's probe times the model on this index's own texts; a given rate needs none.
    plan, live = _plan(move, settings, local, probe=given is None)
    if live:
        move.local_texts, move.local_hours, move.usd_local = 0, 0.0, 0.0
    if plan is None:
        return
    move.documents = plan.documents
    move.local_texts = plan.to_embed
    seconds = plan.to_embed / given.docs_per_s if given else plan.estimated_seconds
    if seconds is not None:
        move.local_hours = round(seconds / 3600, 9)
        move.usd_local = round(seconds / 3600 * gpu.usd_per_hour, 10)


def migration_costs(settings: Settings, hosted: Profile | None, local: Profile | None,
                    gpu: Gpu | None, given: Throughput | None) -> list[IndexMove]:
    """The one-off cost of moving each live index to each option (dry-run plans: nothing
    is written and nothing billable is sent)."""
    moves = []
    for index, profile in live_indexes(settings).items():
        move = IndexMove(index, profile)
        if hosted is not None:
            _hosted_move(move, settings, hosted)
        if local is not None and gpu is not None:
            _local_move(move, settings, local, gpu, given)
        moves.append(move)
    return moves


# --- break-even and the cumulative series ---------------------------------------------------


def _months_to_pay_off(extra_one_off: float, saving: float) -> float | None:
    """Months until self-hosting's extra one-off cost is saved back (None: never)."""
    if extra_one_off <= 0:
        return 0.0 if saving >= 0 else None
    return round(extra_one_off / saving, 6) if saving > 0 else None


def break_even(volume: Volume, local: Local, one_off_local: float,
               one_off_hosted: dict[str, float] | None = None) -> dict[str, Any]:
    """Where self-hosting starts to pay, against the hosted price sync and batch.

    On demand, both costs grow linearly with volume, so the break-even volume is 0 (local
    is cheaper per token) or none at all. Reserved, the machine costs the same every month:
    above ``reserved_usd / hosted price per token`` tokens a month it is cheaper, as long
    as one machine can embed that much (``capacity_tokens_per_month``). The months to pay
    off count from the moves: self-hosting's one-off less staying hosted's (0 when every
    index is live on the hosted profile already)."""
    out: dict[str, Any] = {}
    one_off_hosted = one_off_hosted or {}
    for api in ("sync", "batch"):
        hosted_month = volume.usd_sync_per_month if api == "sync" else volume.usd_batch_per_month
        per_token = hosted_month / volume.tokens_per_month if volume.tokens_per_month else 0.0
        reserved_volume = local.usd_per_month_reserved / per_token if per_token else None
        local_per_token = local.usd_per_million_tokens / 1e6
        extra = one_off_local - one_off_hosted.get(api, 0.0)
        out[api] = {
            "hosted_usd_per_million_tokens": round(per_token * 1e6, 6),
            "on_demand_volume_tokens_per_month": 0 if local_per_token < per_token else None,
            "reserved_volume_tokens_per_month": None if reserved_volume is None else round(reserved_volume),
            "reserved_fits_one_machine": (reserved_volume is not None
                                          and reserved_volume <= local.capacity_tokens_per_month),
            "on_demand_months_to_pay_off": _months_to_pay_off(
                extra, hosted_month - local.usd_per_month_on_demand),
            "reserved_months_to_pay_off": _months_to_pay_off(
                extra, hosted_month - local.usd_per_month_reserved),
        }
    return out


def _horizon(payoffs: Iterable[float | None]) -> int:
    """24 months, longer (up to 60) when a migration pays off later than month 20."""
    late = [p for p in payoffs if p is not None and p > HORIZON_MONTHS * 5 / 6]
    return min(60, math.ceil(max(late) * 1.25)) if late else HORIZON_MONTHS


def cumulative_series(volume: Volume, local: Local | None, one_off: dict[str, float],
                      months: int = HORIZON_MONTHS) -> dict[str, list[float]]:
    """Cumulative USD after 0..months months for each option: the one-off move at month
    0, then the mean month's cost every month."""
    monthly = {"hosted_sync": volume.usd_sync_per_month, "hosted_batch": volume.usd_batch_per_month}
    if local is not None:
        monthly["self_hosted_on_demand"] = local.usd_per_month_on_demand
        monthly["self_hosted_reserved"] = local.usd_per_month_reserved
    series: dict[str, list[float]] = {"month": list(range(months + 1))}
    for name, per_month in monthly.items():
        start = one_off.get(name, 0.0)
        series[name] = [round(start + m * per_month, 10) for m in range(months + 1)]
    return series


# --- the report ----------------------------------------------------------------------------


@dataclass
class CostReport:
    """Everything ``embedpipe cost report`` prints; ``to_dict`` is its ``--json``."""

    since: str | None
    ledger: str
    months: list[MonthRow]
    trend: list[MonthTotal]
    volume: Volume | None
    local: Local | None = None
    migrations: list[IndexMove] = field(default_factory=list)
    one_off_usd: dict[str, float] = field(default_factory=dict)
    break_even: dict[str, Any] | None = None
    series: dict[str, list[float]] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _assumptions(local: Local | None, volume: Volume) -> list[str]:
    out = [
        f"the mean month of the window ({volume.months} month(s), empty months count as 0) "
        "stands for every future month",
        "hosted USD uses each profile's price now (Profile.usd); usd_billed is what the "
        "ledger recorded at the price in force then",
        "hosted batch assumes every request could wait for the Batch API (up to 24 h)",
    ]
    if local is not None:
        t = local.throughput
        how = (f"measured here on {t.device} ({t.texts} texts of ~{t.tokens_per_doc:.0f} tokens)"
               if t.source == "probe" else "given with --throughput")
        out += [
            f"one machine at {t.tokens_per_s:,.0f} tokens/s ({t.docs_per_s:,.1f} docs/s), {how}",
            f"on demand: the machine is billed only while it embeds ({local.gpu.name}, "
            f"${local.gpu.usd_per_hour}/h); reserved: {local.gpu_hours_per_month:g} h billed "
            "every month whatever the volume",
            "left out of the local cost: engineering and operations time, storage, network, "
            "start-up and idle time between jobs",
            "migrations: one-off re-embedding of the texts without a stored vector, from "
            "`embedpipe migrate --dry-run` plans",
        ]
    return out


def _resolve_local(settings: Settings, compare: str) -> Profile:
    profile = settings.profile(compare)  # an unknown name lists the known ones
    if profile.is_hosted:
        local = sorted(n for n, p in settings.profiles.items() if not p.is_hosted)
        raise ConfigError(f"--compare {compare!r} is a hosted profile; compare against a local "
                          f"one (known: {', '.join(local)})")
    return profile


def _default_gpu(settings: Settings, profile: Profile, given: float | None) -> Gpu:
    """Without --gpu: this machine's own kind when it is a CPU that the probe runs on."""
    if given is None and profile.is_local:
        from embedpipe.backends.local import pick_device

        if pick_device(settings.device) == "cpu":
            return load_gpus()["cpu-2vcpu"]
    raise ConfigError("pass --gpu NAME (see configs/gpus.toml) or --gpu-usd-per-hour X to "
                      "price the local machine")


def check_inputs(settings: Settings, since: dt.date | None, compare: str | None,
                 gpu: str | None, gpu_usd_per_hour: float | None,
                 throughput: float | None) -> tuple[list[UsageRecord], Profile | None, Gpu | None]:
    """Everything a report needs that the user can get wrong, checked before any slow work."""
    ledger = UsageLedger(settings.data_dir)
    if not ledger.path.is_file():
        raise InputError(f"no usage ledger at {ledger.path}: nothing hosted has been billed "
                         "yet (hosted ingests, migrations and searches record there)")
    records = _records(ledger, since)
    if not records:
        raise InputError(f"the ledger has no usage since {since}; pass an earlier --since")
    local = _resolve_local(settings, compare) if compare else None
    price = gpu_price(gpu, gpu_usd_per_hour)
    if local is not None and price is None:
        price = _default_gpu(settings, local, throughput)
    return records, local, price


def build_report(settings: Settings, since: dt.date | None = None, compare: str | None = None,
                 gpu: str | None = None, gpu_usd_per_hour: float | None = None,
                 throughput: float | None = None,
                 gpu_hours_per_month: float = HOURS_PER_MONTH) -> CostReport:
    """The build-vs-buy report. Writes nothing; the only work it does is the local probe
    (and each local migration plan's probe) unless ``throughput`` is given."""
    records, local_profile, price = check_inputs(settings, since, compare, gpu,
                                                 gpu_usd_per_hour, throughput)
    rows = monthly_usage(records)
    months = trend(rows, settings.profiles)
    report = CostReport(since.isoformat() if since else None,
                        str(UsageLedger(settings.data_dir).path), rows, months, None)
    if not months:
        report.warnings.append("no hosted embedding usage in the window: nothing to compare")
        return report
    report.volume = volume = mean_volume(months, rows)
    hosted = settings.profiles.get(volume.hosted_profile or "")
    if local_profile is not None and price is not None:
        rate = (given_throughput(throughput, volume.tokens_per_input) if throughput
                else probe_throughput(settings, local_profile, volume.tokens_per_input))
        report.local = local_month(local_profile, volume, rate, price, gpu_hours_per_month)
    report.migrations = migration_costs(settings, hosted, local_profile, price,
                                        report.local.throughput if throughput and report.local else None)
    report.one_off_usd = _one_off(report.migrations)
    _finish(report, volume)
    return report


def _one_off(moves: Sequence[IndexMove]) -> dict[str, float]:
    total = {"hosted_sync": 0.0, "hosted_batch": 0.0, "self_hosted": 0.0}
    for m in moves:
        total["hosted_sync"] += m.usd_sync or 0.0
        total["hosted_batch"] += m.usd_batch or 0.0
        total["self_hosted"] += m.usd_local or 0.0
    return {k: round(v, 10) for k, v in total.items()}


def _finish(report: CostReport, volume: Volume) -> None:
    """Break-even, the series, the assumptions and the warnings."""
    local = report.local
    one_off = dict(report.one_off_usd)
    one_off["self_hosted_on_demand"] = one_off["self_hosted_reserved"] = one_off.pop("self_hosted")
    horizon = HORIZON_MONTHS
    if local is not None:
        report.break_even = break_even(volume, local, one_off["self_hosted_on_demand"],
                                       {"sync": one_off["hosted_sync"], "batch": one_off["hosted_batch"]})
        horizon = _horizon(v for api in report.break_even.values()
                           for k, v in api.items() if k.endswith("months_to_pay_off"))
    report.series = cumulative_series(volume, local, one_off, horizon)
    report.assumptions = _assumptions(local, volume)
    if local is not None:
        report.warnings += _local_warnings(local, volume)
    for m in report.migrations:
        report.warnings += [f"{m.index}: {n}" for n in m.notes if n.startswith("no plan")]


def _local_warnings(local: Local, volume: Volume) -> list[str]:
    out = []
    t = local.throughput
    if t.source == "probe" and t.device.startswith("cpu") and not local.gpu.name.startswith("cpu"):
        out.append(f"the throughput was measured on this machine's {t.device} but is priced at "
                   f"{local.gpu.name}'s hourly rate; a GPU embeds many times faster: pass "
                   "--throughput DOCS_PER_S measured on that GPU")
    if local.hours_per_month > local.gpu_hours_per_month:
        out.append(f"the mean month needs {local.hours_per_month:,.0f} machine hours, more than the "
                   f"{local.gpu_hours_per_month:g} reserved: one machine cannot keep up")
    return out


# --- the plot -------------------------------------------------------------------------------

PLOT_SIZE_IN = (8.0, 4.5)
PLOT_DPI = 100  # so the PNG is 800 x 450 pixels
_LABELS = {
    "hosted_sync": "hosted, synchronous",
    "hosted_batch": "hosted, Batch API",
    "self_hosted_on_demand": "self-hosted, billed while working",
    "self_hosted_reserved": "self-hosted, reserved",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'embedpipe[plot]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> Any:
    """Refuse a plot file that cannot be written, and a missing matplotlib, before any
    slow work; returns pyplot."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot {path}: write a .png file (e.g. cost.png)")
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: folder {path.parent} does not exist")
    return _pyplot()


def plot_report(report: CostReport, path: Path) -> Path:
    """Cumulative USD against months for each option, break-even points marked; written
    to ``path`` (a PNG of ``PLOT_SIZE_IN`` x ``PLOT_DPI`` pixels) through a temporary file."""
    import os

    path = Path(path)
    plt = check_plot_path(path)
    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    try:
        _draw(ax, report)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def _draw(ax: Any, report: CostReport) -> None:
    series = report.series
    months = series.get("month", [])
    for key, label in _LABELS.items():
        if key in series:
            ax.plot(months, series[key], label=label, linewidth=2,
                    linestyle="--" if key.endswith("batch") or key.endswith("reserved") else "-")
    for mode in ("on_demand", "reserved"):
        payoff = (report.break_even or {}).get("sync", {}).get(f"{mode}_months_to_pay_off")
        if payoff is not None and payoff <= months[-1]:
            cost = series["hosted_sync"][0] + payoff * (series["hosted_sync"][1] - series["hosted_sync"][0])
            ax.plot([payoff], [cost], marker="o", markersize=9, color="black", zorder=5)
            ax.annotate(f"break-even ({mode.replace('_', ' ')}): {payoff:.1f} months", (payoff, cost),
                        textcoords="offset points", xytext=(10, 10), fontsize=8)
    local = report.local
    title = "Cumulative embedding cost"
    if local is not None:
        title += f": hosted vs {local.profile} on {local.gpu.name} (${local.gpu.usd_per_hour}/h)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("months from now")
    ax.set_ylabel("cumulative USD")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
