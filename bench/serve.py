"""What ``embedpipe serve`` adds to a search, and how searches from many clients share the
server (issue 19 item 6).

Why: one server owns a data directory's engine, so every other process searches through
it over HTTP. That hop must cost little next to ``Index.search`` in-process (goal: at most
2 ms added at p50), and the server must keep answering many clients while documents are
written (goal: no errors). Qdrant Edge's Python binding holds the GIL while it searches
and the query is embedded on the CPU, so the searches of one server process take turns;
part 3 and the client sweep of part 2 say what concurrency is worth there.

Corpus: the Cranfield abstracts (``--cranfield``; its 225 queries), else 1,400 synthetic
documents of ``bench/memory_flat.py``'s kind (``--docs``) with 6-12-word snippets of them
as queries. The index ``bench`` is built on the static model distilled from the bundled
MiniLM (``_common.distill_static``); with ``--profiles static,local-minilm`` (the default)
also ``bench-minilm`` on all-MiniLM-L6-v2 (CPU), for part 1 only. Everything lives in a
temporary folder, removed at the end.

The fairness design: Qdrant Edge lets one process hold a data directory's engine (its
lock), so the in-process side and the server cannot open the same folder. The index is
built once, in this process, into ``inproc/data``; the engine is closed, and the whole
data directory is copied to ``served/data`` (same segments, same HNSW graph, same corpus
and catalogue; the top hits of every warm-up query are checked to be the same on both
sides). This process keeps ``inproc/data`` open through ``Index``; ``embedpipe serve``
(the CLI users run, ``--port 0``, found through its ``server.json``, its configuration as
shipped: uvicorn's access log on, to a file) owns ``served/data``. Both stay open for the
whole run, so neither pays a reopen and each has its own warm page cache.

1. **Added cost per query**, per index: ``Index.search(q, k=10)`` in this process against
   ``POST /v1/indexes/{name}/search`` (``{"query": q, "k": 10}``) through one
   ``httpx.Client`` (keep-alive, status checked, JSON body parsed: what an application
   does). After ``--warmup`` untimed queries per side, blocks of four calls with one query,
   ABBA then BAAB, over every query ``--passes`` times; each call timed with
   ``perf_counter``. While one side runs the other is idle, so both see the same machine.
   Reported: p50/p95/mean per side; the added cost as the difference of the p50s and of
   the p95s, and as the paired differences (server - in-process, the two pairs of each
   block): median with a bootstrap 95% interval, and p95. The floor of any request,
   ``GET /healthz`` (no threadpool, no engine), is timed too.
2. **Many clients**, on ``bench``: a separate client process (this script with
   ``--load-job``; asyncio, an ``httpx.AsyncClient`` per searcher with one keep-alive
   connection each, so the clients' own Python never runs inside the server) runs
   searchers that each send the next query as soon as the last is answered. In order:
   ``--sweep`` searchers (1, 4, 8; ``--sweep-seconds`` each); ``--clients`` (32) for
   ``--seconds`` (60) without a writer, the baseline; the same with a writer posting
   ``--writer-batch`` new documents at a time to ``POST /v1/indexes/bench/documents``,
   back to back, for the whole window (run after the next, whose sync would delete
   documents that are not in its source); the same with a sync instead: ``bench``'s source
   (the JSONL it was built from) grows by ``--writer-batch`` documents, a sync job runs in
   the server (``POST /v1/jobs``, followed until it ends), and again, for the whole
   window, so every search meets a sync reading, diffing, embedding and writing; and the
   32 again with neither (``--sweep-seconds``), on the index they grew, so a slower
   search after them is told apart from their own cost. New texts are corpus texts with a
   unique suffix, so each is embedded and written (not reused from the vector store).
   Reported per run: searches per second, p50/p95/p99/max, errors by kind (goal 0), the
   CPU seconds per second of the window of the server (from ``/proc/<pid>/stat``) and of
   the client process, and per search; with a writer or sync: batches (syncs), documents
   written, batch (sync) latency, and the searches begun while one was in flight apart
   from the others.
3. **In-process threads**: ``Index.search`` from ``--threads`` threads of this process
   (``--thread-seconds`` each): searches per second and CPU seconds per second, the
   ceiling of one Python process whatever serves it.

Run from the repository root (``make bench-serve``)::

    .venv/bin/python bench/serve.py [--passes 4] [--clients 32] [--seconds 60]
        [--sweep 1,4,8] [--sweep-seconds 20] [--profiles static,local-minilm]
    .venv/bin/python bench/serve.py --quick    # smoke run: 200 documents, seconds not minutes

Results go to ``bench/results/serve.json`` (``--output``; a ``--quick`` run writes
``embedpipe-bench-serve-quick.json`` in the temporary directory unless ``--output`` is given). Latencies and rates depend on the machine
and its other load (recorded in the file); the client shares the server's CPUs. Exits 1
if the server failed to start or a search failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "serve.json"
PACKAGES = ("embedpipe", "qdrant-edge-py", "fastapi", "uvicorn", "httpx", "pydantic",
            "sentence-transformers", "torch", "model2vec")
K = 10
GOAL_ADDED_P50_MS = 2.0
INDEXES = {"static": "bench", "local-minilm": "bench-minilm"}
START_TIMEOUT_S = 300
SEED = 20261205
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- helpers


def summary(ms: list[float] | np.ndarray) -> dict[str, float]:
    x = np.asarray(ms, dtype=float)
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "p50": float(np.median(x)), "p95": float(np.percentile(x, 95)),
            "p99": float(np.percentile(x, 99)), "mean": float(x.mean()), "max": float(x.max())}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(EMBEDPIPE_CACHE_DIR=str(work / "cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


# --------------------------------------------------------------------------- corpus


def corpus(args: argparse.Namespace) -> tuple[list[common.Doc], list[str], str]:
    """(documents, queries, what they are): Cranfield, else synthetic documents."""
    if common.missing_cranfield(args.cranfield) is None:
        from embedpipe.evaluation import read_cranfield

        docs, empty = common.load_docs(args.cranfield, args.limit)
        queries = list(read_cranfield(args.cranfield).queries.values())
        return docs, queries, (f"Cranfield: {len(docs)} abstracts (empty records left out: "
                               f"{', '.join(empty) or 'none'}), its {len(queries)} queries")
    import memory_flat

    words, source = memory_flat.vocabulary(args.cranfield)
    rng = random.Random(SEED)
    n = args.limit or args.docs
    docs = [common.Doc(f"doc-{i:06d}", " ".join(rng.choices(words, k=rng.randint(*memory_flat.WORDS)))
                       + f" (record {i})") for i in range(n)]
    queries = []
    for d in rng.sample(docs, min(225, n)):
        ws = d.text.split()
        size = rng.randint(6, 12)
        start = rng.randrange(len(ws) - size + 1)
        queries.append(" ".join(ws[start:start + size]))
    return docs, queries, (f"synthetic: {n} documents of 60-150 words from the {source}, "
                           f"{len(queries)} queries of 6-12 consecutive words of them "
                           "(Cranfield not found)")


def write_config(folder: Path, model_dir: Path, source: Path) -> Path:
    """``bench`` syncs from ``source`` (the JSONL it is first built from)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "embedpipe.toml"
    config.write_text('data_dir = "data"\ndefault_profile = "static"\n'
                      + common.static_profile_toml(model_dir, "static")
                      + f'[indexes.bench]\nsource = "{source}"\n', encoding="utf-8")
    return config


