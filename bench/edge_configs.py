"""Edge shard configurations on real benchmark vectors: how the defaults of ``[qdrant]``
(hnsw_m, hnsw_ef_construct, hnsw_ef, quantization) were chosen (docs/benchmarks.md,
"Scale", "How the defaults were chosen").

It works on the vectors of a ``bench/scale.py --keep`` run (100,000 documents, either
corpus) and talks to qdrant-edge-py directly, without embedpipe's ingest, so that one
configuration costs a minute:

    .venv/bin/python bench/scale.py --skip-local --skip-large --keep --scratch /tmp/sb
    .venv/bin/python bench/edge_configs.py prep /tmp/sb/embedpipe-bench-scale-XXXX
    .venv/bin/python bench/edge_configs.py go NAME '{"quant": "int8", "m": 32, "efc": 256,
        "efs": [128, 512], "overs": [2]}'

``prep`` writes ``WORK/data.npz`` (the corpus vectors from the Parquet vector store, the
200 query vectors embedded with the index's model, their exact top 10). ``go`` runs one
configuration in a child process while this one samples the child's anonymous and
file-backed RSS from ``/proc/<pid>/smaps_rollup`` (Edge's optimize holds the interpreter,
so an in-process thread would stall): a fresh shard, the vectors upserted 1,024 at a
time with an ``id`` payload (and a 150-word ``text`` with ``"text": true``), ``optimize``,
then the queries at each ``efs`` x ``overs`` (quantization oversampling, with rescoring):
p50/p95 and recall@10 against the exact top 10. One JSON line per configuration is
appended to ``WORK/results.jsonl``; ``bench/results/edge_configs.jsonl`` holds the runs
behind the docs (the ``random`` and ``topics`` corpora at 100,000, 2 cores, AMD EPYC).

Configuration keys: ``quant`` (``int8``, ``bq2``: binary 2-bit with 8-bit queries,
``tq4``/``tq8``: TurboQuant), ``exact`` (full scan), ``m``, ``efc``, ``efs`` (hnsw_ef
values; null: the engine default), ``overs`` (oversampling values), ``maxseg`` (max
segment size, KB), ``vmem``/``hmem``/``pmem`` (``Memory`` of vectors, graph, payload),
``text``, ``n`` (the first n vectors only). ``bench/scale.py`` measures embedpipe itself;
this only compares engine settings.
"""

import json, os, sys, time, subprocess
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
K = 10
WORK = Path(os.environ.get("EDGE_CONFIGS_WORK", "/tmp/edge-configs"))  # the work folder
import random
TXT = ' '.join(random.Random(0).choices(['alpha','beta','gamma','delta','epsilon','zeta'], k=150))

def prep(work):
    import scale
    from embedpipe.config import load_settings
    from embedpipe.backends import build_embedder
    from embedpipe.index import IndexVersions
    work = Path(work)
    run = next(p for p in work.iterdir() if p.name.startswith("edge-"))
    settings = load_settings(config=run / "embedpipe.toml", env=os.environ)
    versions = IndexVersions.open(settings)
    live = versions.require_live(scale.INDEX)
    from embedpipe.engine import close_all
    ids, matrix, langs = scale.exact_data(settings, live.fingerprint)
    close_all()
    queries = json.loads(next(work.glob("queries-*.json")).read_text())
    emb = build_embedder(settings.profile(live.profile), settings)
    qvec = np.stack([emb.embed_query(q["text"]) for q in queries[scale.WARMUP:]]).astype(np.float32)
    src = np.array([ids.index(q["from"]) for q in queries[scale.WARMUP:]])
    # in-distribution queries: 200 docs' own vectors perturbed? use held-in doc vectors (exclude self)
    tops = scale.exact_top(matrix, qvec, K)
    np.savez(str(WORK / "data.npz"), matrix=matrix, qvec=qvec, exact=np.array([t[0] for t in tops]), src=src)
    print(matrix.shape, qvec.shape)

