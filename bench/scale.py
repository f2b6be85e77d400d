"""embedpipe at scale: Qdrant Edge against the old local mode at 100,000 documents, and
Qdrant Edge alone at 1,000,000 (issue 18 item 6).

Why: the engine layer moved the vectors from qdrant-client local mode (every point in
Python memory, searched by brute force in numpy) to Qdrant Edge (memory-mapped segments,
an HNSW index built at the end of a bulk write). This measures what that buys, and
whether a million documents fit the goals below on a small machine.

Corpus: the synthetic documents of ``bench/memory_flat.py`` (``id``, ``text``: 60-150
words drawn by a seeded RNG from the Cranfield vocabulary, or a seeded built-in word list
without it, each ending with its record number) plus one metadata field, ``lang``, drawn
by a second seeded RNG (so the texts are exactly memory_flat's) with skewed frequencies
(``LANGS``: en 50%, de 20%, fr 15%, es 10%, ja 5%). The index is configured with
``[indexes.bench] payload_indexes = {lang = "keyword"}``, so Edge indexes the field
before the HNSW build. Queries: ``--queries`` snippets of 6-12 consecutive words of
seeded random documents (plus 10 more for an untimed warm-up). The static model is
distilled from the bundled MiniLM with model2vec (``_common.distill_static``), in its own
process, before any measured one starts. Everything lives in a temporary folder
(``--scratch``), removed at the end unless ``--keep``.

Per run (an engine at a size), one fresh process (this script with ``--job``):

1. build: ``embedpipe.ingest.ingest`` into an empty data directory (profile ``static``,
   CPU, defaults otherwise), wall time; peak RSS = ``VmHWM`` read as soon as it returns
   (not ``ru_maxrss``: Linux carries the spawning process's over into it), with the
   highest anonymous and file-backed RSS, sampled every 100 ms by the parent until the
   build ends (Edge's segments are memory-mapped files: their pages count as RSS, but
   the kernel can write them back and drop them, unlike anonymous memory); a few of
   embedpipe's steps are wrapped (measurement only) to time them;
2. search by vector: the queries embedded first (``embed_query``), then
   ``IndexVersions.search`` on the live version, k=10, one query at a time: p50, p95;
3. end to end: ``Index.search(text, k=10)`` (the query embed included): p50, p95;
4. filtered: search by vector with ``filter={"lang": L}``, L cycling over ``LANGS``:
   p50, p95, and a check that every hit has that ``lang``;
5. recall@10 of 2 and 4 against exact search (numpy, inner product of the normalized
   vectors) over the vectors the Parquet vector store holds for the corpus (a sample is
   checked against the engine's copies);
6. with ``--ef-sweep``, 2 and 4 again with each ``hnsw_ef`` listed (set on the engine's
   settings in place: a query-time parameter, so the same build serves every value);
7. disk: the engine's folder (``<data>/engine`` for Edge, ``<data>/qdrant`` for local
   mode) as ``st_blocks * 512`` (Edge preallocates sparse files) and as apparent size,
   and the Parquet stores (corpus, vectors) apart.

Then, for Edge runs, the no-op re-sync: another fresh process ingests the same file
again (nothing changed): process wall (spawn to exit) and in-process seconds, embedded
(goal 0), peak RSS.

The old engine: embedpipe's ingest can only open Qdrant Edge (or a server at
``qdrant.url``); to run the very same ingest on qdrant-client local mode, the job for
``local`` replaces ``embedpipe.engine._open`` (what ``engine.connect`` calls to open the
process's engine) so that it returns ``ServerEngine`` over ``embedpipe.qdrant.connect``,
which opens local mode at ``settings.qdrant_path`` when ``qdrant.url`` is unset: what
embedpipe itself does in its tests. It also disables the conversion of an earlier
release's local-mode folder, which would otherwise find that folder and convert it.

Goals: at the large size, search by vector p50 <= 10 ms and p95 <= 40 ms, recall@10 >=
0.95, peak RSS of the build <= 3 GiB, no-op re-sync (process wall) <= 60 s; at the
small size, search by vector p50 at least 10x faster on Edge than on local mode.

Run from the repository root (``make bench-scale``)::

    .venv/bin/python bench/scale.py [--docs-small 100000] [--docs-large 1000000]
        [--skip-large] [--skip-local] [--queries 200] [--hnsw-ef N] [--ef-sweep 128,256]
        [--hnsw-m 16] [--hnsw-ef-construct 100] [--corpus random|topics]
    .venv/bin/python bench/scale.py --quick     # smoke run: 5,000 and 20,000 documents

Results go to ``bench/results/scale.json`` (``--output``; a ``--quick`` run writes into
its scratch folder unless ``--output`` is given). Each run prints its progress on stderr.
Seconds depend on the machine's other load; RSS and recall do not. Exits 1 if a run failed
(its error kept in the file).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import io
import json
import logging
import os
import random
import shlex
import shutil
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
import memory_flat  # noqa: E402 - its corpus: vocabulary, seed, words per text

DEFAULT_OUTPUT = common.RESULTS / "scale.json"
INDEX = "bench"
PROFILE = "static"
DIMS = 256
K = 10
WARMUP = 10
QUERY_WORDS = (6, 12)
# lang values and their frequencies in the corpus (skewed, so filters of very different
# selectivity are measured: 5% of a million is 50,000 points).
LANGS = (("en", 0.50), ("de", 0.20), ("fr", 0.15), ("es", 0.10), ("ja", 0.05))
TOPICS, TOPIC_WORDS, TOPIC_SHARE = 1000, 40, 0.5  # --corpus topics only
QUICK = {"docs_small": 5_000, "docs_large": 20_000}
GOALS = {"p50_ms": 10.0, "p95_ms": 40.0, "recall": 0.95, "peak_rss_bytes": 3 * 2**30,
         "noop_resync_s": 60.0, "speedup_p50": 10.0}
MIB = 2**20
BUILT = "built.json"  # written by a build job into its folder once ingest() returned
LIFTED = "cap-lifted"  # written by the parent once it lifted the build's memory cap
PACKAGES = ("embedpipe", "qdrant-edge-py", "qdrant-client", "pyarrow", "numpy", "torch",
            "sentence-transformers", "model2vec")
# embedpipe steps timed in the jobs (module, object in it or None, attribute); calls of
# one step are summed (the upserts and vector-store writes come once per batch).
PHASES = (
    ("embedpipe.index", "IndexVersions", "open"),
    ("embedpipe.ingest", None, "stage"),
    ("embedpipe.corpus", "CorpusStore", "known"),
    ("embedpipe.ingest", None, "_diff"),
    ("embedpipe.ingest", None, "_ids"),
    ("embedpipe.ingest", None, "embed_and_write"),
    ("embedpipe.index", "IndexVersions", "upsert"),
    ("embedpipe.vectors", "VectorStore", "add"),
    ("embedpipe.ingest", None, "_commit_corpus"),
    ("embedpipe.index", "IndexVersions", "build_index"),
    ("embedpipe.index", "IndexVersions", "go_live"),
    ("embedpipe.index", "IndexVersions", "holdings"),
    ("embedpipe.index", "IndexVersions", "refresh_index"),
    ("embedpipe.ingest", None, "_compact_unless_migrating"),
)


def say(message: str) -> None:
    """Progress on stderr (the parent's log), with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- corpus


def write_corpus(path: Path, n: int, words: list[str], queries: int,
                 kind: str = "random") -> dict[str, Any]:
    """``n`` documents as JSONL: memory_flat's texts (same RNG, same seed) plus ``lang``
    from a second RNG; and the query texts, snippets of seeded random documents.

    ``kind="topics"`` (``--corpus topics``, not the default) draws each text instead
    from one of ``TOPICS`` seeded topics: each word, with probability ``TOPIC_SHARE``,
    from the topic's own ``TOPIC_WORDS`` words, else from the whole vocabulary. Texts
    then cluster by topic as real documents do, where memory_flat's uniform draws make
    every embedding nearly the average one (no neighbourhood structure at all)."""
    rng = random.Random(f"{memory_flat.SEED}:{n}")  # exactly memory_flat.write_corpus's
    topic_rng = random.Random(f"{memory_flat.SEED}:topics")
    topics = [topic_rng.sample(words, TOPIC_WORDS) for _ in range(TOPICS)]
    lang_rng = random.Random(f"{memory_flat.SEED}:lang:{n}")
    pick_rng = random.Random(f"{memory_flat.SEED}:queries:{n}")
    langs, weights = zip(*LANGS)
    wanted = queries + WARMUP
    sources = sorted(pick_rng.sample(range(n), min(n, wanted)))
    picked: dict[int, str] = {}
    counts = dict.fromkeys(langs, 0)
    with path.open("w", encoding="utf-8") as fh:
        todo = iter(sources)
        nxt = next(todo, None)
        for i in range(n):
            if kind == "topics":
                own = topics[topic_rng.randrange(TOPICS)]
                text = " ".join(topic_rng.choice(own) if topic_rng.random() < TOPIC_SHARE
                                else topic_rng.choice(words)
                                for _ in range(topic_rng.randint(*memory_flat.WORDS)))
            else:
                text = " ".join(rng.choices(words, k=rng.randint(*memory_flat.WORDS)))
            lang = lang_rng.choices(langs, weights)[0]
            counts[lang] += 1
            fh.write(json.dumps({"id": f"doc-{i:06d}", "text": f"{text} (record {i})",
                                 "lang": lang}) + "\n")
            if i == nxt:
                picked[i] = text
                nxt = next(todo, None)
    texts = []
    for i in sorted(picked, key=lambda _: pick_rng.random()):  # seeded order, not file order
        ws = picked[i].split()
        size = min(len(ws), pick_rng.randint(*QUERY_WORDS))
        start = pick_rng.randrange(len(ws) - size + 1)
        texts.append({"text": " ".join(ws[start:start + size]), "from": f"doc-{i:06d}"})
    return {"bytes": path.stat().st_size, "langs": counts, "queries": texts}


def write_config(folder: Path, model_dir: Path, args: argparse.Namespace) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "embedpipe.toml"
    qdrant = "".join(f"{key} = {value}\n" for key, value in (
        ("hnsw_ef", args.hnsw_ef), ("hnsw_m", args.hnsw_m),
        ("hnsw_ef_construct", args.hnsw_ef_construct),
        ("quantization", f'"{args.quantization}"' if args.quantization else None)) if value)
    qdrant = f"\n[qdrant]\n{qdrant}" if qdrant else ""
    config.write_text(
        f'data_dir = "data"\ndefault_profile = "{PROFILE}"\n' + qdrant
        + common.static_profile_toml(model_dir, PROFILE)
        + f'\n[indexes.{INDEX}]\nprofile = "{PROFILE}"\npayload_indexes = {{lang = "keyword"}}\n',
        encoding="utf-8")
    return config


# --------------------------------------------------------------------------- job helpers


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """The highest resident, anonymous and file-backed RSS of process ``pid``, sampled
    every 100 ms on a thread of the parent: a thread inside the job would stall while
    Edge's optimize (the HNSW build) holds the interpreter, minutes at a million points."""

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.high = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                lines = self.status.read_text().splitlines()
            except OSError:  # the process has ended
                return
            for line in lines:
                key, _, value = line.partition(":")
                if key in self.high:
                    self.high[key] = max(self.high[key], int(value.split()[0]) * 1024)
            self._stop.wait(0.1)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wrap_phases(log: dict[str, dict[str, Any]]) -> Callable[[], None]:
    """Wrap the ``PHASES`` steps to sum their calls and seconds; returns an undo function."""
    undo: list[Callable[[], None]] = []
    lock = threading.Lock()
    for module_name, owner_name, attr in PHASES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = owner.__dict__[attr] if owner_name else getattr(owner, attr)
        name = f"{owner_name}.{attr}" if owner_name else attr
        is_classmethod = isinstance(original, classmethod)
        func = original.__func__ if is_classmethod else original

        def wrapper(*args: Any, __f: Any = func, __n: str = name, **kwargs: Any) -> Any:
            t0 = perf_counter()
            try:
                return __f(*args, **kwargs)
            finally:
                seconds = perf_counter() - t0
                with lock:
                    entry = log.setdefault(__n, {"calls": 0, "seconds": 0.0, "max_call_s": 0.0})
                    entry["calls"] += 1
                    entry["seconds"] += seconds
                    entry["max_call_s"] = max(entry["max_call_s"], seconds)
                    entry["vm_hwm_after"] = proc_status()["VmHWM"]

        wrapped = functools.wraps(func)(wrapper)
        setattr(owner, attr, classmethod(wrapped) if is_classmethod else wrapped)
        undo.append(functools.partial(setattr, owner, attr, original))
    return lambda: [u() for u in reversed(undo)]


def use_local_mode() -> None:
    """Make this process's embedpipe run on qdrant-client local mode (the engine before
    Qdrant Edge) instead of Qdrant Edge.

    ``IndexVersions.open`` gets its engine from ``embedpipe.engine.connect``, which calls
    the module's ``_open`` once per location and caches the result; ``_open`` picks Edge
    unless ``qdrant.url`` is set. Replacing ``_open`` with one that wraps
    ``embedpipe.qdrant.connect`` (qdrant-client local mode at ``settings.qdrant_path``
    when ``qdrant.url`` is unset) in ``ServerEngine`` runs the same ingest, search and
    ``Index`` code on the old engine, exactly as embedpipe's own tests drive
    ``ServerEngine``. ``IndexVersions._convert_earlier_release`` is switched off too:
    it would take the local-mode folder this run writes for an earlier release's data
    directory and convert it (here, into itself). Measurement only: nothing in
    embedpipe changes on disk.
    """
    import embedpipe.engine as engine_module
    from embedpipe import qdrant
    from embedpipe.engine.server import ServerEngine
    from embedpipe.index import IndexVersions

    def local_mode(settings: Any) -> Any:
        return ServerEngine(qdrant.connect(settings), settings)

    engine_module._open = local_mode
    IndexVersions._convert_earlier_release = lambda self: None


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes a folder takes on disk (``st_blocks * 512``) and its files' apparent size."""
    blocks = apparent = files = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(folder, name))
                blocks += st.st_blocks * 512
                apparent += st.st_size
                files += 1
    return {"disk_bytes": blocks, "apparent_bytes": apparent, "files": files}


