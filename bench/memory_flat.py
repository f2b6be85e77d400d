"""Peak memory of an embedpipe build as the corpus grows: 10,000 and 100,000 documents.

Why: Qdrant local mode keeps every point in RAM (its vectors and payloads), so a local
build's memory must grow by what Qdrant stores; the rest of the pipeline (reading,
staging, diffing, embedding windows, the Parquet stores) must stay flat. Goal: peak RSS at
100k minus Qdrant's own stored bytes within 1.2x of the same at 10k.

In a temporary folder: the static model (distilled from the bundled MiniLM with model2vec
by ``_common.distill_static``) and one JSONL corpus per size (``id``, ``text``; texts of
60-150 words drawn by a seeded RNG from the Cranfield vocabulary, or from a seeded built-in
word list without it, each ending with its record number so every text is unique), all
written before any measured process starts. Then, per size, a fresh process (this script
with ``--job``) that imports embedpipe, notes its RSS (the baseline), runs the library
``embedpipe.ingest.ingest`` into an empty data dir (profile ``static``, CPU, defaults
otherwise: ``store_text`` on, window 2048), and reads its peak RSS (``VmHWM``; not
``ru_maxrss``, which Linux carries over from the spawning process) before anything else.
Only then does it count what Qdrant stores: points x dims x 4 bytes of float32 vectors,
plus the payload bytes (``len(json.dumps(payload))`` summed over every point, scrolled
from the collection). Qdrant local mode holds more than that, so the job also sizes
what it really keeps (read from qdrant-client's private structures): its vector buffers
(grown by doubling through ``np.resize``, whose result is a view that keeps a larger
buffer alive), its payloads as Python objects and its id maps; and how much RSS closing
its client gives back (after ``gc`` and ``malloc_trim``).

A sampling thread (psutil, every 10 ms) follows RSS during the ingest; a few of
embedpipe's steps are wrapped (measurement only, behaviour unchanged) so the report shows
RSS at the start and end of each step and the highest sample inside it.

Reported per size: peak RSS, the baseline after imports, Qdrant's stored bytes (vectors
and payload apart), pipeline = peak - Qdrant bytes (the goal's measure), stricter, peak -
baseline - Qdrant bytes, and peak - what Qdrant really holds; then the ratio of each
between the largest and the smallest size, against 1.2. RSS is robust to other load on the machine; the seconds are not.

Run from the repository root::

    .venv/bin/python bench/memory_flat.py [--sizes 10000,100000]

Results go to ``bench/results/memory_flat.json`` (``--output``). Exits 1 if a run failed
(its error kept in the file).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import random
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

DEFAULT_OUTPUT = common.RESULTS / "memory_flat.json"
DEFAULT_SIZES = "10000,100000"
SEED = 20260114
INDEX = "bench"
PROFILE = "static"
DIMS = 256
GOAL = 1.2
MIB = 1024 * 1024
SAMPLE_S = 0.01
WORDS = (60, 150)
PACKAGES = ("embedpipe", "qdrant-client", "pyarrow", "numpy", "torch", "sentence-transformers",
            "model2vec", "psutil")
# embedpipe steps timed and sampled in the job: (module, object in it, attribute).
PHASES = (
    ("embedpipe.ingest", None, "stage"),
    ("embedpipe.corpus", "CorpusStore", "known"),
    ("embedpipe.ingest", None, "_diff"),
    ("embedpipe.ingest", None, "_ids"),
    ("embedpipe.ingest", None, "embed_and_write"),
    ("embedpipe.ingest", None, "_commit_corpus"),
    ("embedpipe.index", "IndexVersions", "go_live"),
    ("embedpipe.ingest", None, "_compact_unless_migrating"),
)


# --------------------------------------------------------------------------- corpus


def vocabulary(cranfield: Path) -> tuple[list[str], str]:
    """Distinct words of the Cranfield abstracts, else a seeded list of made-up words."""
    if common.missing_cranfield(cranfield) is None:
        docs, _ = common.parse_cranfield(cranfield)
        words = sorted({w for d in docs for w in re.findall(r"[a-z]{2,}", d.text.lower())})
        return words, f"Cranfield vocabulary ({len(words)} words)"
    rng = random.Random(SEED)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(8000)})
    return words, f"built-in seeded word list ({len(words)} words; Cranfield not found)"


def write_corpus(path: Path, n: int, words: list[str]) -> int:
    """``n`` unique documents as JSONL (streamed; nothing kept in memory). Returns bytes."""
    rng = random.Random(f"{SEED}:{n}")
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(rng.choices(words, k=rng.randint(*WORDS)))
            fh.write(json.dumps({"id": f"doc-{i:06d}", "text": f"{text} (record {i})"}) + "\n")
    return path.stat().st_size


def write_config(folder: Path, model_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "embedpipe.toml"
    config.write_text(
        f'data_dir = "data"\ndefault_profile = "{PROFILE}"\n'
        + common.static_profile_toml(model_dir, PROFILE)
        + f'\n[indexes.{INDEX}]\nprofile = "{PROFILE}"\n', encoding="utf-8")
    return config


# --------------------------------------------------------------------------- job (child)


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak RSS so far, in bytes: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: on Linux that survives ``exec`` and starts at the RSS of the
    process that spawned this one (here, the parent holding the distilled model).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Sampler:
    """RSS every ``SAMPLE_S`` seconds on a daemon thread, as (monotonic time, bytes)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss()))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def highest(self, start: float, end: float) -> int | None:
        inside = [b for t, b in self.samples if start <= t <= end]
        return max(inside) if inside else None


