"""The Parquet vector store at scale: a million 384-d vectors in 500 segments, compacted.

Why: every ``VectorStore.add`` appends a segment, so a build leaves hundreds and a year of
daily syncs thousands. Compaction merges them (streamed, one row group at a time), and it
must not hold the store in memory: a million 384-d float32 vectors are ~1.5 GB.

Steps, each in a fresh process (this script with ``--job``) so its peak RSS is its own
(``VmHWM``; ``ru_maxrss`` would carry the parent's over):

1. write: ``--vectors`` random float32 vectors (seeded; content hashes are SHA-256 of
   ``"vector <i>"``, all distinct) through ``VectorStore.add`` in ``--segments`` equal
   calls, with automatic compaction switched off, so the store has one segment a call;
2. read, before: open the store and look up one hash (this loads the hash index), look
   up ``--lookups`` random stored hashes, then ``present()`` of every stored hash (what a
   no-op re-sync asks);
3. compact: ``VectorStore.compact()``, every segment into one;
4. read, after: as step 2, on the compacted store;
5. write with automatic compaction (unless ``--no-auto``): step 1 again into a fresh
   folder with the default threshold, as a build would: total time, how many segments
   are left, and how many compactions ran.

Run from the repository root::

    .venv/bin/python bench/vector_store_scale.py [--vectors 1000000] [--segments 500]

Results go to ``bench/results/vector_store_scale.json`` (``--output``). The data lives in a
temporary folder (``--scratch``), removed at the end unless ``--keep``. Exits 1 if a step
failed (its error kept in the file). Seconds depend on the machine's other load; RSS does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

from _common import REPO, RESULTS, spawn, write_result

FINGERPRINT = "5ca1e" * 12 + "0000"
PACKAGES = ("pyarrow", "numpy")
MIB = 1024 * 1024


def _hashes(n: int) -> list[str]:
    return [hashlib.sha256(f"vector {i}".encode()).hexdigest() for i in range(n)]


def _rss() -> dict[str, float]:
    """This process's resident set now and at its peak, in MiB (from /proc/self/status)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[name].split()[0]) / 1024 for key, name in
            (("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM"))}


def _disk(folder: Path) -> dict[str, Any]:
    segments = sorted(folder.glob("seg-*.parquet"))
    return {"segments": len(segments), "bytes": sum(p.stat().st_size for p in segments)}


def _store(args: argparse.Namespace) -> Any:
    from embedpipe.vectors import VectorStore

    return VectorStore(Path(args.data), FINGERPRINT, args.dims)