def percentiles(seconds: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "n": len(seconds)}


def exact_data(settings: Any, fingerprint: str) -> tuple[list[str], Any, Any]:
    """Document ids, their vectors (from the Parquet vector store, by each document's
    content hash in the corpus) and their ``lang``, in corpus order."""
    import numpy as np

    from embedpipe.corpus import CorpusStore
    from embedpipe.vectors import VectorStore

    store = VectorStore(settings.data_dir, fingerprint, DIMS)
    chunks, hashes = [], []
    for path in store.folder.segments():  # oldest first: a later row of a hash wins
        for batch in store.folder.iter_batches(path, ["content_hash", "vector"]):
            hashes.extend(batch.column("content_hash").to_pylist())
            flat = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
            chunks.append(flat.reshape(batch.num_rows, DIMS))
    stored = np.concatenate(chunks)
    del chunks
    row_of = {h: r for r, h in enumerate(hashes)}
    del hashes
    ids, rows, langs = [], [], []
    corpus = CorpusStore.for_index(settings.data_dir, INDEX)
    for batch in corpus.iter_batches(columns=["id", "content_hash", "metadata"]):
        for doc_id, ch, meta in zip(batch.column("id").to_pylist(),
                                    batch.column("content_hash").to_pylist(),
                                    batch.column("metadata").to_pylist()):
            ids.append(doc_id)
            rows.append(row_of[ch])
            langs.append(json.loads(meta or "{}").get("lang"))
    matrix = stored[np.asarray(rows)] if len(rows) != len(stored) or rows != sorted(rows) \
        else stored
    return ids, np.ascontiguousarray(matrix, dtype=np.float32), np.asarray(langs)