def wrap_phases(log: list[dict[str, Any]]) -> Callable[[], None]:
    """Wrap the ``PHASES`` steps to log their times and RSS; returns an undo function."""
    import importlib

    undo: list[Callable[[], None]] = []
    for module_name, owner_name, attr in PHASES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attr)
        name = f"{owner_name}.{attr}" if owner_name else attr

        def wrapper(*args: Any, __f: Any = original, __n: str = name, **kwargs: Any) -> Any:
            entry = {"phase": __n, "start": time.monotonic(), "rss_start": rss()}
            try:
                return __f(*args, **kwargs)
            finally:
                entry.update(end=time.monotonic(), rss_end=rss(), peak_so_far=peak_rss())
                log.append(entry)

        setattr(owner, attr, functools.wraps(original)(wrapper))
        undo.append(functools.partial(setattr, owner, attr, original))
    return lambda: [u() for u in undo]


def qdrant_bytes(settings: Any, collection: str) -> dict[str, int]:
    """Points, vector bytes (points x dims x 4) and payload bytes (JSON) Qdrant stores."""
    from embedpipe.qdrant import connect

    client = connect(settings)  # embedpipe's cached client: nothing is reloaded
    points = payload = 0
    offset = None
    while True:
        batch, offset = client.scroll(collection, limit=4096, offset=offset,
                                      with_payload=True, with_vectors=False)
        points += len(batch)
        payload += sum(len(json.dumps(p.payload).encode()) for p in batch)
        if offset is None:
            break
    dims = client.get_collection(collection).config.params.vectors.size
    return {"points": points, "dims": dims, "vector_bytes": points * dims * 4,
            "payload_bytes": payload}


def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of ``obj`` and of every dict, list, str and number inside it, each counted once."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        size += sum(deep_size(v, seen) for v in obj)
    return size


def array_bytes(array: Any) -> int:
    """Bytes of the buffer an array lives in (a view keeps its whole base alive)."""
    while getattr(array, "base", None) is not None and hasattr(array.base, "nbytes"):
        array = array.base
    return int(array.nbytes)


def qdrant_resident(settings: Any, collection: str) -> dict[str, int] | None:
    """What Qdrant local mode really holds for the collection: its vector buffers (spare
    capacity and retained bases included), its payload objects and its id maps. Reads
    qdrant-client's private structures; None if they are not where expected."""
    from embedpipe.qdrant import connect

    try:
        col = connect(settings)._client.collections[collection]
        seen: set[int] = set()
        return {
            "vectors": sum(array_bytes(a) for a in col.vectors.values()),
            "vector_slots": sum(int(a.shape[0]) for a in col.vectors.values()),
            "payload_objects": deep_size(col.payload, seen),
            "ids": deep_size(col.ids, seen) + deep_size(col.ids_inv, seen)
            + array_bytes(col.deleted)
            + sum(array_bytes(a) for a in col.deleted_per_vector.values()),
        }
    except (AttributeError, KeyError, TypeError):
        return None


def released_on_close() -> dict[str, int]:
    """RSS before and after closing embedpipe's Qdrant clients (collected and trimmed)."""
    from embedpipe.qdrant import close_all

    trim()
    before = rss()
    close_all()
    trim()
    return {"rss_before_close": before, "rss_after_close": rss(),
            "released_bytes": before - rss()}


def phase_report(log: list[dict[str, Any]], sampler: Sampler, t0: float) -> list[dict[str, Any]]:
    out = []
    for e in sorted(log, key=lambda e: e["start"]):
        sampled = sampler.highest(e["start"], e["end"])
        out.append({"phase": e["phase"], "start_s": round(e["start"] - t0, 3),
                    "seconds": round(e["end"] - e["start"], 3), "rss_start": e["rss_start"],
                    "rss_end": e["rss_end"],
                    "rss_highest_sample": max(x for x in (sampled, e["rss_start"], e["rss_end"])
                                              if x is not None),
                    "peak_so_far": e["peak_so_far"]})
    return out


