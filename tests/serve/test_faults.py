"""A served data directory under faults (issue 19 item 4), with real processes.

**kill -9 in the middle of a documents request.** ``embedpipe serve`` runs behind a hook
(the CLI's own ``main``, as in ``tests/test_durability.py``) that prints ``KILL`` and
hangs at a chosen moment of the request whose batch holds a trigger document; the test
reads that line from the server's log and sends SIGKILL. The moments: while a hosted
model's probe request is held by its upstream (no hook: the loopback server holds it;
nothing is written yet), while the batch is being embedded (its journal is written, the
engine untouched), after the engine acknowledged part of the batch, after it acknowledged
all of it but before the corpus commit, and after the corpus commit but before the
request finished. Before the kill, the
test sees through searches that the engine holds what that moment says; after a restart,
the batch is whole or absent (as the corpus says): the live version holds exactly the
corpus, every document once, updated documents with their corpus text, status agrees,
and sending the same batch again completes it. A first batch (the index's first version)
killed before its corpus commit leaves no live index.

**SIGTERM while a documents request runs.** The request is finished and answered, a
request arriving after the signal is refused (a new connection) or its connection closed
(an idle keep-alive one) and never done, then the server exits 0 and removes
``server.json``. Past ``[server] shutdown_wait_s`` it leaves without the request, and the
next start settles the batch.
"""

from __future__ import annotations

import random
import re
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import EXAMPLES, hosted_profile_toml, static_profile_toml
from embedpipe.corpus import CorpusStore, content_hash

from .conftest import Served, start_server

HANG_GUARD_S = 300  # only against a hung server; no assertion depends on how fast anything runs
WINDOW = 16  # documents per engine write, so a batch is several writes

# `embedpipe serve` behind a hook; argv: HOOK TRIGGER TRIGGER-TEXT CLI-ARGS... The hook
# acts only in the request whose batch holds the document TRIGGER (whose text is
# TRIGGER-TEXT): it prints "KILL <where>" and hangs that request (the rest of the server
# goes on answering) until the test kills the process.
HOOKED = textwrap.dedent("""
    import sys, time
    hook, trigger, trigger_text, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

    def hang(where):
        print("KILL", where, flush=True)
        while True:
            time.sleep(60)

    import embedpipe.ingest as ingest
    from embedpipe.backends.hosted import HostedEmbedder
    from embedpipe.index import IndexVersions
    if hook == "embedding":  # the window holding TRIGGER is being embedded
        real_embed = HostedEmbedder.embed_documents

        def embed_documents(self, texts):
            if trigger_text in texts:
                hang("embedding")
            return real_embed(self, texts)

        HostedEmbedder.embed_documents = embed_documents
    elif hook == "part-written":  # the engine acknowledged the window holding TRIGGER, not the rest
        real_upsert = IndexVersions.upsert

        def upsert(self, collection, ids, *rest, **kw):
            real_upsert(self, collection, ids, *rest, **kw)
            if trigger in ids:
                hang("part-written")

        IndexVersions.upsert = upsert
    elif hook in ("written", "committed"):  # every write acknowledged; the corpus commit not yet / done
        real_commit = ingest._commit_corpus

        def commit(corpus, staged, ids):
            if trigger in ids and hook == "written":
                hang("written")
            real_commit(corpus, staged, ids)
            if trigger in ids:
                hang("committed")

        ingest._commit_corpus = commit
    from embedpipe.cli import main
    sys.argv = ["embedpipe", *args]
    main()
""")


def _vocabulary() -> list[str]:
    return sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", (EXAMPLES / "corpus" / "docs.jsonl").read_text())})


def _texts(n: int, seed: int) -> list[str]:
    """``n`` texts of eight random words (distinct word bags, so distinct vectors)."""
    vocab, rng = _vocabulary(), random.Random(seed)
    texts = [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(n)]
    assert len({frozenset(t.split()) for t in texts}) == n
    return texts


