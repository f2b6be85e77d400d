"""No-op re-sync of an unchanged 10,000-document source, each run in a fresh process:
``embedpipe sync`` against LangChain ``index()`` (``SQLRecordManager`` on SQLite,
``cleanup="incremental"``, ``QdrantVectorStore`` in Qdrant local mode).

Why: a scheduled sync is a new process on a source that mostly did not change; it pays
start-up plus the id -> content-hash check, and must embed nothing. The goal
(docs/architecture.md): "a no-op re-sync of 10,000 unchanged documents should take seconds".

In a temporary folder: 10,000 documents made deterministically from the Cranfield abstracts
(later copies of an abstract get their sentences shuffled by a seeded RNG, and every text a
line naming its record), one ``.txt`` per document under ``source/part-NN/``, id = relative
path; both sides read these files. Both use the same static model (distilled from the
bundled MiniLM with model2vec by ``_common.distill_static``, untimed), on the CPU.

* embedpipe: ``embedpipe.toml`` (``data_dir = "data"``, profile ``static``, index ``bench``
  with ``source = <folder>``), run as ``embedpipe -c CFG sync --index bench --json``.
* LangChain: this script with ``--langchain-job``: read the files into ``Document(text,
  metadata={"source": rel}, id=rel)``, open the record manager and the vector store
  (collection created on the first run), ``index(...)``. Its ``Embeddings`` wraps the same
  model and counts the texts it embeds. ``QdrantVectorStore`` embeds ``"dummy_text"`` once
  when it opens (a dimension check): counted apart from what ``index()`` embeds.

Each side runs once to build (reported, not the result), then ``--rounds`` no-op runs, each
a new process, alternating which side goes first. Per run: process wall clock (spawn to
exit, as this script sees it), its CPU seconds, and the in-process time (embedpipe's JSON
``seconds``; the ``index()`` call). Medians and the ratio embedpipe / LangChain of the
no-op process wall are reported; the goal on both sides is 0 texts embedded.

Run from the repository root::

    make bench-resync
    .venv/bin/python bench/resync_noop.py [--rounds 2] [--limit N]

Results go to ``bench/results/resync_noop.json`` (``--output``). Without the Cranfield
collection it prints why and exits 0 (skipped); it exits 1 if a run failed (error kept).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

DEFAULT_OUTPUT = common.RESULTS / "resync_noop.json"
N_DOCS = 10_000
SEED = 20240104
INDEX = "bench"
SIDES = ("embedpipe", "langchain")
PACKAGES = ("embedpipe", "torch", "sentence-transformers", "qdrant-client", "model2vec",
            "langchain-core", "langchain-classic", "langchain-qdrant", "SQLAlchemy")


def make_corpus(docs: list[common.Doc], n: int, root: Path) -> int:
    """``n`` unique texts from ``docs`` written as ``root/part-NN/doc-NNNNN.txt``."""
    for i in range(n):
        base = docs[i % len(docs)]
        sentences = [s.strip() for s in base.text.split(". ") if s.strip()]
        if i >= len(docs):  # first copy as is; later ones reshuffled, seeded per document
            random.Random(f"{SEED}:{i}").shuffle(sentences)
        path = root / f"part-{i // 1000:02d}" / f"doc-{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(". ".join(sentences) + f"\n\n(record {i:05d}, Cranfield {base.id})\n",
                        encoding="utf-8")
    return n


def langchain_job(work: Path, source: Path, model_dir: Path) -> dict[str, Any]:
    """What a scheduled LangChain sync does; runs in its own process (``--langchain-job``)."""
    t0 = perf_counter()
    from langchain_classic.indexes import SQLRecordManager
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.indexing import index
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient, models
    from sentence_transformers import SentenceTransformer

    phases = {"imports_s": perf_counter() - t0}

    class CountingEmbeddings(Embeddings):
        """The static model, counting the texts it embeds (loaded eagerly, as
        ``HuggingFaceEmbeddings`` does)."""

        def __init__(self, path: Path) -> None:
            self.model = SentenceTransformer(str(path), device="cpu")
            self.texts = self.calls = 0

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            self.calls += 1
            self.texts += len(texts)
            return self.model.encode(texts, batch_size=1024, normalize_embeddings=True).tolist()

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    t0 = perf_counter()
    embeddings = CountingEmbeddings(model_dir)
    phases["model_load_s"] = perf_counter() - t0
    t0 = perf_counter()
    records = SQLRecordManager(f"qdrant/{INDEX}", db_url=f"sqlite:///{work / 'records.sqlite'}")
    records.create_schema()
    client = QdrantClient(path=str(work / "qdrant"))
    if not client.collection_exists(INDEX):
        client.create_collection(INDEX, vectors_config=models.VectorParams(
            size=embeddings.model.get_sentence_embedding_dimension() or 256,
            distance=models.Distance.COSINE))
    store = QdrantVectorStore(client=client, collection_name=INDEX, embedding=embeddings)
    phases["store_open_s"] = perf_counter() - t0
    opened = {"calls": embeddings.calls, "texts": embeddings.texts}
    t0 = perf_counter()
    files = sorted(p for p in source.rglob("*.txt") if p.is_file())
    docs = [Document(page_content=p.read_bytes().decode("utf-8").lstrip("\ufeff"),
                     metadata={"source": p.relative_to(source).as_posix()},
                     id=p.relative_to(source).as_posix()) for p in files]
    phases["read_files_s"] = perf_counter() - t0
    t0 = perf_counter()
    # key_encoder stays "sha1": the only one whose keys are UUIDs, which Qdrant requires.
    result = index(docs, records, store, cleanup="incremental", source_id_key="source")
    phases["index_s"] = perf_counter() - t0
    client.close()
    return {"result": dict(result), "phases": phases, "embedded_opening_store": opened,
            "embedded_in_index": {"calls": embeddings.calls - opened["calls"],
                                  "texts": embeddings.texts - opened["texts"]},
            "seconds": phases["index_s"]}


def embedded(run: dict[str, Any]) -> Any:
    rep = run.get("report") or {}
    return rep.get("embedded") if run["side"] == "embedpipe" else \
        (rep.get("embedded_in_index") or {}).get("texts")


def describe(run: dict[str, Any]) -> str:
    if run.get("error"):
        return f"FAILED (exit {run['returncode']}): {run['error']['stderr_tail'].strip()[-600:]}"
    rep = run["report"]
    keys = (("added", "updated", "deleted", "unchanged", "failed") if run["side"] == "embedpipe"
            else ("num_added", "num_updated", "num_deleted", "num_skipped"))
    counts = " ".join(f"{k}={(rep if run['side'] == 'embedpipe' else rep['result']).get(k)}"
                      for k in keys)
    return (f"{run['process_wall_s']:.2f} s wall, {rep.get('seconds', float('nan')):.2f} s "
            f"in-process; embedded {embedded(run)}; {counts}")


def summarise(side_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The initial build and the medians of the no-op rounds that did not fail."""
    noop = [r for r in side_runs[1:] if not r.get("error")]

    def med(key: str) -> float | None:
        return statistics.median(r["report"]["seconds"] if key == "in_process_s" else r[key]
                                 for r in noop) if noop else None

    return {"initial_build_process_wall_s": side_runs[0]["process_wall_s"],
            "initial_build_embedded": embedded(side_runs[0]), "noop_ok_rounds": len(noop),
            "median_noop_process_wall_s": med("process_wall_s"),
            "median_noop_in_process_s": med("in_process_s"),
            "median_noop_process_cpu_s": med("process_cpu_s"),
            "noop_embedded": [embedded(r) for r in side_runs[1:]]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--langchain-job"]:
        print(json.dumps(langchain_job(*(Path(a) for a in argv[1:4]))))
        return 0
    started = common.start(argv, __doc__, DEFAULT_OUTPUT)
    if started is None:
        return 0
    args, command = started
    load_at_start = list(os.getloadavg())
    cran, empty = common.load_docs(args.cranfield, None)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-resync-") as tmp:
        work = Path(tmp)
        n = make_corpus(cran, args.limit or N_DOCS, work / "source")
        print(f"wrote {n} documents under {work / 'source'}", flush=True)
        t0 = perf_counter()
        static_dir = common.distill_static(work / "static")
        print(f"distilled the static model in {perf_counter() - t0:.1f} s", flush=True)
        for sub in ("ep", "lc"):
            (work / sub).mkdir()
        config = work / "ep" / "embedpipe.toml"
        config.write_text(
            'data_dir = "data"\ndefault_profile = "static"\n'
            + common.static_profile_toml(static_dir)
            + f'\n[indexes.{INDEX}]\nprofile = "static"\nsource = "{work / "source"}"\n',
            encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
        env.update(EMBEDPIPE_CACHE_DIR=str(work / "cache"), PREFECT_HOME=str(work / "prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        embedpipe_bin = Path(sys.executable).parent / "embedpipe"
        cmds = {"embedpipe": ([str(embedpipe_bin), "-c", str(config), "sync", "--index", INDEX,
                               "--json"], work / "ep"),
                "langchain": ([sys.executable, str(Path(__file__).resolve()), "--langchain-job",
                               str(work / "lc"), str(work / "source"), str(static_dir)],
                              work / "lc")}
        for r in range(args.rounds + 1):  # round 0 is the initial build
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for side in order:
                run = {"side": side, **common.spawn(*cmds[side], env)}
                run["round"] = r
                runs[side].append(run)
                label = "initial build" if r == 0 else f"no-op round {r}"
                print(f"{label:<14} {side:<10} {describe(run)}", flush=True)

    summary = {side: summarise(runs[side]) for side in SIDES}
    ep, lc = summary["embedpipe"], summary["langchain"]
    ratio = (ep["median_noop_process_wall_s"] / lc["median_noop_process_wall_s"]
             if ep["median_noop_process_wall_s"] and lc["median_noop_process_wall_s"] else None)

    print(f"\n{n} docs, no-op re-sync in a fresh process; seconds (lower is better), "
          f"median of {args.rounds} round(s)")
    head = f"{'side':<10} {'build wall':>10} {'no-op wall':>10} {'in-proc':>8} {'cpu':>7}  embedded"
    print(head + "\n" + "-" * len(head))
    for side in SIDES:
        s = summary[side]
        cells = [s["initial_build_process_wall_s"], s["median_noop_process_wall_s"],
                 s["median_noop_in_process_s"], s["median_noop_process_cpu_s"]]
        text = " ".join(f"{c:>{w}.2f}" if c is not None else f"{'-':>{w}}"
                        for c, w in zip(cells, (10, 10, 8, 7)))
        print(f"{side:<10} {text}  {s['noop_embedded']} (goal 0)")
    print(f"\nembedpipe / LangChain, no-op process wall: "
          f"{f'{ratio:.3f}' if ratio is not None else 'n/a (a side failed)'}")
    last = runs["langchain"][-1].get("report")
    if last:
        print("LangChain no-op job phases: " + ", ".join(
            f"{k} {v:.2f}" for k, v in last["phases"].items())
            + f"; embedded opening the store: {last['embedded_opening_store']}")
    result = {
        **common.run_header(command, Path.cwd(), cran, empty, args.rounds),
        "n_docs": n, "cranfield_docs": len(cran), "seed": SEED, "index": INDEX,
        "loadavg_at_start": load_at_start,
        "model": "static (model2vec distilled from all-MiniLM-L6-v2, 256 dims), CPU",
        "timing": "process wall = spawn to exit as seen by this script; in-process = "
                  "embedpipe JSON 'seconds' / LangChain index() call",
        "ratio_noop_process_wall_embedpipe_to_langchain": ratio,
        "summary": summary, "runs": runs,
    }
    common.write_result(args.output, result, PACKAGES)
    return 0 if all(not r.get("error") for s in SIDES for r in runs[s]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
