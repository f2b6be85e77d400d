"""Durability, proven (issue 18 item 3): a real process killed with SIGKILL at a chosen
moment, then restarted.

Each test runs the embedpipe CLI in a child process (``python -c CHILD``: the CLI's own
``main`` behind a hook that prints a marker line at the chosen moment), reads the child's
output, and sends SIGKILL on the marker: during a bulk first ingest, inside Edge's
``optimize`` (the index build), during a migration backfill, and between the write of
``catalogue.json``'s temporary and its rename. Then it restarts and checks what a user
would: ``embedpipe status --json`` answers and tells the truth (the points it reports are
the points the shard holds, no shard is reported unreadable), every acknowledged document
is held whole and once, each document is found by its own vector, and the same command
run again completes with every document exactly once.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedpipe.config import Settings, load_settings
from embedpipe.corpus import CorpusStore, content_hash, record_hash
from embedpipe.engine import close_all
from embedpipe.index import IndexVersions, point_id

from conftest import EXAMPLES, static_profile_toml, write_config, write_jsonl

# The CLI behind a hook; argv: HOOK AFTER CLI-ARGS... A hook prints "KILL" at its moment
# (and the test kills the child on reading it); "ACK <collection> <ids>" is printed after
# each upsert returned, i.e. once the engine acknowledged it.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    hook, after, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def say(*words):
        print(*words, flush=True)

    def hang(what):
        say(what)
        while True:
            time.sleep(60)

    if hook == "upsert":
        # KILL after the AFTER-th acknowledged upsert, and keep writing; a bulk write never
        # gets past its end (the index build that follows it hangs): the kill lands mid-write.
        from embedpipe.index import IndexVersions
        real_upsert, calls = IndexVersions.upsert, [0]

        def upsert(self, collection, ids, *rest, **kw):
            real_upsert(self, collection, ids, *rest, **kw)
            say("ACK", collection, json.dumps(list(ids)))
            calls[0] += 1
            if calls[0] == after:
                say("KILL")

        IndexVersions.upsert = upsert
        IndexVersions.build_index = lambda self, collection: hang("BUILD")
        IndexVersions.go_live = lambda self, *a, **kw: hang("CUTOVER")
    elif hook == "optimize":
        # KILL right before Edge's optimize (which holds the interpreter while it runs);
        # OPTIMIZED after it returned, so the test can tell where the kill landed.
        from embedpipe.engine.edge import EdgeEngine
        real_edge = EdgeEngine._edge

        def edge(self, what, space, fn, *a):
            if not what.startswith("building the index"):
                return real_edge(self, what, space, fn, *a)
            say("KILL")
            out = real_edge(self, what, space, fn, *a)
            say("OPTIMIZED")
            return out

        EdgeEngine._edge = edge
    elif hook == "catalogue":
        # The AFTER-th replace of catalogue.json: its temporary is written and synced, the
        # rename has not happened.
        real_replace, seen = os.replace, [0]

        def replace(src, dst, *a, **kw):
            if os.path.basename(dst) == "catalogue.json":
                seen[0] += 1
                if seen[0] == after:
                    say("KILL", src, dst)
                    hang("HUNG")
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    from embedpipe.cli import main
    sys.argv = ["embedpipe", *args]
    main()
""")

HANG_GUARD_S = 300  # only against a hung child; no assertion depends on how fast anything runs
TMP_CATALOGUE = re.compile(r"^\.catalogue\.json\..*\.tmp$")