def exact_top(matrix: Any, queries: Any, k: int, mask: Any = None) -> list[tuple[Any, Any]]:
    """(row numbers, scores) of the ``k`` best rows (inner product) for each query, best
    first."""
    import numpy as np

    rows = np.arange(len(matrix)) if mask is None else np.flatnonzero(mask)
    sub = matrix if mask is None else matrix[rows]
    out = []
    for start in range(0, len(queries), 25):
        scores = queries[start:start + 25] @ sub.T
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        for q, cand in enumerate(top):
            order = cand[np.argsort(-scores[q, cand])]
            out.append((rows[order], scores[q, order]))
    return out


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    scores = [len(set(f) & set(e)) / len(e) for f, e in zip(found, exact) if e]
    return sum(scores) / len(scores) if scores else float("nan")


def score_ratio(hits: list[list[Any]], exact_scores: list[list[float]]) -> float:
    """Mean over queries of (sum of the scores found) / (sum of the exact top-k scores):
    how close in similarity the answers are to the exact ones, even where they differ."""
    ratios = [sum(h.score for h in found) / sum(best) for found, best in zip(hits, exact_scores)
              if best and len(found) == len(best)]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def timed_searches(versions: Any, collection: str, vectors: Any, filters: list[Any]) -> tuple[list[float], list[list[Any]]]:
    seconds, hits = [], []
    for vector, flt in zip(vectors, filters):
        t0 = perf_counter()
        found = versions.search(collection, vector, K, flt)
        seconds.append(perf_counter() - t0)
        hits.append(found)
    return seconds, hits


def measure_search(versions: Any, live: Any, qvec: Any, warm: Any, langs_of: list[str],
                   exact: dict[str, Any], exact_f: dict[str, Any],
                   filtered_queries: int) -> dict[str, Any]:
    """Search by vector, unfiltered and filtered by ``lang`` (the first
    ``filtered_queries``): latencies, recall@10 and the score ratio."""
    for v in warm:  # untimed
        versions.search(live.collection, v, K)
    plain_s, plain = timed_searches(versions, live.collection, qvec, [None] * len(qvec))
    for v, lang in zip(warm, [name for name, _ in LANGS] * 2):
        versions.search(live.collection, v, K, {"lang": lang})
    langs_of = langs_of[:filtered_queries]
    filt_s, filt = timed_searches(versions, live.collection, qvec[:filtered_queries],
                                  [{"lang": lang} for lang in langs_of])
    exact_ids, exact_scores = exact["ids"], exact["scores"]
    exact_f_scores = exact_f["scores"][:filtered_queries]
    exact_f = exact_f["ids"][:filtered_queries]
    wrong = sum(1 for hits, lang in zip(filt, langs_of) for h in hits
                if h.metadata.get("lang") != lang)
    short = sum(1 for hits, e in zip(filt, exact_f) if len(hits) < len(e))
    per_lang = {}
    for name, _ in LANGS:
        chosen = [i for i, lang in enumerate(langs_of) if lang == name]
        if chosen:
            per_lang[name] = {**percentiles([filt_s[i] for i in chosen]),
                              "recall_at_10": recall([[h.id for h in filt[i]] for i in chosen],
                                                     [exact_f[i] for i in chosen])}
    return {
        "by_vector": {**percentiles(plain_s),
                      "recall_at_10": recall([[h.id for h in hits] for hits in plain], exact_ids),
                      "score_ratio": score_ratio(plain, exact_scores),
                      "short_answers": sum(1 for hits in plain if len(hits) < K)},
        "filtered": {**percentiles(filt_s),
                     "recall_at_10": recall([[h.id for h in hits] for hits in filt], exact_f),
                     "score_ratio": score_ratio(filt, exact_f_scores),
                     "hits_not_matching_filter": wrong, "short_answers": short,
                     "hits_checked": sum(len(h) for h in filt), "per_lang": per_lang},
    }