SEED = [{"id": f"s{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(_texts(8, 1))]
# Two updates of seed documents, then 30 new ones: with WINDOW = 16, two engine writes.
BATCH = ([{"id": "s0", "text": "updated " + t, "metadata": {"n": 0}} for t in _texts(1, 2)]
         + [{"id": "s1", "text": "updated " + t, "metadata": {"n": 1}} for t in _texts(1, 3)]
         + [{"id": f"b{i:02d}", "text": t, "metadata": {"n": 100 + i}} for i, t in enumerate(_texts(30, 4))])
TRIGGER = "b00"  # in the batch's first window
FIRST_WINDOW = [d["id"] for d in BATCH[:WINDOW]]


def _hashes(docs: list[dict]) -> dict[str, str]:
    return {d["id"]: content_hash(d["text"]) for d in docs}


ABSENT = _hashes(SEED)
WHOLE = {**ABSENT, **_hashes(BATCH)}


def _config(folder: Path, static_model_dir: Path, loopback_url: str, server: str = "") -> Path:
    body = (f'data_dir = "data"\nwindow = {WINDOW}\n[server]\nwrite_wait_s = 0.2\n{server}'
            + static_profile_toml(static_model_dir)
            + hosted_profile_toml(loopback_url, limits="timeout_s = 120\nmax_retries = 0"))
    path = folder / "embedpipe.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture
def start(tmp_path: Path):
    """``start_server``, and whatever it started still running at the end (a failed test,
    a hooked server hanging on purpose) is killed."""
    started: list[Served] = []

    def run(config: Path, hook: str | None = None) -> Served:
        server = start_server(config, tmp_path / "data", command=_hooked(config, hook) if hook else None)
        started.append(server)
        return server

    yield run
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=60)


def _hooked(config: Path, hook: str) -> list[str]:
    trigger_text = next(d["text"] for d in BATCH if d["id"] == TRIGGER)
    return [sys.executable, "-c", HOOKED, hook, TRIGGER, trigger_text, "serve", "--config", str(config), "--port", "0"]


class Posted(threading.Thread):
    """A documents request on its own connection, answered (or cut) in the background."""

    def __init__(self, server: Served, index: str, documents: list[dict], **extra: Any) -> None:
        super().__init__(daemon=True)
        self.url, self.index, self.body = server.url, index, {"documents": documents, **extra}
        self.answer: httpx.Response | None = None
        self.error: httpx.HTTPError | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=HANG_GUARD_S) as client:
                self.answer = client.post(f"/v1/indexes/{self.index}/documents", json=self.body)
        except httpx.HTTPError as exc:
            self.error = exc

    def result(self) -> httpx.Response | httpx.HTTPError:
        self.join(timeout=HANG_GUARD_S)
        assert not self.is_alive(), "the request was never answered nor cut"
        return self.answer if self.answer is not None else self.error  # type: ignore[return-value]


def _wait_for(condition: Any, server: Served, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited ({server.proc.returncode}) before {what}:\n{server.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {HANG_GUARD_S} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.02)


def _kill_line(server: Served) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in server.log_text().splitlines() if line.startswith("KILL ")]
        return bool(found)

    _wait_for(seen, server, "KILL line")
    return found[0].split(" ", 1)[1]


def _kill(server: Served) -> None:
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(timeout=60) == -signal.SIGKILL


def _engine(http: httpx.Client, index: str) -> dict[str, str]:
    """What the live version holds, found by one search that returns every point: id ->
    content hash of its text. Each document is one point, so each id appears once."""
    # By vector: a hosted index's upstream may be holding requests.
    hits = http.post(f"/v1/indexes/{index}/search", json={"vector": [0.0625] * 256, "k": 1000})
    assert hits.status_code == 200, hits.text
    ids = [h["id"] for h in hits.json()["hits"]]
    assert len(ids) == len(set(ids)), ids
    return {h["id"]: content_hash(h["text"]) for h in hits.json()["hits"]}


def _corpus(data_dir: Path, index: str) -> dict[str, str]:
    """The corpus's Parquet files, read here: id -> content hash."""
    return {i: k.content_hash for i, k in CorpusStore.for_index(data_dir, index).known().items()}


def _agree(http: httpx.Client, data_dir: Path, index: str) -> dict[str, str]:
    """The live version holds exactly the corpus (the same documents, the same texts, each
    once), and the server's status says so. Returns it."""
    held = _engine(http, index)
    assert held == _corpus(data_dir, index)
    status = http.get(f"/v1/indexes/{index}").json()
    (live,) = [v for v in status["versions"] if v["live"]]
    assert status["documents"] == live["points"] == len(held)
    return held