# --------------------------------------------------------------------------- the server


class Server:
    """``embedpipe serve --port 0`` on ``config``, as tests/serve/conftest.py starts it."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.log = config.parent / "serve.log"
        cmd = [sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(config), "--port", "0"]
        self.command = shlex.join(cmd)
        with self.log.open("wb") as out:  # a file, not a pipe: a full pipe would stall it
            self.proc = subprocess.Popen(cmd, cwd=config.parent, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        info = config.parent / "data" / "server.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedpipe serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                found = json.loads(info.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found = {}
            if found.get("pid") == self.proc.pid:
                self.url = found["url"]
                return
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"embedpipe serve wrote no server.json in {START_TIMEOUT_S} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def log_problems(self) -> int:
        """Lines of the server's log that report an error (an access-log line never does)."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return sum(1 for line in text.splitlines() if "ERROR" in line or "Traceback" in line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


# --------------------------------------------------------------------------- part 1


def added_cost(index: Any, http: Any, name: str, queries: list[str], passes: int,
               warmup: int) -> dict[str, Any]:
    """Part 1 for one index: ABBA blocks of in-process and server searches."""
    path = f"/v1/indexes/{name}/search"

    def served(q: str) -> list[dict[str, Any]]:
        answer = http.post(path, json={"query": q, "k": K})
        answer.raise_for_status()
        return answer.json()["hits"]  # type: ignore[no-any-return]

    calls = {"in-process": lambda q: index.search(q, k=K), "server": served}
    same = 0
    for q in queries[:warmup]:  # untimed; also proves both sides hold the same index
        mine = [h.id for h in calls["in-process"](q)]
        same += mine == [h["id"] for h in calls["server"](q)]
    ms: dict[str, list[float]] = {"in-process": [], "server": []}
    blocks = len(queries) * passes
    for b in range(blocks):
        q = queries[b % len(queries)]
        a, c = ("in-process", "server") if b % 2 == 0 else ("server", "in-process")
        for side in (a, c, c, a):
            t0 = perf_counter()
            calls[side](q)
            ms[side].append((perf_counter() - t0) * 1e3)
    ip, sv = np.asarray(ms["in-process"]), np.asarray(ms["server"])
    diffs = sv - ip  # pairs: the n-th call of each side, two per block
    rng = np.random.default_rng(SEED)
    boots = np.median(diffs[rng.integers(0, diffs.size, (2000, diffs.size))], axis=1)
    s_ip, s_sv = summary(ip), summary(sv)
    return {
        "index": name, "blocks": blocks, "warmup": warmup,
        "same_top_ids_in_warmup": f"{same}/{min(warmup, len(queries))}",
        "in_process_ms": s_ip, "server_ms": s_sv,
        "added_ms": {"p50": s_sv["p50"] - s_ip["p50"], "p95": s_sv["p95"] - s_ip["p95"],
                     "mean": s_sv["mean"] - s_ip["mean"]},
        "paired_added_ms": {"median": float(np.median(diffs)), "p95": float(np.percentile(diffs, 95)),
                            "median_ci95": [float(np.percentile(boots, 2.5)),
                                            float(np.percentile(boots, 97.5))], "n": int(diffs.size)},
        "goal_p50_ms": GOAL_ADDED_P50_MS,
        "goal_met": bool(np.median(diffs) <= GOAL_ADDED_P50_MS),
    }


