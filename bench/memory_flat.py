"""Peak memory of an embedpipe build as the corpus grows: 10,000 and 100,000 documents.

Why: the rest of the pipeline (reading, staging, diffing, embedding windows, the Parquet
stores) must stay flat as the corpus grows; only what the vector engine itself stores
may grow with it. The engine is Qdrant Edge, in the build's own process: its segments
(the float32 vectors and the payloads among them) live in memory-mapped files, whose
pages count in RSS as file-backed memory the kernel can write back and drop. What
embedpipe has Edge keep in RAM is the int8 copy of every vector (``[qdrant] quantization
= "int8"``, the default; ``always_ram``): points x dims bytes, counted whether or not
Edge has quantized the segment yet (Qdrant quantizes a segment when it optimizes it; the
report's ``indexed`` says whether that happened at a size). Goal: the peak anonymous RSS
of the build minus those int8 bytes at the largest size within 1.2x of the same at the
smallest. Whatever else Edge keeps on the heap (its id tracker, the HNSW graph while it
builds it, payload indexes, the WAL's buffers) is not taken out: it counts against the
pipeline, so the measure is if anything strict.

In a temporary folder: the static model (distilled from the bundled MiniLM with model2vec
by ``_common.distill_static``) and one JSONL corpus per size (``id``, ``text``; texts of
60-150 words drawn by a seeded RNG from the Cranfield vocabulary, or from a seeded built-in
word list without it, each ending with its record number so every text is unique), all
written before any measured process starts. Then, per size, a fresh process (this script
with ``--job``) that imports embedpipe, notes its RSS (the baseline: ``RssAnon``,
``RssFile``, ``VmRSS`` of ``/proc/self/status``), runs the library
``embedpipe.ingest.ingest`` into an empty data dir (profile ``static``, CPU, defaults
otherwise: Qdrant Edge, ``store_text`` on, window 2048), and reads its peak RSS (``VmHWM``,
anonymous and file-backed together; not ``ru_maxrss``, which Linux carries over from the
spawning process) before anything else. Only then does it count what Edge stores, through
embedpipe's engine API (``IndexVersions.open(settings).engine``, the engine the build
opened): points x dims x 4 bytes of float32 vectors, plus the payload bytes
(``len(json.dumps(payload))`` summed over every point, scrolled from the version), the
int8 bytes it keeps in RAM (points x dims; 0 with ``quantization = "none"``) and
``engine.info`` (segments, vectors in the HNSW index, bytes on disk).

The kernel keeps no high-water mark of anonymous memory alone, so the parent samples
the job's ``/proc/<pid>/status`` (``RssAnon``, ``RssFile``, ``VmRSS``) every 10 ms from a
thread of its own, from spawn to exit: a thread inside the job would stall while Edge's
optimize (the HNSW build) holds the interpreter. Both processes read the same monotonic
clock, so only the samples between the start and the end of ``ingest()`` count. The peak
anonymous RSS is the highest of those samples and of the job's own readings at the start
and end of each wrapped step: a rise and fall shorter than a sampling interval can be
missed (the JSON keeps the sample count and the longest gap). A few of embedpipe's steps
are wrapped (measurement only, behaviour unchanged) so the report shows anonymous and
file-backed RSS at the start and end of each step, the highest samples inside it and
``VmHWM`` so far.

Reported per size: peak RSS (``VmHWM``), the peak anonymous and file-backed RSS sampled,
the baseline after imports, Edge's stored bytes (float32 vectors and payload apart) and
its int8 bytes in RAM; pipeline = peak anonymous - int8 in RAM (the goal's measure),
stricter, that less the anonymous baseline; and, as before, peak (``VmHWM``) - stored
(which with Edge counts whatever mapped pages the build touched: for comparison with the
earlier figures, not the goal). Then the ratio of each between the largest and the
smallest size, against 1.2. RSS is robust to other load on the machine; the seconds are
not.

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
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
PACKAGES = ("embedpipe", "qdrant-edge-py", "pyarrow", "numpy", "torch", "sentence-transformers",
            "model2vec")
# embedpipe steps timed and sampled in the job: (module, object in it, attribute).
PHASES = (
    ("embedpipe.ingest", None, "stage"),
    ("embedpipe.corpus", "CorpusStore", "known"),
    ("embedpipe.ingest", None, "_diff"),
    ("embedpipe.ingest", None, "_ids"),
    ("embedpipe.ingest", None, "embed_and_write"),
    ("embedpipe.ingest", None, "_commit_corpus"),
    ("embedpipe.index", "IndexVersions", "build_index"),
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


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon`` and ``RssFile`` of a process, in bytes
    (``/proc/<pid>/status``); raises OSError once the process has gone."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(value.split()[0]) * 1024
    return out


def peak_rss() -> int:
    """This process's peak RSS so far, in bytes: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: on Linux that survives ``exec`` and starts at the RSS of the
    process that spawned this one (here, the parent holding the distilled model).
    """
    try:
        return proc_status()["VmHWM"]
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
            at = proc_status()
            entry = {"phase": __n, "start": time.monotonic(), "anon_start": at["RssAnon"],
                     "file_start": at["RssFile"]}
            try:
                return __f(*args, **kwargs)
            finally:
                at = proc_status()
                entry.update(end=time.monotonic(), anon_end=at["RssAnon"],
                             file_end=at["RssFile"], peak_so_far=at["VmHWM"])
                log.append(entry)

        setattr(owner, attr, functools.wraps(original)(wrapper))
        undo.append(functools.partial(setattr, owner, attr, original))
    return lambda: [u() for u in undo]


def engine_bytes(settings: Any, space: str) -> dict[str, Any]:
    """What Qdrant Edge stores for ``space``, through embedpipe's engine API: points,
    float32 vector bytes (points x dims x 4), payload bytes (JSON, scrolled), the int8
    bytes it keeps in RAM (points x dims when quantized) and ``engine.info``."""
    from embedpipe.index import IndexVersions

    versions = IndexVersions.open(settings)  # the engine the build opened (cached per process)
    engine = versions.engine
    info = engine.info(space)
    points = payload = 0
    for page in engine.scroll(space, True):
        points += len(page)
        payload += sum(len(json.dumps(p).encode()) for _, p in page)
    dims = int(engine.manifests()[space]["dims"])
    quantization = settings.qdrant.quantization
    return {"engine": engine.kind, "points": points, "dims": dims,
            "vector_bytes": points * dims * 4, "payload_bytes": payload,
            "quantization": quantization,
            "in_ram_bytes": points * dims if quantization == "int8" else 0,
            "info": {"points": info.points, "segments": info.segments, "indexed": info.indexed,
                     "disk_bytes": info.disk_bytes}}


def job(config: Path, jsonl: Path, size: int) -> dict[str, Any]:
    """One build of ``jsonl`` in this (fresh) process; see the module docstring."""
    t_import = perf_counter()
    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest

    import_s = perf_counter() - t_import
    trim()
    baseline = proc_status()
    log: list[dict[str, Any]] = []
    undo = wrap_phases(log)
    settings = load_settings(config=config, env=os.environ)
    build_start = time.monotonic()
    started = perf_counter()
    report = ingest(settings, INDEX, jsonl, profile=PROFILE)
    seconds = perf_counter() - started
    build_end = time.monotonic()
    at_end = proc_status()  # VmHWM before anything else allocates
    undo()
    return {
        "size": size, "seconds": seconds, "import_s": import_s,
        "build_start": build_start, "build_end": build_end,
        "baseline": baseline, "at_end": at_end, "peak_rss": at_end["VmHWM"],
        "stored": {**engine_bytes(settings, report.collection), "collection": report.collection},
        "report": {k: getattr(report, k) for k in
                   ("documents", "added", "embedded", "reused", "failed", "truncated", "seconds")},
        "phases": sorted(log, key=lambda e: e["start"]),
    }


# --------------------------------------------------------------------------- parent


class Sampler:
    """``RssAnon``, ``RssFile`` and ``VmRSS`` of process ``pid`` every ``SAMPLE_S`` seconds,
    read from ``/proc/<pid>/status`` on a thread of this process (a thread inside the job
    would stall while Edge's optimize holds its interpreter), as (monotonic time, anon,
    file, rss); it ends when the process does."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = proc_status(self.pid)
                self.samples.append((time.monotonic(), s["RssAnon"], s["RssFile"], s["VmRSS"]))
            except (OSError, KeyError, ValueError):  # gone (or a zombie without those lines)
                return
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def inside(self, start: float, end: float) -> list[tuple[float, int, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end]


def sampled(sampler: Sampler, job_: dict[str, Any]) -> dict[str, Any]:
    """The highest anonymous, file-backed and total RSS of the build, from the parent's
    samples between the start and the end of ``ingest()`` and the job's own readings
    at its steps' edges and when it returned."""
    start, end = job_["build_start"], job_["build_end"]
    inside = sampler.inside(start, end)
    edges = [(e["anon_start"], e["file_start"]) for e in job_["phases"]] \
        + [(e["anon_end"], e["file_end"]) for e in job_["phases"]] \
        + [(job_["at_end"]["RssAnon"], job_["at_end"]["RssFile"])]
    times = [start] + [s[0] for s in inside] + [end]
    return {
        "peak_rss_anon": max([s[1] for s in inside] + [a for a, _ in edges]),
        "peak_rss_file": max([s[2] for s in inside] + [f for _, f in edges]),
        "peak_rss_sampled": max((s[3] for s in inside), default=None),
        "samples": len(inside),
        "longest_gap_s": round(max(b - a for a, b in zip(times, times[1:])), 3),
    }


def phase_report(job_: dict[str, Any], sampler: Sampler) -> list[dict[str, Any]]:
    """Each wrapped step: seconds, anonymous and file-backed RSS at its start and end, the
    highest samples inside it, and ``VmHWM`` when it ended."""
    out = []
    for e in job_["phases"]:
        inside = sampler.inside(e["start"], e["end"])
        out.append({
            "phase": e["phase"], "start_s": round(e["start"] - job_["build_start"], 3),
            "seconds": round(e["end"] - e["start"], 3),
            "anon_start": e["anon_start"], "anon_end": e["anon_end"],
            "anon_highest": max([s[1] for s in inside] + [e["anon_start"], e["anon_end"]]),
            "file_start": e["file_start"], "file_end": e["file_end"],
            "file_highest": max([s[2] for s in inside] + [e["file_start"], e["file_end"]]),
            "peak_so_far": e["peak_so_far"], "samples": len(inside)})
    return out


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
    """Run one job in a fresh process, sampled (:class:`Sampler`) from spawn to exit; its
    JSON report with the sampled figures added, or the error."""
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--job",
           str(config), str(jsonl), str(size)]
    t0 = perf_counter()
    # nice execs Python in the same process: the pid sampled is the job's.
    proc = subprocess.Popen(cmd, cwd=config.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with Sampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    run: dict[str, Any] = {"size": size, "process_wall_s": perf_counter() - t0,
                           "returncode": proc.returncode}
    try:
        run["job"] = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
            else None
    except (json.JSONDecodeError, IndexError):
        run["job"] = None
    if run["job"] is None:
        run["error"] = {"command": shlex.join(cmd), "stdout_tail": stdout[-2000:],
                        "stderr_tail": stderr[-4000:]}
    else:
        run["job"]["sampled"] = sampled(sampler, run["job"])
        run["job"]["phases"] = phase_report(run["job"], sampler)
    return run


def figures(job_: dict[str, Any]) -> dict[str, Any]:
    """The measures of one size, in bytes."""
    s, base, peaks = job_["stored"], job_["baseline"], job_["sampled"]
    stored = s["vector_bytes"] + s["payload_bytes"]
    return {"peak_rss": job_["peak_rss"], "peak_rss_anon": peaks["peak_rss_anon"],
            "peak_rss_file": peaks["peak_rss_file"], "baseline_rss": base["VmRSS"],
            "baseline_rss_anon": base["RssAnon"], "baseline_rss_file": base["RssFile"],
            "stored_vector_bytes": s["vector_bytes"], "stored_payload_bytes": s["payload_bytes"],
            "stored_bytes": stored, "edge_in_ram_bytes": s["in_ram_bytes"],
            "pipeline": peaks["peak_rss_anon"] - s["in_ram_bytes"],
            "pipeline_strict": peaks["peak_rss_anon"] - base["RssAnon"] - s["in_ram_bytes"],
            "peak_minus_stored": job_["peak_rss"] - stored,
            "points": s["points"], "segments": s["info"]["segments"],
            "indexed": s["info"]["indexed"], "engine_disk_bytes": s["info"]["disk_bytes"],
            "embedded": job_["report"]["embedded"], "seconds": job_["seconds"],
            "samples": peaks["samples"], "longest_gap_s": peaks["longest_gap_s"]}


RATIOS = (("pipeline", "anon peak - Edge int8 in RAM"),
          ("pipeline_strict", "pipeline - anon base"),
          ("peak_minus_stored", "VmHWM - stored (old)"))


def ratios(per_size: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Largest size against smallest, for each view of pipeline memory, against GOAL (the
    goal is ``pipeline``'s; the others are for comparison)."""
    if len(per_size) < 2:
        return {}
    lo, hi = per_size[min(per_size)], per_size[max(per_size)]
    out: dict[str, Any] = {"from": min(per_size), "to": max(per_size), "goal": GOAL}
    for key, _ in RATIOS:
        r = hi[key] / lo[key] if lo[key] and hi[key] else None
        out[key] = {"ratio": r, "meets_goal": r is not None and r <= GOAL}
    return out


def print_table(per_size: dict[int, dict[str, Any]], rat: dict[str, Any]) -> None:
    cols = ("size", "peak", "anon pk", "file pk", "anon base", "int8 RAM", "pipeline", "strict",
            "st vec", "st payld", "peak-st", "points", "secs")
    head = f"{cols[0]:>7} " + " ".join(f"{c:>9}" for c in cols[1:])
    print("\npeak RSS of one build in a fresh process, MiB. peak: VmHWM; anon pk, file pk: "
          "highest anonymous and\nfile-backed RSS sampled; int8 RAM: Edge's quantized vectors "
          "(points x dims); pipeline = anon pk - int8 RAM\n(the goal's measure); strict = "
          "pipeline - anon base; st vec, st payld: what Edge stores (points x dims x 4;\n"
          "payload JSON); peak-st = peak - st vec - st payld (the measure of the local-mode "
          "runs)")
    print(head + "\n" + "-" * len(head))
    for size, f in sorted(per_size.items()):
        mib = [f[k] / MIB for k in
               ("peak_rss", "peak_rss_anon", "peak_rss_file", "baseline_rss_anon",
                "edge_in_ram_bytes", "pipeline", "pipeline_strict", "stored_vector_bytes",
                "stored_payload_bytes", "peak_minus_stored")]
        print(f"{size:>7} " + " ".join(f"{m:>9.1f}" for m in mib)
              + f" {f['points']:>9} {f['seconds']:>9.1f}")
    for key, label in RATIOS:
        if key in rat and rat[key]["ratio"] is not None:
            goal = f"goal <= {GOAL}: {'met' if rat[key]['meets_goal'] else 'NOT met'}" \
                if key == "pipeline" else "for comparison"
            print(f"{label:<30} {rat['to']} / {rat['from']}: {rat[key]['ratio']:.3f}  ({goal})")


def print_phases(run: dict[str, Any]) -> None:
    print(f"\nsteps of the {run['size']} build (MiB: anonymous RSS at start / end / highest; "
          "file-backed at end / highest; VmHWM so far)")
    for p in run["job"]["phases"]:
        print(f"  {p['phase']:<26} {p['seconds']:>7.2f} s  {p['anon_start'] / MIB:>7.1f} "
              f"{p['anon_end'] / MIB:>7.1f} {p['anon_highest'] / MIB:>7.1f}   "
              f"{p['file_end'] / MIB:>7.1f} {p['file_highest'] / MIB:>7.1f}   "
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
                      f"{run['job']['peak_rss'] / MIB:.1f} MiB (anonymous "
                      f"{run['job']['sampled']['peak_rss_anon'] / MIB:.1f})", flush=True)

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
        "engine": "Qdrant Edge (embedpipe's default), in the build's process",
        "loadavg_at_start": load_at_start,
        "measure": "peak_rss = VmHWM of the job process after ingest() returned; "
                   "peak_rss_anon / peak_rss_file = highest RssAnon / RssFile of the job, "
                   f"sampled by the parent every {SAMPLE_S} s during ingest() and read by the "
                   "job at each wrapped step's start and end; baseline = RssAnon, RssFile, "
                   "VmRSS after importing embedpipe.ingest (collected, trimmed); Edge stored "
                   "= points*dims*4 + sum(len(json.dumps(payload))) scrolled through the "
                   "engine API; edge_in_ram_bytes = points*dims (int8 quantized vectors kept "
                   "in RAM); pipeline = peak_rss_anon - edge_in_ram_bytes",
        "goal": f"pipeline (peak anonymous RSS - Edge's int8 vectors in RAM) at the largest "
                f"size within {GOAL}x of the smallest",
        "ratios": rat, "per_size": per_size, "runs": runs,
    }
    common.write_result(args.output, result, PACKAGES)
    return 0 if len(ok) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