def _found_by_own_text(http: httpx.Client, index: str, docs: list[dict]) -> None:
    for doc in docs:
        hit = http.post(f"/v1/indexes/{index}/search", json={"query": doc["text"], "k": 1}).json()["hits"][0]
        assert (hit["id"], hit["text"]) == (doc["id"], doc["text"]) and hit["score"] > 0.999, (doc, hit)


# --- kill -9 in the middle of a documents request ---------------------------------------------

KILL_POINTS = {
    # where: (what the engine holds at the kill, what the restart makes of the batch,
    # whether the request's journal was written: the restart settles it)
    "probe": (ABSENT, ABSENT, False),
    "embedding": (ABSENT, ABSENT, True),
    "part-written": ({**ABSENT, **_hashes(BATCH[:WINDOW])}, ABSENT, True),
    "written": (WHOLE, ABSENT, True),
    "committed": (WHOLE, WHOLE, True),
}


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_kill_9_in_a_documents_request_leaves_the_batch_whole_or_absent(
        tmp_path, static_model_dir, loopback, start, where) -> None:
    """The index is on the hosted profile (the loopback server serves the static model's
    vectors), so the server loads no model of its own and restarts quickly."""
    at_kill, after, journal = KILL_POINTS[where]
    config = _config(tmp_path, static_model_dir, loopback.base_url)
    data = tmp_path / "data"
    server = start(config, where)
    with server.client() as http:
        seeded = http.post("/v1/indexes/kb/documents", json={"documents": SEED, "profile": "hosted"})
        assert seeded.status_code == 200, seeded.text
        assert _agree(http, data, "kb") == ABSENT
        before = loopback.counters()["embedding_requests"]
        if where == "probe":
            loopback.configure(hold=True)
        try:
            request = Posted(server, "kb", BATCH)
            if where == "probe":  # the hosted model's probe request reached the upstream
                _wait_for(lambda: loopback.counters()["embedding_requests"] > before, server, "embedding request")
            else:
                assert _kill_line(server) == where
            assert http.get("/healthz").json()["writing"] is True
            assert _engine(http, "kb") == at_kill  # searches see where the kill lands
            assert _corpus(data, "kb") == (WHOLE if where == "committed" else ABSENT)
            _kill(server)
        finally:
            loopback.configure(hold=False)
    cut = request.result()
    assert isinstance(cut, httpx.HTTPError), cut  # no answer: the client knows it was not done

    restarted = start(config)
    try:
        settled = ("removed 30 the corpus never received, rewrote 2 from the corpus" if after == ABSENT
                   else "removed 0 the corpus never received, rewrote 32 from the corpus")
        said = f"index 'kb': an interrupted write left 32 documents unsettled; {settled}"
        with restarted.client() as http:
            assert _agree(http, data, "kb") == after  # whole or absent, as the corpus says
            assert (said in restarted.log_text()) is journal, restarted.log_text()
            _found_by_own_text(http, "kb", SEED[2:] + (BATCH if after == WHOLE else SEED[:2]))
            again = http.post("/v1/indexes/kb/documents", json={"documents": BATCH})
            assert again.status_code == 200, again.text
            report = again.json()
            if after == WHOLE:
                assert (report["unchanged"], report["added"], report["embedded"]) == (32, 0, 0)
            else:
                assert (report["added"], report["updated"], report["failed"]) == (30, 2, 0)
            assert _agree(http, data, "kb") == WHOLE  # every document of the batch exactly once
            _found_by_own_text(http, "kb", BATCH)
    finally:
        assert restarted.stop() == 0, restarted.log_text()
    assert not (data / "pending" / "kb.json").exists()


def test_kill_9_in_an_index_s_first_batch_leaves_no_live_index(tmp_path, static_model_dir, loopback, start) -> None:
    """The first batch builds version 1, which goes live only once it holds the corpus."""
    config = _config(tmp_path, static_model_dir, loopback.base_url)
    data = tmp_path / "data"
    server = start(config, "written")
    request = Posted(server, "fresh", BATCH, profile="hosted")
    assert _kill_line(server) == "written"
    _kill(server)
    assert isinstance(request.result(), httpx.HTTPError)

    restarted = start(config)
    try:
        with restarted.client() as http:
            status = http.get("/v1/indexes/fresh").json()
            assert (status["alias"], status["documents"]) == (None, 0)
            (version,) = status["versions"]
            assert (version["state"], version["live"], version["points"]) == ("building", False, len(BATCH))
            missing = http.post("/v1/indexes/fresh/search", json={"query": "glacier"})
            assert missing.status_code == 404 and missing.json()["error"]["type"] == "IndexNotFound"
            again = http.post("/v1/indexes/fresh/documents", json={"documents": BATCH, "profile": "hosted"})
            assert again.status_code == 200, again.text
            assert (again.json()["added"], again.json()["collection"]) == (len(BATCH), version["collection"])
            assert _agree(http, data, "fresh") == _hashes(BATCH)
    finally:
        assert restarted.stop() == 0, restarted.log_text()