# --------------------------------------------------------------------------- jobs (children)


def job_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, then search (see the module docstring, steps 1-7)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("embedpipe").setLevel(logging.INFO)
    t_import = perf_counter()
    import numpy as np

    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest

    if spec["engine"] == "local":
        use_local_mode()
    import_s = perf_counter() - t_import
    base = proc_status()
    phases: dict[str, dict[str, Any]] = {}
    undo = wrap_phases(phases)
    settings = load_settings(config=spec["config"], env=os.environ)
    say(f"{spec['label']}: building {spec['size']} documents")
    t0 = perf_counter()
    report = ingest(settings, INDEX, Path(spec["jsonl"]), profile=PROFILE)
    build_s = perf_counter() - t0
    at_end = proc_status()  # VmHWM before anything else allocates
    undo()
    Path(BUILT).write_text(json.dumps(at_end))  # in the run's folder: the parent stops sampling
    say(f"{spec['label']}: ingest returned")  # a line, so that the parent looks at once
    deadline = perf_counter() + 60
    while spec.get("capped") and not Path(LIFTED).exists() and perf_counter() < deadline:
        time.sleep(0.05)  # the cap is the build's: wait until the parent lifted it
    say(f"{spec['label']}: built in {build_s:.1f} s, peak RSS {at_end['VmHWM'] / MIB:.0f} MiB; "
        f"phases: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in phases.items()))
    out: dict[str, Any] = {
        "engine": spec["engine"], "size": spec["size"], "build_s": build_s, "import_s": import_s,
        "baseline": base, "after_build": at_end, "peak_rss": at_end["VmHWM"],
        "report": {k: getattr(report, k) for k in ("documents", "added", "updated", "unchanged",
                                                   "failed", "embedded", "reused", "truncated",
                                                   "seconds", "collection", "created_version")},
        "phases": phases,
    }
    out.update(search_part(spec, settings, report))
    return out


def search_part(spec: dict[str, Any], settings: Any, report: Any) -> dict[str, Any]:
    import numpy as np

    from embedpipe.backends import build_embedder
    from embedpipe.index import Index, IndexVersions
    from embedpipe.layout import Layout

    out: dict[str, Any] = {}
    t0 = perf_counter()
    versions = IndexVersions.open(settings)  # the engine the build opened (cached)
    live = versions.require_live(INDEX)
    info = versions.engine.info(live.collection)
    out["engine_info"] = {"points": info.points, "segments": info.segments,
                          "indexed": info.indexed, "describe": versions.engine.describe()}
    queries = json.loads(Path(spec["queries"]).read_text())
    texts = [q["text"] for q in queries]
    warm_texts, texts = texts[:WARMUP], texts[WARMUP:]
    embedder = build_embedder(settings.profile(live.profile), settings)
    t0 = perf_counter()
    qvec = np.stack([embedder.embed_query(t) for t in texts]).astype(np.float32)
    out["query_embed_ms_mean"] = (perf_counter() - t0) * 1000 / len(texts)
    warm = np.stack([embedder.embed_query(t) for t in warm_texts]).astype(np.float32)
    t0 = perf_counter()
    versions.search(live.collection, warm[0], K)
    out["first_search_ms"] = (perf_counter() - t0) * 1000  # the shard is open already
    langs_of = [LANGS[i % len(LANGS)][0] for i in range(len(texts))]

    say(f"{spec['label']}: exact search over the Parquet vectors")
    t0 = perf_counter()
    ids, matrix, doc_langs = exact_data(settings, report.fingerprint)
    load_s = perf_counter() - t0
    t0 = perf_counter()
    tops = exact_top(matrix, qvec, K)
    exact = {"ids": [[ids[r] for r in rows] for rows, _ in tops],
             "scores": [[float(x) for x in sc] for _, sc in tops]}
    exact_f: dict[str, Any] = {"ids": [[] for _ in langs_of], "scores": [[] for _ in langs_of]}
    for name, _ in LANGS:  # one subset per lang, all its queries at once
        chosen = [i for i, lang in enumerate(langs_of) if lang == name]
        if chosen:
            for i, (rows, sc) in zip(chosen, exact_top(matrix, qvec[chosen], K, doc_langs == name)):
                exact_f["ids"][i] = [ids[r] for r in rows]
                exact_f["scores"][i] = [float(x) for x in sc]
    # How hard the data is: exact scores at ranks 1, 10 and 100, and between two documents.
    some = matrix[np.random.default_rng(0).choice(len(matrix), min(500, len(matrix)), replace=False)]
    pair = (some @ some.T)[np.triu_indices(len(some), 1)]
    ranks = np.sort(qvec @ matrix[:200_000].T if len(matrix) > 200_000 else qvec @ matrix.T,
                    axis=1)[:, ::-1]
    hardness = {"score_rank_1": float(np.mean([s[0] for s in exact["scores"]])),
                "score_rank_10": float(np.mean([s[-1] for s in exact["scores"]])),
                "score_rank_100_first_200k": float(ranks[:, min(99, ranks.shape[1] - 1)].mean()),
                "doc_doc_cosine_mean": float(pair.mean()), "doc_doc_cosine_std": float(pair.std()),
                "query_source_is_exact_top1": float(np.mean(
                    [e[0] == q["from"] for e, q in zip(exact["ids"], queries[WARMUP:])]))}
    del ranks
    # The engine holds the vectors the Parquet store holds (a sample, by point id).
    from embedpipe.points import point_id

    sample = random.Random(1).sample(range(len(ids)), min(200, len(ids)))
    held = versions.engine.vectors(live.collection, [point_id(ids[r]) for r in sample])
    diffs = [float(np.abs(held[point_id(ids[r])] - matrix[r]).max()) for r in sample
             if point_id(ids[r]) in held]
    out["exact"] = {"points": len(ids), "load_s": load_s, "search_s": perf_counter() - t0,
                    "hardness": hardness,
                    "engine_sample": len(sample), "engine_sample_found": len(diffs),
                    "engine_sample_max_abs_diff": max(diffs) if diffs else None}
    del matrix

    say(f"{spec['label']}: {len(texts)} searches by vector, unfiltered and filtered")
    ef = settings.qdrant.hnsw_ef
    filtered_queries = spec["filtered_queries"]
    out["search"] = {"hnsw_ef": ef, **measure_search(versions, live, qvec, warm, langs_of,
                                                     exact, exact_f, filtered_queries)}
    say(f"{spec['label']}: by vector p50 {out['search']['by_vector']['p50_ms']:.2f} ms, "
        f"p95 {out['search']['by_vector']['p95_ms']:.2f} ms, recall@10 "
        f"{out['search']['by_vector']['recall_at_10']:.4f}; filtered p50 "
        f"{out['search']['filtered']['p50_ms']:.2f} ms, recall "
        f"{out['search']['filtered']['recall_at_10']:.4f}")

    index = Index(INDEX, settings)
    for t in warm_texts:
        index.search(t, k=K)
    e2e = []
    for t in texts:
        t0 = perf_counter()
        index.search(t, k=K)
        e2e.append(perf_counter() - t0)
    out["end_to_end"] = percentiles(e2e)

    sweep = []
    for value in spec.get("ef_sweep") or []:
        versions.engine.settings = settings.model_copy(
            update={"qdrant": settings.qdrant.model_copy(update={"hnsw_ef": value})})
        found = measure_search(versions, live, qvec, warm, langs_of, exact, exact_f,
                               filtered_queries)
        sweep.append({"hnsw_ef": value, **found})
        say(f"{spec['label']}: hnsw_ef {value}: p50 {found['by_vector']['p50_ms']:.2f} ms, "
            f"p95 {found['by_vector']['p95_ms']:.2f} ms, recall@10 "
            f"{found['by_vector']['recall_at_10']:.4f}; filtered recall "
            f"{found['filtered']['recall_at_10']:.4f}")
    versions.engine.settings = settings
    out["ef_sweep"] = sweep

    layout = Layout(settings.data_dir)
    engine_dir = settings.qdrant_path if spec["engine"] == "local" else layout.engine
    out["disk"] = {"engine": disk_usage(engine_dir),
                   "corpus": disk_usage(layout.corpus(INDEX)),
                   "vectors": disk_usage(settings.data_dir / "vectors")}
    out["rss_at_end"] = proc_status()
    return out


def job_resync(spec: dict[str, Any]) -> dict[str, Any]:
    """The same file ingested again in a fresh process: nothing changed."""
    t_import = perf_counter()
    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest

    import_s = perf_counter() - t_import
    phases: dict[str, dict[str, Any]] = {}
    wrap_phases(phases)
    settings = load_settings(config=spec["config"], env=os.environ)
    t0 = perf_counter()
    report = ingest(settings, INDEX, Path(spec["jsonl"]), profile=PROFILE)
    seconds = perf_counter() - t0
    return {"seconds": seconds, "import_s": import_s, "peak_rss": proc_status()["VmHWM"],
            "report": {k: getattr(report, k) for k in ("documents", "added", "updated",
                                                       "unchanged", "failed", "embedded",
                                                       "seconds")},
            "phases": phases}


JOBS = {"build": job_build, "resync": job_resync}


# --------------------------------------------------------------------------- parent


def child_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(EMBEDPIPE_CACHE_DIR=str(work / "cache"), PREFECT_HOME=str(work / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", EMBEDPIPE_DEVICE="cpu")
    return env


class MemoryCap:
    """A memory cgroup (v2 or v1) capping one job process from its first instruction: the
    child writes its own pid into the group before it runs Python (``preexec_fn``).

    The group's usage counts the page cache the job reads and writes as well as its
    anonymous memory, and the kernel reclaims file-backed pages when the group reaches
    its limit; an OOM kill (the job's exit -9) means the anonymous memory alone did not
    fit. So a build that completes under ``--memory-limit 3G`` runs on a 3 GiB machine
    or container, whatever its VmHWM (which counts every mapped page it touched)."""

    V2 = Path("/sys/fs/cgroup")
    V1 = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        if (self.V2 / "cgroup.controllers").is_file():
            self.path, self.v2 = self.V2 / name, True
        elif (self.V1 / "memory.limit_in_bytes").is_file():
            self.path, self.v2 = self.V1 / name, False
        else:
            raise SystemExit("--memory-limit: no cgroup memory controller under /sys/fs/cgroup")
        self.path.mkdir()
        self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit))
        if not self.v2 and (self.path / "memory.memsw.limit_in_bytes").is_file():
            self._write("memory.memsw.limit_in_bytes", str(limit))  # no escape into swap
        if self.v2 and (self.path / "memory.swap.max").is_file():
            self._write("memory.swap.max", "0")

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def enter(self) -> None:
        """In the child, before exec: join the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict[str, Any]:
        if self.v2:
            events = dict(line.split() for line in self._read("memory.events").splitlines())
            peak = self._read("memory.peak").strip()
            return {"limit_bytes": self.limit, "peak_bytes": int(peak) if peak else None,
                    "limit_hits": int(events.get("max", 0)),
                    "oom_kills": int(events.get("oom_kill", 0))}
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"limit_bytes": self.limit,
                "peak_bytes": int(self._read("memory.max_usage_in_bytes") or 0),
                "limit_hits": int(self._read("memory.failcnt") or 0),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def lift(self) -> dict[str, Any]:
        """The figures so far, then no limit: the cap is for the build, not for the exact
        search the benchmark itself runs afterwards (a 1 GB matrix at a million)."""
        figures = self.report()
        if self.v2:
            self._write("memory.max", "max")
            return figures
        if (self.path / "memory.memsw.limit_in_bytes").is_file():  # memsw >= memory, always
            self._write("memory.memsw.limit_in_bytes", "-1")
        self._write("memory.limit_in_bytes", "-1")
        return figures

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def parse_size(text: str) -> int:
    """``3G``, ``512M``, ``3221225472``: bytes (powers of 1024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def spawn(kind: str, spec: dict[str, Any], cwd: Path, env: dict[str, str],
          memory_limit: int | None = None) -> dict[str, Any]:
    """Run one job in a fresh process (its progress goes to our stderr); its result. With
    ``memory_limit``, in a memory cgroup of that size (:class:`MemoryCap`) until the build
    ends (a build job) or the job does (a re-sync)."""
    spec_path = cwd / f"job-{kind}.json"
    result_path = cwd / f"result-{kind}.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", kind, str(spec_path),
           str(result_path)]
    t0 = perf_counter()
    marker = cwd / (BUILT if kind == "build" else f"{BUILT}-never")
    marker.unlink(missing_ok=True)
    (cwd / LIFTED).unlink(missing_ok=True)
    cap = MemoryCap(memory_limit, f"embedpipe-bench-{os.getpid()}-{kind}") if memory_limit else None
    capped = None  # the cap's figures when the build ended (then lifted)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=cap.enter if cap else None)
    tail: collections.deque[str] = collections.deque(maxlen=80)
    sampler = Sampler(proc.pid).__enter__()
    for line in proc.stderr:  # type: ignore[union-attr] - passed on as it comes
        if marker.exists() and sampler._thread.is_alive():  # the build is over: stop sampling
            sampler.__exit__()
            if cap:
                capped = cap.lift()
                (cwd / LIFTED).write_text("")  # the job waits for this before it searches
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line)
    returncode = proc.wait()
    sampler.__exit__()
    run: dict[str, Any] = {"process_wall_s": perf_counter() - t0, "returncode": returncode,
                           "sampled_high": dict(sampler.high)}
    if cap:
        run["memory_cap"] = capped or cap.report()
        cap.close()
    if returncode == 0 and result_path.is_file():
        run["job"] = json.loads(result_path.read_text())
    else:
        run["job"] = None
        run["error"] = {"command": shlex.join(cmd), "stderr_tail": "".join(tail)[-6000:]}
    return run


