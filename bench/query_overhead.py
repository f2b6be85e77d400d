"""What ``Index.search`` adds to a query over the same work done by hand: raw
``SentenceTransformer.encode`` of the query and ``query_points`` on the same collection,
with the same model object, in one process, interleaved.

Why: ``bench/build_vs_peers.py`` times each side's query on its own model instance and its
own collection, so differences of a fraction of a millisecond between sides are within its
noise. Here both paths share everything but embedpipe's own code (the pinned live version
and its fingerprint check, the query prompt, the payload selection, ``Hit``), so the
difference is what embedpipe costs per query.

Builds an index of the first ``--limit`` (default 1,398: all) Cranfield abstracts with
``embedpipe.ingest`` (``local-minilm``, CPU), then times, for each of the 225 Cranfield
queries, ``--passes`` times, in a random order drawn per query:

* ``raw``: ``model.encode(q, normalize_embeddings=True)`` then
  ``client.query_points(collection, query=vec.tolist(), limit=10)``, where ``model`` is the
  very object embedpipe loaded and ``client`` its Qdrant client;
* ``embedpipe``: ``Index.search(q, k=10)``;
* and each path's two halves alone (embed; search with a fixed vector), to say where a
  difference comes from.

Reported: p50, p95 and mean per path; the median of the per-query paired differences
embedpipe - raw, with a bootstrap 95% interval. Run from the repository root::

    make bench-query
    .venv/bin/python bench/query_overhead.py [--passes 3]

Results go to ``bench/results/query_overhead.json`` (``--output``); exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "query_overhead.json"
PACKAGES = ("embedpipe", "sentence-transformers", "qdrant-client", "torch")
K = 10
PATHS = ("raw", "embedpipe", "raw embed", "embedpipe embed", "raw search", "embedpipe search")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def paired(a: list[float], b: list[float], seed: int = 11) -> dict[str, float]:
    """Median of b - a over pairs, and a bootstrap 95% interval of that median."""
    diffs = np.asarray(b) - np.asarray(a)
    rng = np.random.default_rng(seed)
    boots = [float(np.median(rng.choice(diffs, diffs.size))) for _ in range(2000)]
    return {"median_ms": float(np.median(diffs)), "ci95_ms": [float(np.percentile(boots, 2.5)),
                                                              float(np.percentile(boots, 97.5))]}


def calls(index: Any) -> dict[str, Callable[[str], Any]]:
    version, embedder = index.live(), index.embedder()
    model, client, collection = embedder.model, index.versions.client, version.collection
    fixed = embedder.embed_query("a fixed probe vector")

    def raw_embed(q: str) -> np.ndarray:
        return model.encode(q, normalize_embeddings=True, convert_to_numpy=True)

    return {
        "raw": lambda q: client.query_points(collection, query=raw_embed(q).tolist(), limit=K).points,
        "embedpipe": lambda q: index.search(q, k=K),
        "raw embed": raw_embed,
        "embedpipe embed": embedder.embed_query,
        "raw search": lambda q: client.query_points(collection, query=fixed.tolist(), limit=K).points,
        "embedpipe search": lambda q: index.versions.search(collection, fixed, K),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3, help="passes over the queries (default 3)")
    parser.add_argument("--limit", type=int, default=None, help="index the first N documents")
    parser.add_argument("--cranfield", type=Path, default=common.DEFAULT_CRANFIELD)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    missing = common.missing_cranfield(args.cranfield)
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return 0
    from embedpipe.config import load_settings
    from embedpipe.evaluation import read_cranfield
    from embedpipe.index import Index
    from embedpipe.ingest import ingest
    from embedpipe.qdrant import close_all

    docs, empty = common.load_docs(args.cranfield, args.limit)
    queries = list(read_cranfield(args.cranfield).queries.values())
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    with tempfile.TemporaryDirectory(prefix="embedpipe-query-") as work:
        jsonl = common.write_jsonl(docs, Path(work) / "docs.jsonl")
        settings = load_settings(config=None, env={"EMBEDPIPE_DATA_DIR": str(Path(work) / "data")})
        ingest(settings, "bench", jsonl, profile="local-minilm")
        index = Index("bench", settings)
        fns = calls(index)
        for fn in fns.values():  # first calls untimed
            fn(queries[0])
        # A fresh random order per query: a fixed rotation would always put the same path
        # after an encode, whose idle OpenMP threads still spin and slow what follows.
        rng = np.random.default_rng(20261129)
        for _ in range(args.passes):
            for q in queries:
                for name in rng.permutation(PATHS):
                    t0 = perf_counter()
                    fns[name](q)
                    samples[name].append((perf_counter() - t0) * 1000)
        close_all()

    stats = {p: {"p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95),
                 "mean_ms": statistics.fmean(v), "n": len(v)} for p, v in samples.items()}
    overhead = {half: paired(samples[f"raw{half}"], samples[f"embedpipe{half}"])
                for half in ("", " embed", " search")}
    print(f"\n{len(queries)} queries x {args.passes} passes, {len(docs)} documents, top {K}")
    print(f"{'path':<18} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    for p in PATHS:
        s = stats[p]
        print(f"{p:<18} {s['p50_ms']:>8.3f} {s['p95_ms']:>8.3f} {s['mean_ms']:>8.3f}")
    for half, o in overhead.items():
        print(f"embedpipe{half} - raw{half}, paired median: {o['median_ms']:+.3f} ms "
              f"(95% CI {o['ci95_ms'][0]:+.3f} to {o['ci95_ms'][1]:+.3f})")

    result = {"command": " ".join([sys.executable, *sys.argv]), "n_docs": len(docs),
              "skipped_empty_ids": empty, "n_queries": len(queries), "passes": args.passes,
              "k": K, "stats": stats,
              "paired_overhead": {f"embedpipe{h} - raw{h}": o for h, o in overhead.items()}}
    common.write_result(args.output.expanduser().resolve(), result, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