def healthz_floor(http: Any, n: int) -> dict[str, float]:
    for _ in range(20):
        http.get("/healthz").raise_for_status()
    ms = []
    for _ in range(n):
        t0 = perf_counter()
        http.get("/healthz").raise_for_status()
        ms.append((perf_counter() - t0) * 1e3)
    return summary(ms)


# --------------------------------------------------------------------------- part 3


def thread_sweep(index: Any, queries: list[str], threads: list[int], seconds: float) -> list[dict[str, Any]]:
    """``Index.search`` from N threads of this process: searches/s and CPU s per s."""
    out = []
    for n in threads:
        counts = [0] * n
        deadline = perf_counter() + seconds

        def loop(w: int) -> None:
            i = w * 17
            while perf_counter() < deadline:
                index.search(queries[i % len(queries)], k=K)
                i += 1
                counts[w] += 1

        cpu0, t0 = time.process_time(), perf_counter()
        pool = [threading.Thread(target=loop, args=(w,)) for w in range(n)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = perf_counter() - t0
        out.append({"threads": n, "seconds": wall, "searches": sum(counts),
                    "searches_per_s": sum(counts) / wall, "cpu_s_per_s": (time.process_time() - cpu0) / wall})
    return out


# --------------------------------------------------------------------------- part 2 (client process)


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx

    queries: list[str] = json.loads(Path(spec["queries"]).read_text(encoding="utf-8"))
    clients, index, batch = spec["clients"], spec["index"], spec["writer_batch"]
    texts: list[str] = json.loads(Path(spec["texts"]).read_text(encoding="utf-8")) if spec["writer"] else []
    search = f"/v1/indexes/{index}/search"
    lat: list[float] = []
    lat_writing: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    per_second: collections.Counter[int] = collections.Counter()
    writes: dict[str, Any] = {"batches": 0, "added": 0, "embedded": 0, "ms": [], "errors": collections.Counter()}
    in_flight = [False]  # a documents batch is being written now
    # A client each, with one keep-alive connection: 32 searchers sharing one client's pool
    # cost httpx about 3x the CPU per request (2.8 against 0.9 ms in a smoke run here),
    # enough to make the client process, not the server, the bottleneck.
    own = [httpx.AsyncClient(base_url=spec["url"], timeout=spec["timeout_s"],
                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
           for _ in range(clients)]
    async with contextlib.AsyncExitStack() as stack:
        for c in own:
            await stack.enter_async_context(c)
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=spec["url"], timeout=spec["timeout_s"]))
        # Untimed: one search per client, at once, so every connection is open.
        warm = await asyncio.gather(*(c.post(search, json={"query": queries[i % len(queries)], "k": K})
                                      for i, c in enumerate(own)))
        if any(r.status_code != 200 for r in warm):
            raise RuntimeError(f"warm-up search failed: {warm[0].status_code} {warm[0].text[:300]}")
        start = perf_counter()
        deadline = start + spec["seconds"]

        async def searcher(w: int, client: httpx.AsyncClient) -> None:
            i = w * 7
            while perf_counter() < deadline:
                q = queries[i % len(queries)]
                i += 1
                writing = in_flight[0]
                t0 = perf_counter()
                try:
                    answer = await client.post(search, json={"query": q, "k": K})
                    ok = answer.status_code == 200 and len(answer.json()["hits"]) == K
                    kind = None if ok else f"HTTP {answer.status_code}: {answer.text[:200]}"
                except httpx.HTTPError as exc:
                    kind = f"{type(exc).__name__}: {exc}"[:200]
                t1 = perf_counter()
                if kind is None:
                    (lat_writing if writing else lat).append((t1 - t0) * 1e3)
                    per_second[int(t1 - start)] += 1
                else:
                    errors[kind] += 1

        def new_docs(b: int) -> list[dict[str, str]]:
            """Batch ``b``: corpus texts with a unique suffix, so each is embedded and written."""
            return [{"id": f"{spec['prefix']}-{b:05d}-{j:03d}",
                     "text": f"{texts[(b * batch + j) % len(texts)]} (revision {spec['prefix']}.{b}.{j})"}
                    for j in range(batch)]

        async def post_documents(docs: list[dict[str, str]]) -> tuple[dict[str, Any] | None, str]:
            answer = await http.post(f"/v1/indexes/{index}/documents", json={"documents": docs})
            if answer.status_code == 200:
                return answer.json(), ""
            return None, f"HTTP {answer.status_code}: {answer.text[:200]}"

        async def run_sync(docs: list[dict[str, str]]) -> tuple[dict[str, Any] | None, str]:
            """Grow the source by the batch, run a sync job in the server and wait for it."""
            with open(spec["source"], "a", encoding="utf-8") as out:
                out.writelines(json.dumps(d) + "\n" for d in docs)
            answer = await http.post("/v1/jobs", json={"kind": "sync", "index": index})
            job = answer.json()
            while answer.status_code < 300 and job["state"] in ("queued", "running"):
                await asyncio.sleep(0.05)
                answer = await http.get(f"/v1/jobs/{job['id']}")
                job = answer.json()
            if answer.status_code < 300 and job["state"] == "succeeded":
                return job["result"], ""
            return None, f"HTTP {answer.status_code}: {str(job.get('error') or job)[:200]}"

        async def writing(write: Any) -> None:
            """``write`` batch after batch for the whole window, timed and counted."""
            b = 0
            while perf_counter() < deadline:
                docs = new_docs(b)
                in_flight[0] = True
                t0 = perf_counter()
                try:
                    report, error = await write(docs)
                except httpx.HTTPError as exc:
                    report, error = None, f"{type(exc).__name__}: {exc}"[:200]
                finally:
                    in_flight[0] = False
                if report is not None:
                    writes["added"] += report["added"]
                    writes["embedded"] += report["embedded"]
                else:
                    writes["errors"][error] += 1
                writes["ms"].append((perf_counter() - t0) * 1e3)
                writes["batches"] += 1
                b += 1

        server0, own0 = process_cpu_s(spec["server_pid"]), time.process_time()
        writers = {"documents": post_documents, "sync": run_sync}
        tasks = [searcher(w, c) for w, c in enumerate(own)] + (
            [writing(writers[spec["writer"]])] if spec["writer"] else [])
        await asyncio.gather(*tasks)
        wall = perf_counter() - start
        server_cpu, own_cpu = process_cpu_s(spec["server_pid"]) - server0, time.process_time() - own0
    done = lat + lat_writing
    result: dict[str, Any] = {
        "clients": clients, "writer": spec["writer"], "seconds": wall, "searches": len(done),
        "searches_per_s": len(done) / wall, "latency_ms": summary(done),
        "errors": sum(errors.values()), "error_kinds": dict(errors),
        "server_cpu_s_per_s": server_cpu / wall, "client_cpu_s_per_s": own_cpu / wall,
        "server_cpu_ms_per_search": server_cpu / max(len(done), 1) * 1e3,
        "client_cpu_ms_per_search": own_cpu / max(len(done), 1) * 1e3,
        "searches_per_second_of_window": [per_second[s] for s in range(int(wall) + 1)],
    }
    if spec["writer"]:
        result.update(
            latency_ms_while_writing=summary(lat_writing), latency_ms_not_writing=summary(lat),
            writes={"batches": writes["batches"], "batch_size": batch, "documents_added": writes["added"],
                    "documents_embedded": writes["embedded"], "documents_per_s": writes["added"] / wall,
                    "batch_ms": summary(writes["ms"]), "errors": sum(writes["errors"].values()),
                    "error_kinds": dict(writes["errors"])})
    return result