# --- SIGTERM while a documents request runs ---------------------------------------------------


def _refused(url: str) -> bool:
    """Whether a new connection is refused: the server has stopped accepting.

    A probe that lands in the listen backlog just as the socket closes is reset
    unserved (ReadError): not yet a refusal, so the caller asks again.
    """
    try:
        httpx.get(f"{url}/healthz", timeout=30)
    except httpx.ConnectError:
        return True
    except (httpx.ReadError, httpx.RemoteProtocolError):
        pass  # reset unserved: ask again
    return False


def test_sigterm_finishes_the_documents_request_in_flight_and_refuses_the_next(
        tmp_path, static_model_dir, loopback, start) -> None:
    config = _config(tmp_path, static_model_dir, loopback.base_url)
    data = tmp_path / "data"
    server = start(config)
    late = [{"id": "late", "text": "A document sent after the server was told to stop."}]
    with server.client() as http, server.client() as idle:
        assert http.post("/v1/indexes/kb/documents", json={"documents": SEED, "profile": "hosted"}).status_code == 200
        assert idle.get("/healthz").status_code == 200  # a keep-alive connection, idle from now on
        before = loopback.counters()["embedding_requests"]
        loopback.configure(hold=True)
        try:
            request = Posted(server, "kb", BATCH)
            _wait_for(lambda: loopback.counters()["embedding_requests"] > before, server, "embedding request")
            server.proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: _refused(server.url), server, "refused connection after SIGTERM")
            # Stopped accepting, and the batch is still being embedded: the server waits for it.
            assert request.is_alive() and server.proc.poll() is None
            with pytest.raises(httpx.TransportError):  # the idle connection was closed, not served
                idle.post("/v1/indexes/kb/documents", json={"documents": late})
            with pytest.raises(httpx.ConnectError):
                httpx.post(f"{server.url}/v1/indexes/kb/documents", json={"documents": late}, timeout=30)
        finally:
            loopback.configure(hold=False)
    answer = request.result()
    assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
    assert (answer.json()["added"], answer.json()["updated"], answer.json()["failed"]) == (30, 2, 0)
    assert server.proc.wait(timeout=HANG_GUARD_S) == 0, server.log_text()
    assert not (data / "server.json").exists()
    assert not (data / "pending" / "kb.json").exists()  # the request finished its journal too

    restarted = start(config)
    try:
        assert "unsettled" not in restarted.log_text()
        with restarted.client() as http:
            assert _agree(http, data, "kb") == WHOLE  # the late document was never written
    finally:
        assert restarted.stop() == 0, restarted.log_text()


def test_sigterm_waits_no_longer_than_shutdown_wait_s_and_the_restart_settles_the_batch(
        tmp_path, static_model_dir, loopback, start) -> None:
    config = _config(tmp_path, static_model_dir, loopback.base_url, server="shutdown_wait_s = 1\n")
    data = tmp_path / "data"
    server = start(config, "embedding")
    with server.client() as http:
        assert http.post("/v1/indexes/kb/documents", json={"documents": SEED, "profile": "hosted"}).status_code == 200
    request = Posted(server, "kb", BATCH)
    assert _kill_line(server) == "embedding"  # and it embeds for ever
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=HANG_GUARD_S) == 1, server.log_text()  # it left anyway
    assert "requests or jobs still running after 1 s ([server] shutdown_wait_s)" in server.log_text()
    assert not (data / "server.json").exists()
    assert isinstance(request.result(), httpx.HTTPError)

    restarted = start(config)
    try:
        assert "index 'kb': an interrupted write left 32 documents unsettled; removed 30" in restarted.log_text()
        with restarted.client() as http:
            assert _agree(http, data, "kb") == ABSENT
    finally:
        assert restarted.stop() == 0, restarted.log_text()