def distill(work: Path, env: dict[str, str]) -> Path:
    """The static model, distilled in its own process (torch stays out of ours)."""
    target = work / "static"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--distill", str(target)],
                   env=env, check=True)
    return target / "st"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-small", type=int, default=None,
                        help="documents of the side-by-side run (default 100000; --quick 5000)")
    parser.add_argument("--docs-large", type=int, default=None,
                        help="documents of the Edge-only run (default 1000000; --quick 20000)")
    parser.add_argument("--skip-large", action="store_true", help="no Edge-only large run")
    parser.add_argument("--skip-local", action="store_true", help="no local-mode run")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (default 200)")
    parser.add_argument("--hnsw-ef", type=int, default=None,
                        help="[qdrant] hnsw_ef of every run (default: embedpipe's, 256)")
    parser.add_argument("--hnsw-m", type=int, default=None,
                        help="[qdrant] hnsw_m of every run (default: embedpipe's, 32)")
    parser.add_argument("--hnsw-ef-construct", type=int, default=None,
                        help="[qdrant] hnsw_ef_construct of every run (default: embedpipe's, 256)")
    parser.add_argument("--quantization", choices=("int8", "none"), default=None,
                        help="[qdrant] quantization of every run (default: embedpipe's, int8)")
    parser.add_argument("--memory-limit", default=None,
                        help="run each Edge job in a memory cgroup capped at this size "
                             "(e.g. 3G; needs a writable cgroup v1 or v2 memory controller): "
                             "does the build complete when the kernel must reclaim the "
                             "file-backed pages of the memory-mapped segments?")
    parser.add_argument("--local-filtered", type=int, default=50,
                        help="filtered queries on local mode, which scans every point in "
                             "Python for each (default 50; the others get --queries)")
    parser.add_argument("--ef-sweep", default="",
                        help="comma-separated hnsw_ef values searched again on each Edge "
                             "build, e.g. 128,256 (default none)")
    parser.add_argument("--corpus", choices=("random", "topics"), default="random",
                        help="random: memory_flat's documents (default); topics: documents "
                             "clustered by topic (see write_corpus), for comparison")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['docs_small']} and {QUICK['docs_large']} "
                             "documents, results in the scratch folder")
    parser.add_argument("--cranfield", type=Path, default=common.DEFAULT_CRANFIELD,
                        help="folder holding cran.all.1400, for the vocabulary "
                             f"(default {common.DEFAULT_CRANFIELD})")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="parent folder of the temporary work folder (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.docs_small is None:
        args.docs_small = QUICK["docs_small"] if args.quick else 100_000
    if args.docs_large is None:
        args.docs_large = QUICK["docs_large"] if args.quick else 1_000_000
    if args.docs_small < 100 or args.docs_large < 100:
        parser.error("--docs-small and --docs-large must be at least 100")
    if args.queries < 1:
        parser.error("--queries must be at least 1")
    try:
        args.ef_sweep = [int(v) for v in args.ef_sweep.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--ef-sweep must be integers separated by commas, not {args.ef_sweep!r}")
    if args.memory_limit is not None:
        try:
            args.memory_limit = parse_size(args.memory_limit)
        except ValueError:
            parser.error(f"--memory-limit must be a size such as 3G, not {args.memory_limit!r}")
    args.cranfield = args.cranfield.expanduser().resolve()
    if args.output is not None:
        args.output = args.output.expanduser().resolve()
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, engine, size) of every run, in order: heavy phases one at a time."""
    runs = [(f"edge-{args.docs_small}", "edge", args.docs_small)]
    if not args.skip_local:
        runs.append((f"local-{args.docs_small}", "local", args.docs_small))
    if not args.skip_large:
        runs.append((f"edge-{args.docs_large}", "edge", args.docs_large))
    return runs


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one run (None where it failed)."""
    job = run.get("job")
    if not job:
        return {"failed": True}
    s = job["search"]
    resync = (run.get("resync") or {}).get("job")
    sweep = {}
    for entry in job.get("ef_sweep") or []:
        ef = entry["hnsw_ef"]
        sweep.update({f"ef{ef}_p50_ms": entry["by_vector"]["p50_ms"],
                      f"ef{ef}_p95_ms": entry["by_vector"]["p95_ms"],
                      f"ef{ef}_recall_at_10": entry["by_vector"]["recall_at_10"],
                      f"ef{ef}_filtered_p95_ms": entry["filtered"]["p95_ms"],
                      f"ef{ef}_filtered_recall_at_10": entry["filtered"]["recall_at_10"]})
    hard = job["exact"]["hardness"]
    return {
        "engine": job["engine"], "size": job["size"],
        "build_s": job["build_s"], "embedded": job["report"]["embedded"],
        "points": job["engine_info"]["points"], "indexed": job["engine_info"]["indexed"],
        "segments": job["engine_info"]["segments"],
        "search_p50_ms": s["by_vector"]["p50_ms"], "search_p95_ms": s["by_vector"]["p95_ms"],
        "recall_at_10": s["by_vector"]["recall_at_10"],
        "score_ratio": s["by_vector"]["score_ratio"],
        "e2e_p50_ms": job["end_to_end"]["p50_ms"], "e2e_p95_ms": job["end_to_end"]["p95_ms"],
        "filtered_p50_ms": s["filtered"]["p50_ms"], "filtered_p95_ms": s["filtered"]["p95_ms"],
        "filtered_recall_at_10": s["filtered"]["recall_at_10"],
        "filtered_hits_not_matching": s["filtered"]["hits_not_matching_filter"],
        "peak_rss_bytes": job["peak_rss"],
        # Sampled by the parent (older result files: by a thread of the job, which
        # stalled while Edge's optimize held the interpreter).
        "peak_rss_anon_sampled_bytes": (run.get("sampled_high") or job["sampled_high"])["RssAnon"],
        "peak_rss_file_sampled_bytes": (run.get("sampled_high") or job["sampled_high"])["RssFile"],
        "engine_disk_bytes": job["disk"]["engine"]["disk_bytes"],
        "engine_apparent_bytes": job["disk"]["engine"]["apparent_bytes"],
        "parquet_disk_bytes": job["disk"]["corpus"]["disk_bytes"]
        + job["disk"]["vectors"]["disk_bytes"],
        "noop_resync_process_s": run["resync"]["process_wall_s"] if resync else None,
        "noop_resync_in_process_s": resync["seconds"] if resync else None,
        "noop_resync_embedded": resync["report"]["embedded"] if resync else None,
        "noop_resync_peak_rss_bytes": resync["peak_rss"] if resync else None,
        **cap_figures(run),
        "exact_score_rank_1": hard["score_rank_1"], "exact_score_rank_10": hard["score_rank_10"],
        "doc_doc_cosine_mean": hard["doc_doc_cosine_mean"],
        **sweep,
    }


