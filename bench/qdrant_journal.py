"""Writing Cranfield's points into Qdrant local mode: SQLite's rollback journal (qdrant-client's
default) against the write-ahead log embedpipe sets (``embedpipe.qdrant.prefer_wal``).

Why: Qdrant local mode commits every point on its own, and the writer thread doing it shares
the cores with the model. The build profile (issue 7) put this commit at most of the writer's
CPU; this script measures the change that came of it, before and after, side by side.

Each round, for each journal mode in turn (ABBA across rounds): a fresh data dir, a version
created by ``IndexVersions.create_version`` (which sets WAL; the ``rollback`` side then sets
``PRAGMA journal_mode=DELETE`` on the file again, as qdrant-client leaves it), then the points
written by ``IndexVersions.upsert`` in chunks of 256 as the pipeline's writer does. The points
are Cranfield's documents with the payload embedpipe writes (id, hashes, metadata, text) and
seeded random unit vectors of 384 dims (the write cost does not depend on their values).
Timed: wall clock and the thread's CPU (``time.thread_time``) of the upserts alone; checked:
every point is there after reopening.

Run from the repository root::

    make bench-journal
    .venv/bin/python bench/qdrant_journal.py [--rounds 6]

Results go to ``bench/results/qdrant_journal.json`` (``--output``); exits 0.
"""

from __future__ import annotations

import hashlib
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "qdrant_journal.json"
PACKAGES = ("embedpipe", "qdrant-client")
MODES = ("rollback", "wal")
CHUNK = 256  # the pipeline's chunk: one upsert per chunk
DIMS = 384


def points(docs: list[common.Doc], seed: int = 7) -> tuple[list[str], np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(docs), DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    payloads = []
    for d in docs:
        content = hashlib.sha256(d.text.encode()).hexdigest()
        payloads.append({"id": d.id, "content_hash": content,
                         "record_hash": hashlib.sha256((content + d.id).encode()).hexdigest(),
                         "metadata": {}, "text": d.text})
    return [d.id for d in docs], vectors, payloads


def write_once(mode: str, ids: list[str], vectors: np.ndarray, payloads: list[dict]) -> dict:
    from embedpipe.config import load_settings
    from embedpipe.index import IndexVersions
    from embedpipe.engine.server import ServerEngine
    from embedpipe.qdrant import close_all, connect

    with tempfile.TemporaryDirectory(prefix="embedpipe-journal-") as data_dir:
        settings = load_settings(config=None, env={"EMBEDPIPE_DATA_DIR": data_dir})
        versions = IndexVersions(ServerEngine(connect(settings), settings), settings)
        version = versions.create_version("bench", settings.profile("local-minilm"), "fp")
        storage = settings.qdrant_path / "collection" / version.collection / "storage.sqlite"
        if mode == "rollback":
            con = sqlite3.connect(storage)
            con.execute("PRAGMA journal_mode=DELETE")
            con.close()
        t0, c0 = time.perf_counter(), time.thread_time()
        for start in range(0, len(ids), CHUNK):
            end = start + CHUNK
            versions.upsert(version.collection, ids[start:end], vectors[start:end],
                            payloads[start:end])
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        close_all()
        journal = sqlite3.connect(storage).execute("PRAGMA journal_mode").fetchone()[0]
        count = IndexVersions(ServerEngine(connect(settings), settings), settings).count(version.collection)
        close_all()
    return {"wall_s": wall, "cpu_s": cpu, "journal_mode": journal, "points_after_reopen": count}


def main(argv: list[str] | None = None) -> int:
    started = common.start(argv, __doc__, DEFAULT_OUTPUT)
    if started is None:
        return 0
    args, command = started
    docs, empty = common.load_docs(args.cranfield, args.limit)
    ids, vectors, payloads = points(docs)
    write_once("wal", ids[:CHUNK], vectors[:CHUNK], payloads[:CHUNK])  # warm-up: imports, caches

    rounds = []
    for r in range(args.rounds):
        order = MODES if r % 4 in (0, 3) else MODES[::-1]  # ABBA
        figures = {mode: write_once(mode, ids, vectors, payloads) for mode in order}
        rounds.append({"order": list(order), **figures})
        print(f"round {r + 1}: " + "  ".join(
            f"{m} {figures[m]['wall_s']:.2f} s wall {figures[m]['cpu_s']:.2f} s cpu" for m in MODES),
            flush=True)

    summary: dict[str, Any] = {}
    for mode in MODES:
        summary[mode] = {key: statistics.median(r[mode][key] for r in rounds)
                         for key in ("wall_s", "cpu_s")}
        summary[mode]["all_points_back"] = all(r[mode]["points_after_reopen"] == len(ids)
                                               for r in rounds)
    ratio = {key: summary["wal"][key] / summary["rollback"][key] for key in ("wall_s", "cpu_s")}

    print(f"\n{len(ids)} points, {CHUNK} per upsert, medians of {args.rounds} rounds")
    print(f"{'journal':<10} {'wall s':>8} {'cpu s':>8}  all points back")
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:<10} {s['wall_s']:>8.3f} {s['cpu_s']:>8.3f}  {s['all_points_back']}")
    print(f"wal / rollback: wall {ratio['wall_s']:.2f}, cpu {ratio['cpu_s']:.2f}")

    result = {**common.run_header(command, Path.cwd(), docs, empty, args.rounds),
              "chunk": CHUNK, "dims": DIMS, "median": summary, "wal_to_rollback": ratio,
              "per_round": rounds}
    common.write_result(args.output, result, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