def job_write(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from embedpipe import vectors

    compactions = []
    if args.auto:
        real = vectors.VectorStore.compact_if_needed

        def counted(self: Any, threshold: int | None = None) -> Any:
            done = real(self, threshold)
            if done is not None:
                compactions.append(done.rows)
            return done

        vectors.VectorStore.compact_if_needed = counted  # measurement only
    else:
        vectors.COMPACT_AFTER = 10**9  # one segment a call: the state compaction starts from
    hashes = _hashes(args.vectors)
    store = _store(args)
    rng = np.random.default_rng(0)
    per = -(-args.vectors // args.segments)
    base = _rss()
    t0 = perf_counter()
    for start in range(0, args.vectors, per):
        chunk = hashes[start:start + per]
        store.add(chunk, rng.standard_normal((len(chunk), args.dims), dtype=np.float32))
    wall = perf_counter() - t0
    return {"write_s": wall, "baseline_rss_mib": base["rss_mib"], **_rss(),
            "compactions": len(compactions), "rows_rewritten": sum(compactions),
            **_disk(store.folder.root)}


def job_read(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    hashes = _hashes(args.vectors)
    probe = [hashes[i] for i in np.random.default_rng(1).choice(args.vectors, args.lookups, replace=False)]
    base = _rss()
    t0 = perf_counter()
    store = _store(args)
    first = store.lookup([hashes[0]])
    index_s = perf_counter() - t0
    t0 = perf_counter()
    got = store.lookup(probe)
    lookup_s = perf_counter() - t0
    t0 = perf_counter()
    present = store.present(hashes)
    present_s = perf_counter() - t0
    if len(first) != 1 or len(got) != len(probe) or len(present) != len(hashes):
        raise SystemExit(f"wrong answers: {len(first)}, {len(got)}/{len(probe)}, "
                         f"{len(present)}/{len(hashes)}")
    return {"index_s": index_s, "lookup_s": lookup_s, "present_s": present_s,
            "baseline_rss_mib": base["rss_mib"], **_rss(), **_disk(store.folder.root)}


def job_compact(args: argparse.Namespace) -> dict[str, Any]:
    store = _store(args)
    base = _rss()
    t0 = perf_counter()
    done = store.compact()
    wall = perf_counter() - t0
    return {"compact_s": wall, "baseline_rss_mib": base["rss_mib"], **_rss(),
            "merged": done.merged, "rows": done.rows, "dropped": done.dropped,
            **_disk(store.folder.root)}


JOBS = {"write": job_write, "read": job_read, "compact": job_compact}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--no-auto", dest="auto", action="store_false",
                        help="skip step 5 (a write with automatic compaction)")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the data")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    parser.add_argument("--output", type=Path, default=RESULTS / "vector_store_scale.json")
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run(job: str, data: Path, args: argparse.Namespace, auto: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--data", str(data),
           "--vectors", str(args.vectors), "--segments", str(args.segments),
           "--dims", str(args.dims), "--lookups", str(args.lookups)]
    if not auto:
        cmd.append("--no-auto")
    print(f"  {job}{' (automatic compaction)' if auto else ''} ...", flush=True)
    return spawn(cmd, REPO, dict(os.environ))


def _print_table(steps: dict[str, dict[str, Any]], vectors: int) -> None:
    def get(step: str, key: str) -> Any:
        return (steps[step].get("report") or {}).get(key)

    def cell(value: Any, fmt: str) -> str:
        return "failed" if value is None else format(value, fmt)

    rows = [
        ("segments", "segments", "d"),
        ("segment bytes (MiB)", "bytes", ".0f"),
        ("open + first lookup (s)", "index_s", ".2f"),
        ("lookup of random hashes (s)", "lookup_s", ".2f"),
        ("present() of every hash (s)", "present_s", ".2f"),
        ("peak RSS of the step (MiB)", "peak_rss_mib", ".0f"),
    ]
    print(f"\n{'measure':<30} {'before':>10} {'after':>10}")
    print("-" * 52)
    for label, key, fmt in rows:
        before, after = get("read_before", key), get("read_after", key)
        if key == "bytes":
            before, after = (None if v is None else v / MIB for v in (before, after))
        print(f"{label:<30} {cell(before, fmt):>10} {cell(after, fmt):>10}")
    print(f"\n{'step':<30} {'seconds':>10} {'peak RSS':>10}")
    print("-" * 52)
    for label, step, key in [("write (no compaction)", "write", "write_s"),
                             ("compact everything", "compact", "compact_s"),
                             ("write, automatic compaction", "write_auto", "write_s")]:
        if step in steps:
            print(f"{label:<30} {cell(get(step, key), '.1f'):>10} "
                  f"{cell(get(step, 'peak_rss_mib'), '.0f'):>7} MiB")
    if "write_auto" in steps and steps["write_auto"].get("report"):
        auto = steps["write_auto"]["report"]
        print(f"automatic: {auto['compactions']} compactions rewrote {auto['rows_rewritten']:,} rows "
              f"({auto['rows_rewritten'] / vectors:.2f}x the store), "
              f"{auto['segments']} segments left")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        print(json.dumps(JOBS[args.job](args)))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="embedpipe-vector-scale-", dir=args.scratch))
    print(f"{args.vectors:,} vectors of {args.dims} dims in {args.segments} segments, in {scratch}")
    steps: dict[str, dict[str, Any]] = {}
    try:
        steps["write"] = _run("write", scratch / "store", args)
        steps["read_before"] = _run("read", scratch / "store", args)
        steps["compact"] = _run("compact", scratch / "store", args)
        steps["read_after"] = _run("read", scratch / "store", args)
        if args.auto:
            shutil.rmtree(scratch / "store")  # one copy on disk at a time
            steps["write_auto"] = _run("write", scratch / "auto", args, auto=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    _print_table(steps, args.vectors)
    command = shlex.join([".venv/bin/python", "bench/vector_store_scale.py", *sys.argv[1:]])
    write_result(args.output, {"command": command, "vectors": args.vectors, "segments": args.segments,
                               "dims": args.dims, "lookups": args.lookups, "steps": steps}, PACKAGES)
    return 1 if any(s.get("report") is None for s in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
