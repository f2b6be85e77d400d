"""Several client processes at once against one ``embedpipe serve`` (issue 19 item 5).

Four separate Python processes search two indexes (``alpha`` on the local static model,
``beta`` on the hosted profile) with httpx and ask ``/v1/embeddings`` for each index's
vectors with the official openai SDK, while a fifth process posts documents into
``alpha``. The writer starts only once every reader has answered a first round, and the
readers go on until the writer is done, so every write happens while all four read.
Every answer must be right: a 200, hits of the index asked (its collection, its
fingerprint, its documents, the queried document first) and vectors equal to the index
model's own, computed here in the test process; every batch written whole.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import EXAMPLES, LOOPBACK_KEY

from .conftest import server_env

HANG_GUARD_S = 300  # only against a hung process; no assertion depends on how fast anything runs
READERS = 4

# argv: URL SPEC-FILE FOLDER NUMBER. Prints {"rounds", "requests", "problems"} as JSON.
READER = textwrap.dedent("""
    import json, pathlib, sys
    import httpx, numpy as np, openai

    url, spec, folder, number = sys.argv[1], json.loads(pathlib.Path(sys.argv[2]).read_text()), \\
        pathlib.Path(sys.argv[3]), sys.argv[4]
    http = httpx.Client(base_url=url, timeout=120)
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    rounds, requests, problems = 0, 0, []

    def check(ok, what):
        if not ok:
            problems.append(what[:300])
        return ok

    while rounds < 2 or not (folder / "writer-done").exists():
        for name, index in spec.items():
            for query in index["queries"]:
                answer = http.post(f"/v1/indexes/{name}/search", json={"query": query["text"], "k": 3})
                requests += 1
                if not check(answer.status_code == 200, f"{name} search: {answer.status_code} {answer.text}"):
                    continue
                body, ids = answer.json(), [h["id"] for h in answer.json()["hits"]]
                check((body["index"], body["collection"], body["fingerprint"])
                      == (name, index["collection"], index["fingerprint"]), f"{name} search answered {body}")
                check(ids[:1] == [query["id"]] and all(i.startswith(index["prefix"]) for i in ids),
                      f"{name} search for {query['id']}: {ids}")
            try:
                reply = sdk.embeddings.create(model=f"index:{name}", input=index["texts"], encoding_format="float")
            except openai.APIError as exc:
                check(False, f"{name} embeddings: {exc!r}")
                continue
            finally:
                requests += 1
            got = np.array([d.embedding for d in sorted(reply.data, key=lambda d: d.index)], dtype=np.float32)
            check(reply.fingerprint == index["fingerprint"], f"{name} embeddings fingerprint {reply.fingerprint}")
            check(got.shape == np.shape(index["vectors"])
                  and np.allclose(got, np.array(index["vectors"], dtype=np.float32), rtol=0, atol=1e-6),
                  f"{name} embeddings differ from the index model's")
        rounds += 1
        if rounds == 1:
            (folder / f"reader-{number}-ready").touch()
    print(json.dumps({"rounds": rounds, "requests": requests, "problems": problems}))
""")

# argv: URL BATCHES-FILE FOLDER READERS. Waits for every reader's first round, posts each
# batch into alpha, then says it is done. Prints {"answers": [...], "problems"} as JSON.
WRITER = textwrap.dedent("""
    import json, pathlib, sys, time
    import httpx

    url, batches, folder, readers = sys.argv[1], json.loads(pathlib.Path(sys.argv[2]).read_text()), \\
        pathlib.Path(sys.argv[3]), int(sys.argv[4])
    while len(list(folder.glob("reader-*-ready"))) < readers:
        time.sleep(0.02)
    answers, problems = [], []
    with httpx.Client(base_url=url, timeout=120) as http:
        for batch in batches:
            answer = http.post("/v1/indexes/alpha/documents", json={"documents": batch})
            if answer.status_code != 200:
                problems.append(f"{answer.status_code} {answer.text[:300]}")
                continue
            report = answer.json()
            answers.append([report["added"], report["failed"], report["collection"]])
    (folder / "writer-done").touch()
    print(json.dumps({"answers": answers, "problems": problems}))
""")


def _texts(n: int, seed: int) -> list[str]:
    vocab = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", (EXAMPLES / "corpus" / "docs.jsonl").read_text())})
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(n)]
    assert len({frozenset(t.split()) for t in texts}) == n
    return texts


def _run(script: str, *args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, env=server_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict:
    try:
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a client process hung:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_four_reader_processes_and_a_writer_process_at_once(served, http, tmp_path, monkeypatch) -> None:
    from embedpipe.backends import build_embedder
    from embedpipe.config import load_settings

    monkeypatch.setenv("OPENAI_API_KEY", LOOPBACK_KEY)  # the hosted profile's vectors, asked for here too
    settings = load_settings(served.config)
    spec = {}
    for name, profile, prefix, seed in (("alpha", "static", "a-", 11), ("beta", "hosted", "b-", 12)):
        docs = [{"id": f"{prefix}{i}", "text": t} for i, t in enumerate(_texts(6, seed))]
        made = http.post(f"/v1/indexes/{name}/documents", json={"documents": docs, "profile": profile})
        assert made.status_code == 200, made.text
        status = http.get(f"/v1/indexes/{name}").json()
        (live,) = [v for v in status["versions"] if v["live"]]
        texts = [d["text"] for d in docs[:3]]
        embedder = build_embedder(settings.profile(profile), settings)
        assert embedder.fingerprint == live["fingerprint"]
        spec[name] = {"collection": live["collection"], "fingerprint": live["fingerprint"], "prefix": prefix,
                      "queries": [{"id": d["id"], "text": d["text"]} for d in docs[:4]],
                      "texts": texts, "vectors": embedder.embed_documents(texts).vectors.tolist()}
    # alpha and beta are different spaces (the same numbers, other fingerprints): a
    # search routed to the wrong index answers another collection and other documents.
    assert spec["alpha"]["fingerprint"] != spec["beta"]["fingerprint"]
    written = [[{"id": f"a-w{b}-{i}", "text": t} for i, t in enumerate(_texts(8, 100 + b))] for b in range(4)]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "batches.json").write_text(json.dumps(written))

    readers = [_run(READER, served.url, str(tmp_path / "spec.json"), str(tmp_path), str(n), cwd=tmp_path)
               for n in range(READERS)]
    writer = _run(WRITER, served.url, str(tmp_path / "batches.json"), str(tmp_path), str(READERS), cwd=tmp_path)
    try:
        wrote = _result(writer)
        read = [_result(r) for r in readers]
    finally:  # a failed process must not leave the others waiting
        (tmp_path / "writer-done").touch()
        for proc in [writer, *readers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)

    assert wrote["problems"] == []
    assert wrote["answers"] == [[8, 0, spec["alpha"]["collection"]]] * len(written)
    for result in read:
        assert result["problems"] == [] and result["rounds"] >= 2, result

    # Every batch whole, once; beta untouched.
    everything = http.post("/v1/indexes/alpha/search", json={"vector": [0.0625] * 256, "k": 50}).json()["hits"]
    ids = [h["id"] for h in everything]
    expected = {f"a-{i}" for i in range(6)} | {d["id"] for batch in written for d in batch}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert http.get("/v1/indexes/alpha").json()["documents"] == len(expected)
    assert http.get("/v1/indexes/beta").json()["documents"] == 6