def run(name, cfg):
    from qdrant_edge import (Distance, EdgeConfig, EdgeShard, EdgeVectorParams, HnswIndexConfig, Point,
        UpdateOperation, Query, QueryRequest, SearchParams, QuantizationSearchParams, ScalarQuantizationConfig,
        ScalarType, BinaryQuantizationConfig, BinaryQuantizationEncoding, BinaryQuantizationQueryEncoding,
        EdgeOptimizersConfig, Memory, TurboQuantQuantizationConfig, TurboQuantBitSize)
    d = np.load(str(WORK / "data.npz"))
    matrix, qvec, exact = d["matrix"], d["qvec"], d["exact"]
    matrix = matrix[:cfg.get("n", len(matrix))]
    q = {}
    if cfg.get("quant") == "int8":
        q["quantization_config"] = ScalarQuantizationConfig(type=ScalarType.Int8, quantile=0.99, always_ram=True)
    elif cfg.get("quant") == "bq2":
        q["quantization_config"] = BinaryQuantizationConfig(always_ram=True, encoding=BinaryQuantizationEncoding.TwoBits, query_encoding=BinaryQuantizationQueryEncoding.Scalar8Bits)
    elif cfg.get("quant", "").startswith("tq"):
        q["quantization_config"] = TurboQuantQuantizationConfig(always_ram=True, bits=getattr(TurboQuantBitSize, "Bits" + cfg["quant"][2:]))
    opt = {}
    if cfg.get("maxseg"):
        opt["optimizers"] = EdgeOptimizersConfig(max_segment_size=cfg["maxseg"])
    vp = dict(size=matrix.shape[1], distance=Distance.Cosine)
    if cfg.get("vmem"):
        vp["memory"] = getattr(Memory, cfg["vmem"])
    hn = dict(m=cfg.get("m", 16), ef_construct=cfg.get("efc", 100), full_scan_threshold=10_000)
    if cfg.get("hmem"):
        hn["memory"] = getattr(Memory, cfg["hmem"])
    if cfg.get("pmem"): opt["payload_memory"] = getattr(Memory, cfg["pmem"])
    config = EdgeConfig(vectors=EdgeVectorParams(**vp), hnsw_config=HnswIndexConfig(**hn), **q, **opt)
    path = (WORK / "shards") / name
    import shutil; shutil.rmtree(path, ignore_errors=True); path.parent.mkdir(parents=True, exist_ok=True)
    shard = EdgeShard.create(str(path), config)
    t0 = time.perf_counter()
    for s in range(0, len(matrix), 1024):
        pts = [Point(i, matrix[i].tolist(), {"id": f"doc-{i}", **({"text": TXT} if cfg.get("text") else {})}) for i in range(s, min(s + 1024, len(matrix)))]
        shard.update(UpdateOperation.upsert_points(pts))
    load = time.perf_counter() - t0
    open(str(WORK / "phase"), "w").write("optimize")
    t0 = time.perf_counter(); shard.optimize(); shard.flush(); build = time.perf_counter() - t0
    open(str(WORK / "phase"), "w").write("search")
    info = shard.info()
    out = {"name": name, "cfg": cfg, "n": len(matrix), "load_s": load, "build_s": build,
           "segments": getattr(info, "segments_count", None)}
    for ef in cfg.get("efs", [None]):
        for ov in cfg.get("overs", [None]):
            params = {}
            if ef: params["hnsw_ef"] = ef
            if cfg.get("exact"): params["exact"] = True
            if ov: params["quantization"] = QuantizationSearchParams(rescore=True, oversampling=ov)
            lat, rec = [], []
            for i, v in enumerate(qvec):
                t = time.perf_counter()
                hits = shard.query(QueryRequest(limit=K, query=Query.Nearest(v.tolist()), with_payload=False,
                                                params=SearchParams(**params) if params else None))
                lat.append(time.perf_counter() - t)
                rec.append(len({int(h.id) for h in hits} & set(exact[i].tolist())) / K)
            out[f"ef{ef}_ov{ov}"] = {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3), "recall": float(np.mean(rec))}
    shard.close()
    du = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True).stdout.split()[0]
    out["disk_mb"] = int(du)
    print(json.dumps(out))

def sample(pid, out):
    peak = {"anon": 0, "file": 0, "rss": 0}; peaks_by_phase = {}
    while True:
        try:
            txt = open(f"/proc/{pid}/smaps_rollup").read()
        except OSError:
            break
        vals = {l.split(":")[0]: int(l.split()[1]) for l in txt.splitlines()[1:] if l.split()[-1] == "kB"}
        ph = open(str(WORK / "phase")).read() if os.path.exists(str(WORK / "phase")) else "?"
        cur = {"anon": vals.get("Anonymous", 0) // 1024, "file": (vals.get("Rss", 0) - vals.get("Anonymous", 0)) // 1024, "rss": vals.get("Rss", 0) // 1024}
        pp = peaks_by_phase.setdefault(ph, {"anon": 0, "file": 0, "rss": 0})
        for k in cur: pp[k] = max(pp[k], cur[k])
        time.sleep(0.2)
    json.dump(peaks_by_phase, open(out, "w"))

if __name__ == "__main__":
    WORK.mkdir(parents=True, exist_ok=True)
    if sys.argv[1] == "prep": prep(sys.argv[2])
    elif sys.argv[1] == "run": run(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1] == "go":  # spawn run + sample
        name, cfg = sys.argv[2], sys.argv[3]
        if os.path.exists(str(WORK / "phase")): os.remove(str(WORK / "phase"))
        p = subprocess.Popen([sys.executable, __file__, "run", name, cfg], stdout=subprocess.PIPE, text=True)
        import threading
        th = threading.Thread(target=sample, args=(p.pid, str(WORK / f"{name}.mem.json"))); th.start()
        res = p.communicate()[0]; th.join()
        r = json.loads(res.strip().splitlines()[-1]); r["mem_mb"] = json.load(open(str(WORK / f"{name}.mem.json")))
        print(json.dumps(r)); open(str(WORK / "results.jsonl"), "a").write(json.dumps(r) + "\n")