class Child:
    """A hooked CLI run; its stdout read line by line on a thread."""

    def __init__(self, cwd: Path, hook: str, after: int, *args: str) -> None:
        self.err = (cwd / f"child-{hook}-{time.monotonic_ns()}.err").open("w+")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, hook, str(after), *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()[-3000:]

    def wait_for(self, word: str) -> list[str]:
        """Lines up to the first that starts with ``word`` (the child must still run)."""
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            try:
                line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no {word} line from the child; stderr:\n{self.stderr()}")
            if line is None:
                pytest.fail(f"the child ended ({self.proc.wait()}) before {word}; stderr:\n{self.stderr()}")
            self.lines.append(line)
            if line.split(" ", 1)[0] == word:
                return line.split(" ")[1:]

    def kill(self) -> list[str]:
        """SIGKILL, then every line the child printed before it died."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL
        while (line := self._queue.get(timeout=60)) is not None:
            self.lines.append(line)
        self.err.close()
        return self.lines

    def acknowledged(self, collection: str | None = None) -> set[str]:
        return {i for line in self.lines if line.startswith("ACK ")
                for c, ids in [line[4:].split(" ", 1)] if collection in (None, c) for i in json.loads(ids)}


def _docs(n: int, seed: int = 7) -> list[dict]:
    """``n`` documents of ten random words each (distinct word bags, so distinct vectors)."""
    vocab = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}",
                                                   (EXAMPLES / "corpus" / "docs.jsonl").read_text())})
    rng = random.Random(seed)
    docs = [{"id": f"d{i:05d}", "text": " ".join(rng.choice(vocab) for _ in range(10)),
             "metadata": {"n": i, "even": i % 2 == 0}} for i in range(n)]
    assert len({frozenset(d["text"].split()) for d in docs}) == n
    return docs


def _record_hashes(docs: list[dict]) -> dict[str, str]:
    # A JSONL record's fields other than id and text are its metadata: here one field,
    # "metadata", holding the dict.
    return {d["id"]: record_hash(content_hash(d["text"]), json.dumps(
                {"metadata": d["metadata"]}, sort_keys=True, ensure_ascii=False, default=str))
            for d in docs}


def _vectors(settings: Settings, profile: str, docs: list[dict]) -> dict[str, np.ndarray]:
    """Each document's vector, embedded here by the same model."""
    from embedpipe.backends import build_embedder

    embedder = build_embedder(settings.profile(profile), settings)
    vectors = embedder.embed_documents([d["text"] for d in docs]).vectors
    return {d["id"]: v for d, v in zip(docs, vectors)}


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    close_all()  # this process must not hold the engine the child opens
    return subprocess.run([sys.executable, "-m", "embedpipe.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def _status(cwd: Path) -> list[dict]:
    """`embedpipe status --json` after a restart: it answers, and reports no unreadable shard."""
    out = _cli(cwd, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stderr.lower(), out.stderr
    data = json.loads(out.stdout)
    for entry in data:
        for version in entry["versions"]:
            assert "error" not in version and version["points"] is not None, version
    return data


def _engine_files(settings: Settings) -> tuple[list[str], list[str]]:
    """Catalogue temporaries, and shard folders no catalogue entry names."""
    root = settings.data_dir / "engine"
    catalogue = json.loads((root / "catalogue.json").read_text()) if (root / "catalogue.json").exists() else {
        "spaces": {}}
    temporaries = sorted(p.name for p in root.iterdir() if TMP_CATALOGUE.match(p.name))
    orphans = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and "__" in p.name and p.name not in catalogue["spaces"])
    return temporaries, orphans


def _held_once(versions: IndexVersions, collection: str, expected: dict[str, str]) -> dict[str, str]:
    """What a version holds, checked whole and once: each document one point (its own id)
    with the record hash ``expected`` names; the count is the number of documents."""
    held = versions.holdings(collection)
    for doc, holding in held.items():
        assert holding.points == (point_id(doc),), (doc, holding)
        assert holding.record_hash == expected[doc], doc
    assert versions.count(collection) == len(held) == len(versions.point_ids(collection))
    return {doc: h.record_hash for doc, h in held.items()}  # type: ignore[misc]


def _found_by_own_vector(versions: IndexVersions, collection: str, vectors: dict[str, np.ndarray],
                         ids: list[str] | None = None) -> None:
    """Each document's own vector finds it first, and its stored vector is that vector."""
    ids = sorted(vectors) if ids is None else ids
    stored = versions.stored_vectors(collection, ids)
    assert sorted(stored) == sorted(ids)
    for doc in ids:
        # the same text embedded again here; batch composition moves the last digits
        np.testing.assert_allclose(stored[doc], vectors[doc], atol=5e-4, err_msg=doc)
        hits = versions.search(collection, vectors[doc], 3, with_text=False)
        assert hits[0].id == doc and hits[0].score > 0.999, (doc, hits[:2])


def _live_and_whole(cwd: Path, settings: Settings, index: str, collection: str, docs: list[dict],
                    vectors: dict[str, np.ndarray], sample: int | None = None) -> dict:
    """After the re-run: live on ``collection``, every document exactly once, found by its
    own vector, and status says so."""
    (entry,) = [e for e in _status(cwd) if e["index"] == index]
    assert entry["alias"] == collection and entry["documents"] == len(docs)
    (shown,) = [v for v in entry["versions"] if v["collection"] == collection]
    assert shown["state"] == "live" and shown["live"] and shown["points"] == len(docs)
    assert _engine_files(settings) == ([], [])
    versions = IndexVersions.open(settings)
    known = CorpusStore.for_index(settings.data_dir, index).known()
    assert {i: k.record_hash for i, k in known.items()} == _record_hashes(docs)
    assert _held_once(versions, collection, _record_hashes(docs)) == _record_hashes(docs)
    ids = sorted(vectors)
    if sample is not None:
        ids = random.Random(3).sample(ids, sample)
    _found_by_own_vector(versions, collection, vectors, ids)
    close_all()
    return shown


@pytest.fixture
def project(tmp_path: Path, static_model_dir: Path):
    """A project with two static-model profiles (distinct fingerprints, the same weights),
    writes of 100 points at a time."""

    def make(n: int, extra: str = "") -> tuple[Settings, list[dict], Path]:
        body = ("window = 100\n" + static_profile_toml(static_model_dir).replace("batch_size = 1024", "batch_size = 100")
                + static_profile_toml(static_model_dir, "static2").replace(
                    'model = "local/static-256"', 'model = "local/static-256-b"') + extra)
        settings = load_settings(write_config(tmp_path, body))
        docs = _docs(n)
        return settings, docs, write_jsonl(tmp_path / "docs.jsonl", docs)

    return make


INGEST = ("ingest", "docs.jsonl", "--index", "kb", "--profile", "static", "--json")


# --- 1. a bulk first ingest, killed mid-write ---------------------------------------------------


def test_kill_9_during_a_first_ingest_keeps_every_acknowledged_write_and_the_rerun_completes(
        project, tmp_path: Path) -> None:
    settings, docs, _ = project(3000)
    child = Child(tmp_path, "upsert", 5, *INGEST)
    child.wait_for("KILL")
    lines = child.kill()
    assert "CUTOVER" not in lines  # killed before the alias could move
    acked = child.acknowledged("kb__static__v1")
    assert len(acked) >= 500

    # After the restart: not live yet, and status reports what the shard holds.
    (entry,) = _status(tmp_path)
    assert (entry["index"], entry["alias"], entry["documents"]) == ("kb", None, 0)
    (shown,) = entry["versions"]
    assert (shown["collection"], shown["state"], shown["live"]) == ("kb__static__v1", "building", False)
    versions = IndexVersions.open(settings)
    held = _held_once(versions, "kb__static__v1", _record_hashes(docs))
    assert acked <= held.keys()  # every acknowledged write survived the kill, whole and once
    assert shown["points"] == len(held)
    vectors = _vectors(settings, "static", docs)
    _found_by_own_vector(versions, "kb__static__v1", vectors, sorted(acked))

    # The same command completes the same version: every document once.
    done = _cli(tmp_path, *INGEST)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["collection"], report["created_version"], report["added"]) == ("kb__static__v1", False, 3000)
    _live_and_whole(tmp_path, settings, "kb", "kb__static__v1", docs, vectors)


# --- 2. the index build (Edge's optimize), killed while it runs -------------------------------


@pytest.mark.slow
def test_kill_9_during_the_index_build_leaves_a_loadable_shard_and_the_rerun_indexes_it(
        project, tmp_path: Path) -> None:
    # Edge indexes only segments past its threshold (about 10,000 vectors of 256 floats).
    settings, docs, _ = project(16_000)
    child = Child(tmp_path, "optimize", 0, *INGEST)
    child.wait_for("KILL")
    time.sleep(0.3)  # into optimize: it holds the interpreter, so nothing else runs meanwhile
    lines = child.kill()
    assert "OPTIMIZED" not in lines, "the kill landed after optimize returned: give it more points"

    # The corpus was committed before the build; the version is not live, and whole.
    (entry,) = _status(tmp_path)
    assert (entry["alias"], entry["documents"]) == (None, len(docs))
    (shown,) = entry["versions"]
    assert shown["state"] == "building" and shown["points"] == len(docs)
    versions = IndexVersions.open(settings)  # the shard loads
    assert _held_once(versions, "kb__static__v1", _record_hashes(docs)) == _record_hashes(docs)
    vectors = _vectors(settings, "static", docs)
    _found_by_own_vector(versions, "kb__static__v1", vectors, random.Random(5).sample(sorted(vectors), 300))

    done = _cli(tmp_path, *INGEST)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["collection"] == "kb__static__v1"
    shown = _live_and_whole(tmp_path, settings, "kb", "kb__static__v1", docs, vectors, sample=2000)
    assert shown["indexed_vectors"] > 0  # the re-run built the index the kill interrupted


# --- 3. a migration backfill, killed after some batches ---------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_migration_backfill_then_the_same_command_resumes_exactly_once(
        prefect_api: str, project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    settings, docs, _ = project(2000, "[migration]\nslice_size = 500\nsample_size = 20\nvector_sample = 8\n")
    first = _cli(tmp_path, *INGEST)
    assert first.returncode == 0, first.stderr
    migrate = ("migrate", "--to", "static2", "--index", "kb", "--yes", "--json")
    child = Child(tmp_path, "upsert", 4, *migrate)
    child.wait_for("KILL")
    lines = child.kill()
    assert "BUILD" not in lines and "CUTOVER" not in lines  # killed mid-backfill
    acked = child.acknowledged("kb__static2__v2")
    assert len(acked) >= 400

    (entry,) = _status(tmp_path)
    assert (entry["alias"], entry["documents"]) == ("kb__static__v1", len(docs))
    shown = {v["collection"]: v for v in entry["versions"]}
    assert shown["kb__static__v1"]["state"] == "live" and shown["kb__static__v1"]["points"] == len(docs)
    assert shown["kb__static2__v2"]["state"] == "building"
    assert entry["migration"]["collection"] == "kb__static2__v2" and entry["migration"]["phase"] == "building"
    versions = IndexVersions.open(settings)
    held = _held_once(versions, "kb__static2__v2", _record_hashes(docs))
    assert acked <= held.keys() and shown["kb__static2__v2"]["points"] == len(held)
    # The progress record never claims more than the version holds.
    assert entry["migration"]["written"] <= len(held)
    assert _held_once(versions, "kb__static__v1", _record_hashes(docs)) == _record_hashes(docs)
    vectors = _vectors(settings, "static2", docs)
    _found_by_own_vector(versions, "kb__static2__v2", vectors, sorted(acked))

    done = _cli(tmp_path, *migrate)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "live" and report["resumed"] is True
    assert report["collection"] == "kb__static2__v2"  # the same version, not a new one
    assert report["plan"]["already_written"] >= len(acked)
    _live_and_whole(tmp_path, settings, "kb", "kb__static2__v2", docs, vectors)
    versions = IndexVersions.open(settings)
    assert _held_once(versions, "kb__static__v1", _record_hashes(docs)) == _record_hashes(docs)  # standby


# --- 4. between the catalogue's write and its rename -----------------------------------------


@pytest.mark.parametrize("at", [1, 2], ids=["creating-the-version", "moving-the-alias"])
def test_kill_9_between_the_catalogue_write_and_its_rename_keeps_the_old_catalogue(
        project, tmp_path: Path, at: int) -> None:
    """A first ingest writes the catalogue twice: the new version's entry (its shard folder
    is made just before), and the cutover (alias and state in one step)."""
    settings, docs, _ = project(300)
    engine = settings.data_dir / "engine"
    child = Child(tmp_path, "catalogue", at, *INGEST)
    temporary, target = (Path(p) for p in child.wait_for("KILL"))
    assert target == engine / "catalogue.json" and temporary.parent == engine
    before = target.read_bytes() if target.exists() else None
    after = json.loads(temporary.read_text())  # written whole and synced before the rename
    child.kill()

    # The killed process left its temporary; the catalogue is the old one, byte for byte.
    assert (target.read_bytes() if target.exists() else None) == before
    assert _engine_files(settings)[0] == [temporary.name]
    if at == 1:  # the first catalogue: nothing before it, the new version's entry in it
        assert before is None and list(after["spaces"]) == ["kb__static__v1"]
    else:  # the cutover: the alias and the state, together
        assert json.loads(before)["aliases"] == {} and after["aliases"] == {"kb": "kb__static__v1"}
        assert after["spaces"]["kb__static__v1"]["state"] == "live"

    data = _status(tmp_path)  # the restart: opening the engine sweeps what the kill left
    assert _engine_files(settings) == ([], [])
    if before is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == before  # not rewritten, still whole
    if at == 1:  # the version's entry never landed: its shard folder went with the sweep
        assert data == []
    else:  # the alias never moved: the version is whole but not live
        (entry,) = data
        assert entry["alias"] is None
        (shown,) = entry["versions"]
        assert shown["state"] == "building" and shown["points"] == len(docs)
        versions = IndexVersions.open(settings)
        assert _held_once(versions, "kb__static__v1", _record_hashes(docs)) == _record_hashes(docs)

    done = _cli(tmp_path, *INGEST)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["collection"] == "kb__static__v1"
    _live_and_whole(tmp_path, settings, "kb", "kb__static__v1", docs, _vectors(settings, "static", docs))