def cap_figures(run: dict[str, Any]) -> dict[str, Any]:
    """With ``--memory-limit``: the build's cgroup, its peak usage (page cache included)
    and whether the kernel had to reclaim or kill to keep the job under the limit."""
    cap = run.get("memory_cap")
    if not cap:
        return {}
    return {"memory_cap_bytes": cap["limit_bytes"], "memory_cap_peak_bytes": cap["peak_bytes"],
            "memory_cap_limit_hits": cap["limit_hits"], "memory_cap_oom_kills": cap["oom_kills"]}


def goals(per_run: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    large = per_run.get(f"edge-{args.docs_large}")
    if large and not large.get("failed"):
        checks = {
            "search_p50_ms": (large["search_p50_ms"], "<=", GOALS["p50_ms"]),
            "search_p95_ms": (large["search_p95_ms"], "<=", GOALS["p95_ms"]),
            "recall_at_10": (large["recall_at_10"], ">=", GOALS["recall"]),
            "build_peak_rss_bytes": (large["peak_rss_bytes"], "<=", GOALS["peak_rss_bytes"]),
            "noop_resync_s": (large["noop_resync_process_s"], "<=", GOALS["noop_resync_s"]),
        }
        if "memory_cap_bytes" in large:  # it completed (else "failed"): did it need a kill?
            checks["build_completes_capped_at_3_gib"] = (
                large["memory_cap_oom_kills"] == 0 and large["memory_cap_bytes"] <= GOALS["peak_rss_bytes"],
                "==", True)
        for key, (value, op, goal) in checks.items():
            met = value is not None and (value == goal if op == "==" else
                                         value <= goal if op == "<=" else value >= goal)
            out[f"large_{key}"] = {"value": value, "goal": f"{op} {goal}", "met": met,
                                   "size": args.docs_large}
    edge, local = per_run.get(f"edge-{args.docs_small}"), per_run.get(f"local-{args.docs_small}")
    if edge and local and not edge.get("failed") and not local.get("failed"):
        speedup = local["search_p50_ms"] / edge["search_p50_ms"]
        out["small_search_p50_speedup"] = {"value": speedup, "goal": f">= {GOALS['speedup_p50']}",
                                           "met": speedup >= GOALS["speedup_p50"],
                                           "size": args.docs_small}
    return out


ROWS = (
    ("build_s", "build wall (s)", 1, 1),
    ("search_p50_ms", "search by vector p50 (ms)", 1, 2),
    ("search_p95_ms", "search by vector p95 (ms)", 1, 2),
    ("recall_at_10", "recall@10", 1, 4),
    ("score_ratio", "found/exact top-10 score sum", 1, 4),
    ("e2e_p50_ms", "end to end p50 (ms)", 1, 2),
    ("e2e_p95_ms", "end to end p95 (ms)", 1, 2),
    ("filtered_p50_ms", "filtered p50 (ms)", 1, 2),
    ("filtered_p95_ms", "filtered p95 (ms)", 1, 2),
    ("filtered_recall_at_10", "filtered recall@10", 1, 4),
    ("filtered_hits_not_matching", "filtered hits not matching", 1, 0),
    ("peak_rss_bytes", "build peak RSS (MiB)", MIB, 0),
    ("peak_rss_anon_sampled_bytes", "  anonymous, highest sample (MiB)", MIB, 0),
    ("peak_rss_file_sampled_bytes", "  file-backed, highest sample (MiB)", MIB, 0),
    ("memory_cap_bytes", "memory cgroup limit (MiB)", MIB, 0),
    ("memory_cap_peak_bytes", "  cgroup peak, page cache incl. (MiB)", MIB, 0),
    ("memory_cap_limit_hits", "  times at the limit (reclaim)", 1, 0),
    ("memory_cap_oom_kills", "  OOM kills", 1, 0),
    ("engine_disk_bytes", "engine on disk (MiB)", MIB, 1),
    ("engine_apparent_bytes", "engine apparent size (MiB)", MIB, 1),
    ("parquet_disk_bytes", "Parquet corpus+vectors (MiB)", MIB, 1),
    ("points", "points", 1, 0),
    ("indexed", "vectors in HNSW", 1, 0),
    ("segments", "segments", 1, 0),
    ("noop_resync_process_s", "no-op re-sync, process (s)", 1, 2),
    ("noop_resync_in_process_s", "no-op re-sync, in-process (s)", 1, 2),
    ("noop_resync_embedded", "no-op re-sync embedded", 1, 0),
    ("noop_resync_peak_rss_bytes", "no-op re-sync peak RSS (MiB)", MIB, 0),
    ("exact_score_rank_1", "exact score, rank 1 (mean)", 1, 4),
    ("exact_score_rank_10", "exact score, rank 10 (mean)", 1, 4),
    ("doc_doc_cosine_mean", "cosine of two documents (mean)", 1, 4),
)


def sweep_rows(per_run: dict[str, dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    """Table rows of the --ef-sweep figures, in the order of the values."""
    values = sorted({int(k[2:].split("_")[0]) for f in per_run.values() for k in f
                     if k.startswith("ef") and k.endswith("_p50_ms")})
    return [(f"ef{v}_{key}", f"hnsw_ef {v}: {name}", 1, digits) for v in values
            for key, name, digits in (("p50_ms", "p50 (ms)", 2), ("p95_ms", "p95 (ms)", 2),
                                      ("recall_at_10", "recall@10", 4),
                                      ("filtered_p95_ms", "filtered p95 (ms)", 2),
                                      ("filtered_recall_at_10", "filtered recall@10", 4))]


def print_table(per_run: dict[str, dict[str, Any]], result_goals: dict[str, Any]) -> None:
    labels = list(per_run)
    width = max(14, *(len(label) + 1 for label in labels))
    head = f"{'measure':<36}" + "".join(f"{label:>{width}}" for label in labels)
    print("\n" + head + "\n" + "-" * len(head))
    for key, name, scale, digits in (*ROWS, *sweep_rows(per_run)):
        cells = []
        for label in labels:
            value = per_run[label].get(key)
            cells.append(f"{'-':>{width}}" if value is None
                         else f"{value / scale:>{width},.{digits}f}")
        print(f"{name:<36}" + "".join(cells))
    if result_goals:
        print("\ngoals")
        for key, g in result_goals.items():
            value = g["value"]
            shown = "n/a" if value is None else str(value) if isinstance(value, bool) else (
                f"{value / MIB:,.0f} MiB" if "rss" in key
                                                 else f"{value:,.4g}")
            goal = g["goal"] if "rss" not in key else f"<= {GOALS['peak_rss_bytes'] / MIB:,.0f} MiB"
            print(f"  {key:<34} {shown:>14}  (goal {goal}, {g['size']} docs): "
                  f"{'met' if g['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:
        result = JOBS[argv[1]](json.loads(Path(argv[2]).read_text()))
        Path(argv[3]).write_text(json.dumps(result, default=str))
        return 0
    if argv[:1] == ["--distill"]:
        common.distill_static(Path(argv[1]))
        return 0
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    load_at_start = list(os.getloadavg())
    started = time.time()
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="embedpipe-bench-scale-", dir=args.scratch))
    output = args.output or (work / "scale-quick.json" if args.quick else DEFAULT_OUTPUT)
    say(f"work folder {work}")
    env = child_env(work)
    runs: dict[str, dict[str, Any]] = {}
    corpora: dict[int, dict[str, Any]] = {}
    try:
        words, source = memory_flat.vocabulary(args.cranfield)
        say(f"vocabulary: {source}")
        for n in sorted({n for _, _, n in plan(args)}):
            t0 = perf_counter()
            jsonl = work / f"corpus-{n}.jsonl"
            made = write_corpus(jsonl, n, words, args.queries, args.corpus)
            (work / f"queries-{n}.json").write_text(json.dumps(made["queries"]))
            corpora[n] = {"path": str(jsonl), "bytes": made["bytes"], "langs": made["langs"],
                          "write_s": perf_counter() - t0}
            say(f"wrote {n} documents ({made['bytes'] / MIB:.0f} MiB JSONL) in "
                f"{perf_counter() - t0:.1f} s")
        t0 = perf_counter()
        model_dir = distill(work, env)
        say(f"distilled the static model in {perf_counter() - t0:.1f} s")
        for label, engine, n in plan(args):
            folder = work / label
            config = write_config(folder, model_dir, args)
            spec = {"label": label, "engine": engine, "size": n, "config": str(config),
                    "jsonl": corpora[n]["path"], "queries": str(work / f"queries-{n}.json"),
                    "ef_sweep": args.ef_sweep if engine == "edge" else [],
                    "filtered_queries": args.queries if engine == "edge" else
                    min(args.queries, args.local_filtered)}
            cap = args.memory_limit if engine == "edge" else None
            spec["capped"] = bool(cap)
            run = {"label": label, **spawn("build", spec, folder, env, cap)}
            runs[label] = run
            if run.get("error"):
                say(f"{label}: FAILED (exit {run['returncode']})")
            elif engine == "edge":
                say(f"{label}: no-op re-sync in a fresh process")
                run["resync"] = spawn("resync", spec, folder, env, cap)
                r = run["resync"]
                say(f"{label}: no-op re-sync "
                    + ("FAILED" if r.get("error") else
                       f"{r['process_wall_s']:.1f} s process, {r['job']['seconds']:.1f} s "
                       f"in-process, embedded {r['job']['report']['embedded']}"))
            write(args, output, runs, {"command": command, "load_at_start": load_at_start,
                                       "started": started, "source": source,
                                       "corpora": corpora}, final=False)
            # Drop the data directory of a finished run: disk and page cache for the next.
            if not args.keep:
                shutil.rmtree(folder / "data", ignore_errors=True)
    finally:
        if not args.keep and not args.quick:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            say(f"kept {work}")

    per_run, result_goals = write(args, output, runs, {
        "command": command, "load_at_start": load_at_start, "started": started,
        "source": source, "corpora": corpora}, final=True)
    print_table(per_run, result_goals)
    print(f"\nwrote {output}")
    return 0 if all(not r.get("error") and not (r.get("resync") or {}).get("error")
                    for r in runs.values()) else 1


def write(args: argparse.Namespace, output: Path, runs: dict[str, dict[str, Any]],
          about: dict[str, Any], final: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the results file (after each run too, marked ``partial``, so a long run
    that is stopped leaves what it measured)."""
    command, load_at_start, started = about["command"], about["load_at_start"], about["started"]
    source, corpora = about["source"], about["corpora"]
    per_run = {label: figures(run) for label, run in runs.items()}
    result_goals = goals(per_run, args)
    result = {
        "command": command, "argv": sys.argv, "cwd": str(Path.cwd()),
        "docs_small": args.docs_small, "docs_large": args.docs_large,
        "skip_large": args.skip_large, "skip_local": args.skip_local, "quick": args.quick,
        "partial": not final, "runs_planned": [label for label, _, _ in plan(args)],
        "queries": args.queries, "warmup_queries": WARMUP, "k": K, "hnsw_ef": args.hnsw_ef,
        "hnsw_m": args.hnsw_m, "hnsw_ef_construct": args.hnsw_ef_construct,
        "local_filtered_queries": min(args.queries, args.local_filtered),
        "ef_sweep": args.ef_sweep, "seed": memory_flat.SEED, "index": INDEX,
        "vocabulary": source, "corpus_kind": args.corpus, "langs": dict(LANGS), "corpora": corpora,
        "model": "static (model2vec distilled from all-MiniLM-L6-v2, 256 dims), CPU",
        "loadavg_at_start": load_at_start, "elapsed_s": time.time() - started,
        "measure": "peak RSS = VmHWM of the build process when ingest() returned; disk = "
                   "st_blocks*512; latencies one query at a time after 10 warm-up queries; "
                   "recall@10 against exact inner-product search over the Parquet vectors",
        "goals": result_goals, "per_run": per_run, "runs": runs,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # write_result says "wrote"; we say it once
        common.write_result(output, result, PACKAGES)
    return per_run, result_goals


if __name__ == "__main__":
    raise SystemExit(main())