def job(config: Path, jsonl: Path, size: int) -> dict[str, Any]:
    """One build of ``jsonl`` in this (fresh) process; see the module docstring."""
    t_import = perf_counter()
    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest

    import_s = perf_counter() - t_import
    trim()
    baseline = rss()
    log: list[dict[str, Any]] = []
    undo = wrap_phases(log)
    settings = load_settings(config=config, env=os.environ)
    with Sampler() as sampler:
        t0 = time.monotonic()
        started = perf_counter()
        report = ingest(settings, INDEX, jsonl, profile=PROFILE)
        seconds = perf_counter() - started
        peak = peak_rss()  # before anything else allocates
        end = rss()
    undo()
    stored = qdrant_bytes(settings, report.collection)
    resident = qdrant_resident(settings, report.collection)
    return {
        "size": size, "seconds": seconds, "import_s": import_s,
        "baseline_rss": baseline, "peak_rss": peak, "rss_at_end": end,
        "peak_sampled_rss": max(b for _, b in sampler.samples),
        "samples": len(sampler.samples),
        "qdrant": {**stored, "collection": report.collection, "resident": resident,
                   **released_on_close()},
        "report": {k: getattr(report, k) for k in
                   ("documents", "added", "embedded", "reused", "failed", "truncated", "seconds")},
        "phases": phase_report(log, sampler, t0),
    }


# --------------------------------------------------------------------------- parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated corpus sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--cranfield", type=Path, default=common.DEFAULT_CRANFIELD,
                        help="folder holding cran.all.1400, for the vocabulary "
                             f"(default {common.DEFAULT_CRANFIELD})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes must be integers separated by commas, not {args.sizes!r}")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--sizes must name at least one size of 1 or more")
    args.cranfield = args.cranfield.expanduser().resolve()
    args.output = args.output.expanduser().resolve()
    return args