def load(spec: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one window of part 2 in a fresh client process (``--load-job``)."""
    path = work / f"load-{spec['name']}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load-job", str(path)]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          timeout=spec["seconds"] + 600)
    try:
        return {"name": spec["name"], **json.loads(done.stdout.strip().splitlines()[-1])}
    except (json.JSONDecodeError, IndexError):
        return {"name": spec["name"], "failed": {"returncode": done.returncode,
                                                 "stderr_tail": done.stderr[-3000:]}}


# --------------------------------------------------------------------------- report


def print_tables(result: dict[str, Any]) -> None:
    p1 = result["added_cost"]
    print(f"\n1. One query at a time, top {K}: Index.search in-process vs POST .../search through "
          f"embedpipe serve\n   (ABBA blocks; ms)")
    print(f"{'index (profile)':<30}{'path':<12}{'p50':>8}{'p95':>8}{'mean':>8}")
    print("-" * 66)
    for profile, r in p1.items():
        label = f"{r['index']} ({profile})"
        for side, key in (("in-process", "in_process_ms"), ("server", "server_ms")):
            s = r[key]
            print(f"{label:<30}{side:<12}{s['p50']:>8.2f}{s['p95']:>8.2f}{s['mean']:>8.2f}")
            label = ""
        a, p = r["added_ms"], r["paired_added_ms"]
        print(f"{'':<30}{'added':<12}{a['p50']:>+8.2f}{a['p95']:>+8.2f}{a['mean']:>+8.2f}")
        print(f"{'':<30}paired: median {p['median']:+.2f} ms (95% CI {p['median_ci95'][0]:+.2f} to "
              f"{p['median_ci95'][1]:+.2f}), p95 {p['p95']:+.2f} ms")
        print(f"{'':<30}goal <= {GOAL_ADDED_P50_MS:g} ms added at p50: {'met' if r['goal_met'] else 'NOT met'}; "
              f"same top-{K} ids on both sides in the warm-up: {r['same_top_ids_in_warmup']}")
    h = result["healthz_ms"]
    print(f"GET /healthz (HTTP floor): p50 {h['p50']:.2f} ms, p95 {h['p95']:.2f} ms")

    print("\n2. Concurrent searches through the server (index bench, static model; ms)")
    head = (f"{'run':<18}{'clients':>8}{'s':>6}{'req/s':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
            f"{'errors':>7}{'srv CPU':>8}{'cli CPU':>8}")
    print(head)
    print("-" * len(head))
    for r in result["load"]:
        if "failed" in r:
            print(f"{r['name']:<18} FAILED: {r['failed']['stderr_tail'][-300:]}")
            continue
        s = r["latency_ms"]
        print(f"{r['name']:<18}{r['clients']:>8}{r['seconds']:>6.0f}{r['searches_per_s']:>8.1f}"
              f"{s['p50']:>8.1f}{s['p95']:>8.1f}{s['p99']:>8.1f}{s['max']:>8.1f}{r['errors']:>7}"
              f"{r['server_cpu_s_per_s']:>8.2f}{r['client_cpu_s_per_s']:>8.2f}")
        if r.get("writes"):
            w, a, b = r["writes"], r["latency_ms_while_writing"], r["latency_ms_not_writing"]
            what = ("sync jobs, each of", "sync") if r["writer"] == "sync" else ("documents batches of", "batch")
            print(f"{'':<18}{r['writer']}: {w['batches']} {what[0]} {w['batch_size']} new, {w['documents_added']} "
                  f"documents added ({w['documents_per_s']:.0f}/s), {what[1]} p50 {w['batch_ms']['p50']:.0f} ms "
                  f"max {w['batch_ms']['max']:.0f} ms, {w['errors']} errors")
            if a.get("n") and b.get("n"):
                print(f"{'':<18}searches begun while a {what[1]} ran: {a['n']}, p50/p99 "
                      f"{a['p50']:.1f}/{a['p99']:.1f} ms; the others: {b['n']}, {b['p50']:.1f}/{b['p99']:.1f} ms")
    print("\n3. Index.search from threads of one process (no server)")
    print(f"{'threads':>8}{'searches/s':>12}{'CPU s/s':>9}")
    for t in result["threads"]:
        print(f"{t['threads']:>8}{t['searches_per_s']:>12.1f}{t['cpu_s_per_s']:>9.2f}")


# --------------------------------------------------------------------------- main


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=4, help="part 1: passes over the queries (default 4)")
    p.add_argument("--warmup", type=int, default=50, help="part 1: untimed queries per side (default 50)")
    p.add_argument("--profiles", default="static,local-minilm",
                   help="part 1: indexes to build, by profile (default static,local-minilm)")
    p.add_argument("--clients", type=int, default=32, help="part 2: concurrent searchers (default 32)")
    p.add_argument("--seconds", type=float, default=60, help="part 2: window with and without the writer (60)")
    p.add_argument("--writer-batch", type=int, default=64, help="part 2: documents per batch (default 64)")
    p.add_argument("--sweep", type=ints, default=[1, 4, 8], help="part 2: client counts (default 1,4,8)")
    p.add_argument("--sweep-seconds", type=float, default=20, help="part 2: seconds per sweep run (20)")
    p.add_argument("--threads", type=ints, default=[1, 4], help="part 3: thread counts (default 1,4)")
    p.add_argument("--thread-seconds", type=float, default=5, help="part 3: seconds each (default 5)")
    p.add_argument("--limit", type=int, default=None, help="index the first N documents")
    p.add_argument("--docs", type=int, default=1400, help="synthetic documents without Cranfield (1400)")
    p.add_argument("--cranfield", type=Path, default=common.DEFAULT_CRANFIELD)
    p.add_argument("--output", type=Path, default=None, help=f"default {DEFAULT_OUTPUT}")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 documents, short windows")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.passes, args.warmup = args.limit or 200, 1, 10
        args.seconds, args.sweep_seconds, args.thread_seconds = 3, 2, 1
        args.profiles = "static"
    args.profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    unknown = [x for x in args.profiles if x not in INDEXES]
    if unknown or "static" not in args.profiles:
        p.error(f"--profiles: a list of {', '.join(INDEXES)}, static included")
    if args.passes < 1 or args.clients < 1 or args.seconds <= 0 or args.writer_batch < 1:
        p.error("--passes, --clients, --seconds and --writer-batch must be positive")
    args.cranfield = args.cranfield.expanduser().resolve()
    if args.output is not None:
        args.output = args.output.expanduser().resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load-job"]:
        spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        print(json.dumps(asyncio.run(_load(spec))))
        return 0
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    load_at_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-serve-") as tmp:
        work = Path(tmp)
        env = child_env(work)
        os.environ["EMBEDPIPE_CACHE_DIR"] = env["EMBEDPIPE_CACHE_DIR"]  # this process too
        result = run(args, work, env, command)
        result["loadavg_at_start"] = load_at_start
        print_tables(result)
        output = args.output or (work.parent / "embedpipe-bench-serve-quick.json" if args.quick
                                 else DEFAULT_OUTPUT)
        common.write_result(output, result, PACKAGES)
    failed = any("failed" in r or r["errors"] or r.get("writes", {}).get("errors") for r in result["load"])
    return 1 if failed else 0


def run(args: argparse.Namespace, work: Path, env: dict[str, str], command: str) -> dict[str, Any]:
    import httpx

    from embedpipe.config import load_settings
    from embedpipe.engine import close_all
    from embedpipe.index import Index
    from embedpipe.ingest import ingest

    docs, queries, source = corpus(args)
    t0 = perf_counter()
    model_dir = common.distill_static(work / "static")
    print(f"distilled the static model in {perf_counter() - t0:.1f} s", flush=True)
    jsonl = common.write_jsonl(docs, work / "docs.jsonl")  # also bench's sync source, grown by part 2
    inproc, served = write_config(work / "inproc", model_dir, jsonl), write_config(work / "served", model_dir, jsonl)
    settings = load_settings(inproc, env={})
    builds = {}
    for profile in args.profiles:
        t0 = perf_counter()
        report = ingest(settings, INDEXES[profile], jsonl, profile=profile)
        builds[profile] = {"index": INDEXES[profile], "seconds": perf_counter() - t0,
                           "added": report.added, "collection": report.collection}
        print(f"built {INDEXES[profile]} ({profile}): {report.added} documents in "
              f"{builds[profile]['seconds']:.1f} s", flush=True)
    close_all()  # release Edge's lock, then give the server an identical copy
    shutil.copytree(settings.data_dir, served.parent / "data")
    (work / "queries.json").write_text(json.dumps(queries), encoding="utf-8")
    (work / "texts.json").write_text(json.dumps([d.text for d in docs]), encoding="utf-8")

    server = Server(served, env)
    print(f"embedpipe serve pid {server.pid} at {server.url}", flush=True)
    try:
        indexes = {p: Index(INDEXES[p], settings) for p in args.profiles}
        part1 = {}
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for profile, index in indexes.items():
                part1[profile] = added_cost(index, http, INDEXES[profile], queries, args.passes, args.warmup)
                r = part1[profile]
                print(f"part 1, {profile}: in-process p50 {r['in_process_ms']['p50']:.2f} ms, server "
                      f"{r['server_ms']['p50']:.2f} ms, paired added {r['paired_added_ms']['median']:+.2f} ms",
                      flush=True)
            floor = healthz_floor(http, 500 if not args.quick else 50)
        n = args.clients
        runs = [(f"{c} client{'s' * (c > 1)}", c, False, args.sweep_seconds) for c in args.sweep]
        # The sync before the documents writer: documents posted through the API are not
        # in the source, so a sync after them would (rightly) refuse to delete them all.
        runs += [(f"{n} no writer", n, False, args.seconds), (f"{n} + sync", n, "sync", args.seconds),
                 (f"{n} + writer", n, "documents", args.seconds), (f"{n} after writers", n, False, args.sweep_seconds)]
        part2 = []
        for i, (name, clients, writer, seconds) in enumerate(runs):
            spec = {"name": name.replace(" ", "-").replace("+", "with"), "url": server.url, "index": "bench",
                    "clients": clients, "writer": writer, "seconds": seconds, "writer_batch": args.writer_batch,
                    "queries": str(work / "queries.json"), "texts": str(work / "texts.json"),
                    "source": str(jsonl),
                    "prefix": f"w{i}", "server_pid": server.pid, "timeout_s": 120}
            r = load(spec, work, env)
            r["name"] = name
            part2.append(r)
            print(f"part 2, {name}: " + (f"FAILED {r['failed']['stderr_tail'][-500:]}" if "failed" in r else
                  f"{r['searches_per_s']:.1f} searches/s, p50 {r['latency_ms']['p50']:.1f} ms, "
                  f"p99 {r['latency_ms']['p99']:.1f} ms, {r['errors']} errors"), flush=True)
        part3 = thread_sweep(indexes["static"], queries, args.threads, args.thread_seconds)
        print("part 3: " + ", ".join(f"{t['threads']} threads {t['searches_per_s']:.0f}/s" for t in part3),
              flush=True)
    finally:
        exit_code = server.stop()
        close_all()
    return {
        "command": command, "argv": sys.argv, "cwd": str(Path.cwd()), "corpus": source,
        "n_docs": len(docs), "n_queries": len(queries), "k": K, "builds": builds,
        "server": {"command": server.command, "exit_code_after_sigterm": exit_code,
                   "log_error_lines": server.log_problems(),
                   "config": "as shipped: uvicorn, one process, access log at info to a file; "
                             "searches in FastAPI's threadpool; [server] defaults"},
        "design": "index built once in this process, engine closed, data directory copied; "
                  "in-process Index on one copy, embedpipe serve on the other, both open all run",
        "added_cost": part1, "healthz_ms": floor, "load": part2, "threads": part3,
        "settings": {"passes": args.passes, "warmup": args.warmup, "clients": args.clients,
                     "seconds": args.seconds, "writer_batch": args.writer_batch, "sweep": args.sweep,
                     "sweep_seconds": args.sweep_seconds, "threads": args.threads,
                     "thread_seconds": args.thread_seconds},
    }


if __name__ == "__main__":
    raise SystemExit(main())
