"""The CLI and the library go through a running server (issue 19 item 2), with real
processes: ``embedpipe serve`` in a subprocess, the installed CLI in others.

While a server owns the data directory its engine is locked to that process, so a
command that opened the engine itself would fail with IndexBusy: a command that
succeeds went through the server, and the server's job list shows it did. Long commands
(ingest, sync, migrate, rollback, retire) run as server jobs the CLI follows; Ctrl-C
detaches from a job without cancelling it unless ``--cancel-on-interrupt``. The
loopback OpenAI server's ``hold`` keeps a hosted embedding in flight for as long as a
test needs a job to be running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Served, cli, package_config, server_env, start_server

HANG_GUARD_S = 300  # only against a hang; no assertion depends on how fast anything runs
DOCS = [{"id": f"d{n}", "text": f"Document {n} is about {topic} and {n % 7} more things.", "n": n,
         "topic": topic}
        for n, topic in enumerate(["glaciers", "compilers", "volcanoes", "caches", "rivers"] * 8)]


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def remote_config(folder: Path, static_model_dir: Path, loopback_url: str, server: str = "") -> Path:
    """The package's served configuration, small writes (several batches per job), a
    folder source for ``docs`` and a small validation sample."""
    config = package_config(folder, static_model_dir, loopback_url, server)
    src = folder / "src"
    src.mkdir(exist_ok=True)
    for n, topic in enumerate(["glaciers carve valleys", "compilers emit code", "lava flows downhill",
                               "caches hold answers", "rivers reach the sea", "stars burn hydrogen"]):
        (src / f"note{n}.txt").write_text(f"Note {n}: {topic}.", encoding="utf-8")
    text = config.read_text(encoding="utf-8").replace('data_dir = "data"\n', 'data_dir = "data"\nwindow = 8\n', 1)
    text += (f'[indexes.docs]\nsource = "{src}"\nprofile = "static"\n'
             "[migration]\nsample_size = 6\nvector_sample = 4\n")
    config.write_text(text, encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, static_model_dir: Path, loopback: Any,
           prefect_api: str) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("remote")
    config = remote_config(folder, static_model_dir, loopback.base_url)
    server = start_server(config, folder / "data", env={"PREFECT_API_URL": prefect_api})
    yield server
    loopback.configure(hold=False)
    assert server.stop() == 0, server.log_text()


def jobs_of(http: httpx.Client, index: str) -> list[dict[str, Any]]:
    answer = http.get("/v1/jobs", params={"index": index})
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(what: str, check: Any, guard_s: float = HANG_GUARD_S) -> Any:
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def live_ids(http: httpx.Client, index: str) -> list[str]:
    """Every document id the live version holds, by a search for all of them."""
    answer = http.post(f"/v1/indexes/{index}/search", json={"query": "document", "k": 50})
    assert answer.status_code == 200, answer.text
    return sorted(h["id"] for h in answer.json()["hits"])


# -- commands through the server ------------------------------------------------------------


def test_ingest_search_status_and_sync_go_through_the_running_server(remote: Served, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    made = json.loads(cli(remote, "ingest", str(path), "--index", "notes", "--profile", "static",
                          "--json").stdout)
    assert made["added"] == len(DOCS) and made["failed"] == 0
    with remote.client() as http:
        # the server ran it: a job of its own, with the command's report as its result
        [job] = jobs_of(http, "notes")
        assert job["kind"] == "ingest" and job["state"] == "succeeded" and job["result"] == made
        assert job["params"]["path"] == str(path.resolve())
        again = json.loads(cli(remote, "ingest", str(path), "--index", "notes", "--json").stdout)
        assert again["unchanged"] == len(DOCS) and again["embedded"] == 0

        hits = json.loads(cli(remote, "search", "volcanoes and lava", "--index", "notes", "-k", "3",
                              "--json").stdout)
        served = http.post("/v1/indexes/notes/search", json={"query": "volcanoes and lava", "k": 3}).json()
        assert [h["id"] for h in hits] == [h["id"] for h in served["hits"]]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in served["hits"]])
        # a command-line filter matches typed metadata (n is an integer in the JSONL)
        filtered = json.loads(cli(remote, "search", "anything", "--index", "notes", "--filter", "n=12",
                                  "--json").stdout)
        assert [h["id"] for h in filtered] == ["d12"]

        status = json.loads(cli(remote, "status", "--json").stdout)
        assert status == http.get("/v1/indexes").json()
        assert {e["index"] for e in status} >= {"notes"}

        synced = json.loads(cli(remote, "sync", "--index", "docs", "--json").stdout)
        assert synced["added"] == 6 and synced["failed"] == 0
        assert [j["kind"] for j in jobs_of(http, "docs")] == ["sync"]
        assert len(live_ids(http, "docs")) == 6


def test_the_commands_errors_come_back_with_their_own_line_and_exit_code(remote: Served,
                                                                         tmp_path: Path) -> None:
    missing = cli(remote, "search", "x", "--index", "nowhere", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nowhere" in missing.stderr
    assert missing.stderr.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n', encoding="utf-8")
    refused = cli(remote, "ingest", str(bad), "--index", "badin", "--profile", "static", check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "bad.jsonl" in refused.stderr
    unknown = cli(remote, "migrate", "--to", "no-such-profile", "--index", "docs", "--yes", check=False)
    assert unknown.returncode == 2 and "no-such-profile" in unknown.stderr
    with remote.client() as http:
        assert http.get("/v1/indexes/badin").status_code == 404  # nothing was written
        failed = [j for j in jobs_of(http, "badin")]
        assert failed[-1]["state"] == "failed" and failed[-1]["error"]["type"] == "InputError"
        assert failed[-1]["error"]["exit_code"] == 2


def test_a_migration_rollback_and_retire_run_in_the_server_while_searches_answer(remote: Served) -> None:
    with remote.client() as http:
        if http.get("/v1/indexes/docs").status_code == 404:
            cli(remote, "sync", "--index", "docs")
        before = http.get("/v1/indexes/docs").json()["alias"]
        answers: list[int] = []
        stop = threading.Event()

        def search() -> None:  # a client searching all along
            with remote.client() as mine:
                while not stop.is_set():
                    answers.append(mine.post("/v1/indexes/docs/search", json={"query": "lava", "k": 3}).status_code)

        searcher = threading.Thread(target=search)
        searcher.start()
        try:
            planned = json.loads(cli(remote, "migrate", "--to", "hosted", "--index", "docs", "--dry-run",
                                     "--json").stdout)
            assert planned["status"] == "planned" and planned["plan"]["documents"] == 6
            assert http.get("/v1/indexes/docs").json()["alias"] == before  # a plan writes nothing
            report = json.loads(cli(remote, "migrate", "--to", "hosted", "--index", "docs", "--yes",
                                    "--json").stdout)
            assert report["status"] == "live" and report["to_profile"] == "hosted"
            entry = http.get("/v1/indexes/docs").json()
            assert entry["alias"] == report["collection"] != before
            again = json.loads(cli(remote, "migrate", "--to", "hosted", "--index", "docs", "--json").stdout)
            assert again["status"] == "nothing_to_do"

            back = json.loads(cli(remote, "rollback", "--index", "docs", "--json").stdout)
            assert back["collection"] == before == http.get("/v1/indexes/docs").json()["alias"]
            retired = json.loads(cli(remote, "retire", "--index", "docs", "--keep", "0", "--yes",
                                     "--json").stdout)
            assert retired["deleted"] == [report["collection"]] and not retired["dry_run"]
        finally:
            stop.set()
            searcher.join()
        assert answers and set(answers) == {200}, sorted(set(answers))
        assert len(live_ids(http, "docs")) == 6
        kinds = [j["kind"] for j in jobs_of(http, "docs")]  # retire: a dry run, then the deed
        assert kinds[-7:] == ["plan", "plan", "migrate", "plan", "rollback", "retire", "retire"]


# -- Ctrl-C and cancelling --------------------------------------------------------------------


def start_held_ingest(remote: Served, loopback: Any, path: Path, index: str, *extra: str) -> subprocess.Popen[str]:
    """``embedpipe ingest`` of a hosted index whose embedding requests the loopback holds."""
    seen = loopback.counters()["embedding_requests"]
    loopback.configure(hold=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedpipe.cli", "--config", str(remote.config), "ingest", str(path),
         "--index", index, "--profile", "hosted", *extra],
        cwd=remote.config.parent, env=server_env(remote.config.parent), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    wait_for("a held embedding request", lambda: loopback.counters()["embedding_requests"] > seen)
    return proc


def _default_sigint() -> None:
    """A shell that runs the tests in the background ignores SIGINT, and children inherit
    that (Python then never raises KeyboardInterrupt): give the CLI a terminal's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end(proc: subprocess.Popen[Any] | None) -> None:
    """Kill a process a failed assertion left running (by its pid, via Popen)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=HANG_GUARD_S)


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert "Traceback" not in err, err
    return proc.returncode, err


def test_ctrl_c_detaches_and_the_job_goes_on_to_the_end(remote: Served, loopback: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    proc = None
    try:
        proc = start_held_ingest(remote, loopback, path, "detached")
        with remote.client() as http:
            [job] = wait_for("the job", lambda: jobs_of(http, "detached"))
            code, err = interrupt(proc)
            assert code == 130 and f"detached: job {job['id']}" in err
            assert f"embedpipe jobs cancel {job['id']}" in err
            assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
            loopback.configure(hold=False)
            followed = cli(remote, "jobs", "follow", job["id"], "--json")
            done = json.loads(followed.stdout)
            assert done["state"] == "succeeded" and done["result"]["added"] == len(DOCS)
            assert live_ids(http, "detached") == sorted(d["id"] for d in DOCS)
            listed = cli(remote, "jobs", "list", "--index", "detached").stdout
            assert job["id"] in listed and "succeeded" in listed
    finally:
        loopback.configure(hold=False)
        end(proc)


def test_ctrl_c_with_cancel_on_interrupt_stops_the_job_at_a_batch_boundary(remote: Served, loopback: Any,
                                                                          tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    with remote.client() as http:
        first = write_jsonl(tmp_path / "first.jsonl", DOCS[:4])
        cli(remote, "ingest", str(first), "--index", "cancelled", "--profile", "hosted")
        proc = None
        try:
            proc = start_held_ingest(remote, loopback, path, "cancelled", "--cancel-on-interrupt")
            [_, job] = wait_for("the job", lambda: jobs_of(http, "cancelled")[1:] and jobs_of(http, "cancelled"))
            code, err = interrupt(proc)
            assert code == 130 and f"cancelling job {job['id']}" in err
            assert http.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"] is True
            loopback.configure(hold=False)
            ended = wait_for("the cancelled job", lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())
                             ["state"] in ("cancelled", "succeeded", "failed") and j)
        finally:
            loopback.configure(hold=False)
            end(proc)
        assert ended["state"] == "cancelled" and ended["error"]["type"] == "JobCancelled"
        assert "resumes it" in ended["error"]["message"]
        # whole or absent: the live version holds exactly what the corpus took, once each
        held = live_ids(http, "cancelled")
        assert len(held) == len(set(held)) and set(DOCS_IDS[:4]) <= set(held) < set(DOCS_IDS)
        assert http.get("/v1/indexes/cancelled").json()["documents"] == len(held)
        # the same command picks it up
        resumed = json.loads(cli(remote, "ingest", str(path), "--index", "cancelled", "--json").stdout)
        assert resumed["failed"] == 0 and live_ids(http, "cancelled") == sorted(DOCS_IDS)


DOCS_IDS = [d["id"] for d in DOCS]


# -- the library ------------------------------------------------------------------------------


def test_index_open_goes_through_the_server(remote: Served, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    from embedpipe.index import Index
    from embedpipe.serve.client import RemoteIndex

    for name in [n for n in os.environ if n.startswith("EMBEDPIPE_")]:
        monkeypatch.delenv(name)
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    cli(remote, "ingest", str(path), "--index", "lib", "--profile", "static")
    with remote.client() as http:
        served = http.post("/v1/indexes/lib/search", json={"query": "rivers", "k": 4}).json()
    by_config = Index.open("lib", config=str(remote.config))
    assert isinstance(by_config, RemoteIndex) and by_config.url == remote.url
    hits = by_config.search("rivers", k=4)
    assert [h.id for h in hits] == [h["id"] for h in served["hits"]]
    assert by_config.live().collection == served["collection"]
    assert by_config.live().fingerprint == served["fingerprint"]
    by_url = Index.open("lib", url=remote.url)
    assert [h.id for h in by_url.search("rivers", k=4)] == [h.id for h in hits]
    vector_hits = by_url.search_vector([1.0] + [0.0] * 255, k=2, fingerprint=served["fingerprint"])
    assert len(vector_hits) == 2
    from embedpipe.errors import FingerprintMismatch, IndexNotFound

    with pytest.raises(FingerprintMismatch):
        by_url.search_vector([1.0] + [0.0] * 255, k=2, fingerprint="0" * 64)
    with pytest.raises(IndexNotFound):
        Index.open("nowhere", url=remote.url)
    answer = by_url.answer("Which document is about rivers?", k=3)
    assert answer.backend == "loop" and len(answer.sources) == 3
    by_config.close()
    by_url.close()


def test_a_server_that_stopped_answering_is_one_clear_error(tmp_path: Path) -> None:
    from embedpipe.errors import ServerUnavailable
    from embedpipe.index import Index

    from .conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match="does not answer"):
        Index.open("docs", url=url)


# -- the server stopping under a running job ---------------------------------------------------


def held_job(http: httpx.Client, loopback: Any, **body: Any) -> dict[str, Any]:
    """Start a job whose hosted embedding requests the loopback holds; return it once one is held."""
    seen = loopback.counters()["embedding_requests"]
    loopback.configure(hold=True)
    answer = http.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    wait_for("a held embedding request", lambda: loopback.counters()["embedding_requests"] > seen)
    return answer.json()


def test_sigterm_stops_a_migration_at_a_batch_boundary_and_the_command_resumes_it(
        tmp_path: Path, static_model_dir: Path, loopback: Any, prefect_api: str) -> None:
    config = remote_config(tmp_path, static_model_dir, loopback.base_url)
    env = {"PREFECT_API_URL": prefect_api}
    server = start_server(config, tmp_path / "data", env=env)
    try:
        path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
        cli(server, "ingest", str(path), "--index", "mig", "--profile", "static")
        with server.client() as http:
            before = http.get("/v1/indexes/mig").json()["alias"]
            job = held_job(http, loopback, kind="migrate", index="mig", to="hosted")
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the signal is taken while the request is still held
            loopback.configure(hold=False)
            assert server.proc.wait(timeout=HANG_GUARD_S) == 0, server.log_text()
        assert not (tmp_path / "data" / "server.json").exists()
    finally:
        loopback.configure(hold=False)
        server.stop()

    server = start_server(config, tmp_path / "data", env=env)
    try:
        with server.client() as http:
            ended = http.get(f"/v1/jobs/{job['id']}").json()
            assert ended["state"] == "cancelled" and ended["error"]["type"] == "JobCancelled"
            assert "embedpipe migrate --to hosted --index mig` resumes it" in ended["error"]["message"]
            assert http.get("/v1/indexes/mig").json()["alias"] == before  # not cut over
            report = json.loads(cli(server, "migrate", "--to", "hosted", "--index", "mig", "--yes",
                                    "--json", env=env).stdout)
            assert report["status"] == "live" and report["documents"] == len(DOCS)
            assert live_ids(http, "mig") == sorted(DOCS_IDS)
    finally:
        assert server.stop() == 0, server.log_text()


def test_a_job_cut_short_by_kill_9_is_marked_interrupted_and_its_index_settled(
        tmp_path: Path, static_model_dir: Path, loopback: Any) -> None:
    config = remote_config(tmp_path, static_model_dir, loopback.base_url)
    server = start_server(config, tmp_path / "data")
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    try:
        cli(server, "ingest", str(write_jsonl(tmp_path / "first.jsonl", DOCS[:5])), "--index", "killed",
            "--profile", "hosted")
        with server.client() as http:
            job = held_job(http, loopback, kind="ingest", index="killed", path=str(path))
            server.proc.kill()
            server.proc.wait(timeout=HANG_GUARD_S)
    finally:
        loopback.configure(hold=False)
        end(server.proc)
    server = start_server(config, tmp_path / "data")
    try:
        with server.client() as http:
            ended = http.get(f"/v1/jobs/{job['id']}").json()
            assert ended["state"] == "interrupted" and ended["error"]["exit_code"] == 130
            assert f"`embedpipe ingest {path} --index killed` resumes it" in ended["error"]["message"]
            assert live_ids(http, "killed") == sorted(DOCS_IDS[:5])  # as the corpus says
            listed = cli(server, "jobs", "list").stdout
            assert job["id"] in listed and "interrupted" in listed
            cli(server, "ingest", str(path), "--index", "killed")
            assert live_ids(http, "killed") == sorted(DOCS_IDS)
    finally:
        assert server.stop() == 0, server.log_text()


def test_job_requests_are_checked_before_anything_runs(remote: Served) -> None:
    with remote.client() as http:
        cases = [
            ({"kind": "ingest", "index": "x"}, "ingest jobs need path"),
            ({"kind": "ingest", "index": "x", "path": "relative.jsonl"}, "is relative"),
            ({"kind": "sync", "index": "x", "to": "hosted"}, "to does not apply to sync jobs"),
            ({"kind": "rebuild", "index": "x"}, "kind"),
            ({"kind": "retire", "index": "x", "keep": -1}, "keep"),
        ]
        before = len(http.get("/v1/jobs").json())
        for body, said in cases:
            answer = http.post("/v1/jobs", json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert said in answer.json()["error"]["message"] + str(answer.json()["error"]["param"]), answer.text
        bad_name = http.post("/v1/jobs", json={"kind": "sync", "index": "../etc"})
        assert bad_name.status_code == 400 and "invalid index name" in bad_name.json()["error"]["message"]
        assert len(http.get("/v1/jobs").json()) == before
        missing = http.get("/v1/jobs/no-such-job")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "JobNotFound"
        assert http.post("/v1/jobs/no-such-job/cancel").status_code == 404


# -- deprecation day through the server (issue 20) -------------------------------------------


def test_adapt_runs_as_a_server_job_and_searches_survive_the_retirement(
    remote: Served, loopback: Any, tmp_path: Path
) -> None:
    from embedpipe.index import Index

    path = write_jsonl(tmp_path / "docs.jsonl", [dict(d, id=f"r{n}") for n, d in enumerate(DOCS * 2)
                                                 if n < 80])
    cli(remote, "ingest", str(path), "--index", "legacy", "--profile", "hosted", "--json")
    fitted = json.loads(cli(remote, "adapt", "--index", "legacy", "--to", "static", "--json").stdout)
    assert fitted["state"] == "accepted" and fitted["target"] == "legacy__hosted__v1"
    with remote.client() as http:
        [job] = [j for j in jobs_of(http, "legacy") if j["kind"] == "adapt"]
        assert job["state"] == "succeeded" and job["result"]["adapter"] == fitted["adapter"]
        assert http.get("/v1/indexes/legacy").json()["adapter"]["id"] == fitted["adapter"]
    loopback.retire("text-embedding-3-small")
    try:
        searched = cli(remote, "search", "volcanoes and lava", "--index", "legacy", "-k", "3")
        assert f"served through adapter {fitted['adapter']} (static)" in searched.stderr
        remote_index = Index.open("legacy", url=remote.url)
        hits = remote_index.search("glaciers", k=3)
        assert len(hits) == 3 and all(h.via == f"adapter {fitted['adapter']} (static)" for h in hits)
    finally:
        loopback.retire("text-embedding-3-small", status=0)