def child_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(EMBEDPIPE_CACHE_DIR=str(work / "cache"), PREFECT_HOME=str(work / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def spawn(config: Path, jsonl: Path, size: int, env: dict[str, str]) -> dict[str, Any]:
    """Run one job in a fresh process; its JSON report, or the error."""
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--job",
           str(config), str(jsonl), str(size)]
    t0 = perf_counter()
    proc = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True)
    run: dict[str, Any] = {"size": size, "process_wall_s": perf_counter() - t0,
                           "returncode": proc.returncode}
    try:
        run["job"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
            else None
    except (json.JSONDecodeError, IndexError):
        run["job"] = None
    if run["job"] is None:
        run["error"] = {"command": shlex.join(cmd), "stdout_tail": proc.stdout[-2000:],
                        "stderr_tail": proc.stderr[-4000:]}
    return run


def figures(job_: dict[str, Any]) -> dict[str, Any]:
    """The measures of one size, in bytes."""
    q = job_["qdrant"]
    stored = q["vector_bytes"] + q["payload_bytes"]
    resident = sum(q["resident"].values()) - q["resident"]["vector_slots"] \
        if q.get("resident") else None
    return {"peak_rss": job_["peak_rss"], "baseline_rss": job_["baseline_rss"],
            "qdrant_vector_bytes": q["vector_bytes"], "qdrant_payload_bytes": q["payload_bytes"],
            "qdrant_stored_bytes": stored, "qdrant_resident": q.get("resident"),
            "qdrant_resident_bytes": resident, "qdrant_released_on_close": q["released_bytes"],
            "pipeline": job_["peak_rss"] - stored,
            "pipeline_strict": job_["peak_rss"] - job_["baseline_rss"] - stored,
            "pipeline_vs_resident": job_["peak_rss"] - resident if resident else None,
            "points": q["points"], "embedded": job_["report"]["embedded"],
            "seconds": job_["seconds"]}


RATIOS = (("pipeline", "peak - Qdrant stored"),
          ("pipeline_strict", "peak - base - Qdrant stored"),
          ("pipeline_vs_resident", "peak - Qdrant resident"))


def ratios(per_size: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Largest size against smallest, for each view of pipeline memory, against GOAL."""
    if len(per_size) < 2:
        return {}
    lo, hi = per_size[min(per_size)], per_size[max(per_size)]
    out: dict[str, Any] = {"from": min(per_size), "to": max(per_size), "goal": GOAL}
    for key, _ in RATIOS:
        r = hi[key] / lo[key] if lo[key] and hi[key] else None
        out[key] = {"ratio": r, "meets_goal": r is not None and r <= GOAL}
    return out


def print_table(per_size: dict[int, dict[str, Any]], rat: dict[str, Any]) -> None:
    cols = ("size", "peak", "base", "q vec", "q payld", "pipeline", "strict", "q RAM",
            "peak-qRAM", "points", "secs")
    head = f"{cols[0]:>7} " + " ".join(f"{c:>9}" for c in cols[1:])
    print("\npeak RSS of one build in a fresh process, MiB. q vec, q payld: what Qdrant local "
          "mode stores\n(points x dims x 4; payload JSON); pipeline = peak - q vec - q payld; "
          "strict = pipeline - base;\nq RAM: what Qdrant local mode really holds (vector "
          "buffers, payload objects, id maps)")
    print(head + "\n" + "-" * len(head))
    for size, f in sorted(per_size.items()):
        mib = [f[k] / MIB if f[k] is not None else float("nan") for k in
               ("peak_rss", "baseline_rss", "qdrant_vector_bytes", "qdrant_payload_bytes",
                "pipeline", "pipeline_strict", "qdrant_resident_bytes", "pipeline_vs_resident")]
        print(f"{size:>7} " + " ".join(f"{m:>9.1f}" for m in mib)
              + f" {f['points']:>9} {f['seconds']:>9.1f}")
    for key, label in RATIOS:
        if key in rat and rat[key]["ratio"] is not None:
            print(f"{label:<28} {rat['to']} / {rat['from']}: {rat[key]['ratio']:.3f}  "
                  f"(goal <= {GOAL}: {'met' if rat[key]['meets_goal'] else 'NOT met'})")


def print_phases(run: dict[str, Any]) -> None:
    print(f"\nsteps of the {run['size']} build (RSS MiB at start / end / highest sample; "
          "peak so far)")
    for p in run["job"]["phases"]:
        print(f"  {p['phase']:<26} {p['seconds']:>7.2f} s  {p['rss_start'] / MIB:>7.1f} "
              f"{p['rss_end'] / MIB:>7.1f} {p['rss_highest_sample'] / MIB:>7.1f}   "
              f"{p['peak_so_far'] / MIB:>7.1f}")


def prepare(work: Path, sizes: list[int], cranfield: Path) -> tuple[Path, dict[int, Path], str]:
    """The static model, the config and one JSONL per size, made before any job runs."""
    words, source = vocabulary(cranfield)
    print(f"vocabulary: {source}", flush=True)
    corpora: dict[int, Path] = {}
    for n in sizes:
        corpora[n] = work / f"corpus-{n}.jsonl"
        size = write_corpus(corpora[n], n, words)
        print(f"wrote {n} documents ({size / MIB:.1f} MiB JSONL)", flush=True)
    t0 = perf_counter()
    model_dir = common.distill_static(work / "static")
    print(f"distilled the static model in {perf_counter() - t0:.1f} s", flush=True)
    return model_dir, corpora, source


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:
        print(json.dumps(job(Path(argv[1]), Path(argv[2]), int(argv[3]))))
        return 0
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    load_at_start = list(os.getloadavg())
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-memory-") as tmp:
        work = Path(tmp)
        model_dir, corpora, source = prepare(work, args.sizes, args.cranfield)
        env = child_env(work)
        for n in args.sizes:  # each size its own empty data dir and process
            run = spawn(write_config(work / f"build-{n}", model_dir), corpora[n], n, env)
            runs.append(run)
            if run.get("error"):
                print(f"{n:>8} FAILED (exit {run['returncode']}): "
                      f"{run['error']['stderr_tail'].strip()[-800:]}", flush=True)
            else:
                print(f"{n:>8} built in {run['job']['seconds']:.1f} s, peak RSS "
                      f"{run['job']['peak_rss'] / MIB:.1f} MiB", flush=True)

    ok = [r for r in runs if not r.get("error")]
    per_size = {r["size"]: figures(r["job"]) for r in ok}
    rat = ratios(per_size)
    for r in ok:
        print_phases(r)
    print_table(per_size, rat)
    result = {
        "command": command, "argv": sys.argv, "cwd": str(Path.cwd()), "sizes": args.sizes,
        "seed": SEED, "index": INDEX, "words_per_text": list(WORDS), "vocabulary": source,
        "model": "static (model2vec distilled from all-MiniLM-L6-v2, 256 dims), CPU",
        "loadavg_at_start": load_at_start,
        "measure": "peak_rss = VmHWM of the job process after ingest() returned; "
                   "baseline_rss = RSS after importing embedpipe.ingest (collected, trimmed); "
                   "qdrant stored = points*dims*4 + sum(len(json.dumps(payload)))",
        "goal": f"pipeline (peak - Qdrant stored) at the largest size within {GOAL}x of the "
                "smallest",
        "ratios": rat, "per_size": per_size, "runs": runs,
    }
    common.write_result(args.output, result, PACKAGES)
    return 0 if len(ok) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
