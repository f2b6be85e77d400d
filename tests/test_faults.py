"""Faults of the disk under the data directory: leftovers of killed runs, a read-only
data directory, a full disk.

Read-only and full file systems are real: each scenario runs in a child process in its
own mount namespace (``unshare -m``), with the data directory bind-mounted read-only or
on a small tmpfs. Tests run as root here, where permission bits stop nothing, so a
``chmod a-w`` would prove nothing. Where ``unshare``/``mount`` are not allowed the
scenarios are skipped, with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from embedpipe._files import storage_error
from embedpipe.errors import DataDirReadOnly, DiskFull, EmbedpipeError

from conftest import static_profile_toml, write_config, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _tmp_files(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob(".tmp-*"))


# --- leftovers of killed runs ---------------------------------------------------------------


KILLED_STAGE = """
import os, sys
from pathlib import Path
from embedpipe.corpus import CorpusStore, Document, documents_to_batch
from embedpipe.vectors import VectorStore
import numpy as np
data = Path(sys.argv[1])
writer = CorpusStore(data / "corpus" / "kb").writer()      # an ingest's staged copy
writer.write(documents_to_batch([Document("z", "staged by a run that was killed")]))
writer.finish()
store = VectorStore(data, sys.argv[3], int(sys.argv[4]))
vectors = store.folder.open_writer()  # a vector segment half written
import pyarrow as pa
dims = store.dims
vectors.write(pa.table({"content_hash": ["cd" * 32], "vector": pa.FixedSizeListArray.from_arrays(
    pa.array([0.0] * dims, pa.float32()), dims)}))
print("ready", flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), 9)
sys.stdin.read()  # alive until the test closes stdin
"""


def _stage_in_child(data: Path, mode: str, report) -> subprocess.Popen[str]:
    """A child that stages documents and half-writes vectors into the index's space, then
    is killed (``kill``) or stays alive until stdin closes (``live``)."""
    space = [report.fingerprint, "384"]
    child = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(data), mode, *space],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if mode == "kill":
        child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
    else:
        assert child.stdout.readline().strip() == "ready"
    return child


def test_a_rerun_removes_what_a_killed_run_left(settings, tmp_path: Path) -> None:
    from embedpipe.ingest import ingest

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "Glaciers carve valleys."}])
    first = ingest(settings, "kb", docs)
    _stage_in_child(settings.data_dir, "kill", first)
    left = _tmp_files(settings.data_dir)
    assert len(left) == 2  # the staged copy and the half-written vector segment
    write_jsonl(docs, [{"id": "a", "text": "Glaciers carve valleys."}, {"id": "b", "text": "New."}])
    report = ingest(settings, "kb", docs)
    assert report.added == 1
    assert _tmp_files(settings.data_dir) == []


def test_a_live_writers_files_are_kept(settings, tmp_path: Path) -> None:
    from embedpipe.ingest import ingest

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "Glaciers carve valleys."}])
    first = ingest(settings, "kb", docs)
    child = _stage_in_child(settings.data_dir, "live", first)
    try:
        theirs = _tmp_files(settings.data_dir)
        write_jsonl(docs, [{"id": "b", "text": "Compilers emit machine code."}])
        ingest(settings, "kb", docs)
        assert _tmp_files(settings.data_dir) == theirs  # another process is still writing them
    finally:
        child.communicate("", timeout=60)
    assert child.returncode == 0


def test_old_unowned_temporary_files_go_only_when_old(tmp_path: Path) -> None:
    from embedpipe._segments import STALE_AFTER_S
    from embedpipe.corpus import CorpusStore

    corpus = CorpusStore(tmp_path / "corpus" / "kb")
    corpus.root.mkdir(parents=True)
    old = corpus.root / ".tmp-0123456789abcdef0123456789abcdef.parquet"  # named before owners
    fresh = corpus.root / ".tmp-fedcba9876543210fedcba9876543210.parquet"
    for path in (old, fresh):
        path.write_bytes(b"partial")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old, (past, past))
    corpus.writer().abort()  # the first writer of a folder tidies it
    assert not old.exists() and fresh.exists()


# --- storage errors, converted ---------------------------------------------------------------


@pytest.mark.parametrize("code, kind, words", [
    (errno.EROFS, DataDirReadOnly, "read-only"),
    (errno.EACCES, DataDirReadOnly, "permission denied"),
    (errno.EPERM, DataDirReadOnly, "permission denied"),
    (errno.ENOSPC, DiskFull, "no space left"),
    (errno.EDQUOT, DiskFull, "quota"),
])
def test_os_errors_of_the_data_dir_become_one_line_errors(tmp_path, code, kind, words) -> None:
    exc = OSError(code, os.strerror(code), str(tmp_path / "data" / "corpus" / "kb" / ".lock"))
    converted = storage_error(exc, tmp_path / "data")
    assert isinstance(converted, kind)
    message = str(converted)
    assert words in message and str(tmp_path / "data") in message and "\n" not in message


def test_other_os_errors_are_not_storage_errors(tmp_path: Path) -> None:
    assert storage_error(OSError(errno.ENOENT, "missing", "x"), tmp_path) is None
    assert storage_error(ValueError("x"), tmp_path) is None


def test_real_sqlite_errors_are_converted(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    sqlite3.connect(db).execute("create table t(a)").connection.commit()
    ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as real:
        ro.execute("insert into t values (1)")
    assert isinstance(storage_error(real.value, tmp_path), DataDirReadOnly)
    full = sqlite3.OperationalError("database or disk is full")
    assert isinstance(storage_error(full, tmp_path), DiskFull)
    assert storage_error(sqlite3.OperationalError("no such table: x"), tmp_path) is None
    # "disk I/O error" is a full disk only when the disk is full (checked in the scenarios)
    assert storage_error(sqlite3.OperationalError("disk I/O error"), tmp_path) is None


# --- real read-only and full file systems ----------------------------------------------------


def _namespaces_work() -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount are not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount in a private mount namespace here: {probe.stderr.strip()}"
    return None


needs_mounts = pytest.mark.skipif(_namespaces_work() is not None,
                                  reason=f"real read-only/full file systems: {_namespaces_work()}")

# Runs steps in one process: CLI invocations (their exit code, stdout and stderr, and a
# traceback if one escaped) and Python snippets; prints the results as JSON.
RUNNER = textwrap.dedent(r'''
    import contextlib, io, json, logging, os, sys, traceback

    class _Stderr:  # logging follows each step's captured stderr
        def write(self, s): sys.stderr.write(s)
        def flush(self): pass

    logging.basicConfig(level=logging.WARNING, stream=_Stderr(),
                        format="%(levelname)s %(name)s: %(message)s")
    from embedpipe.cli import main
    from embedpipe.engine import close_all

    def fill(path, leave):
        """Fill the file system of path, then free ``leave`` bytes."""
        filler = os.path.join(path, "filler")
        with open(filler, "wb", buffering=0) as fh:  # unbuffered: close has nothing left to fail on
            try:
                while fh.write(b"\0" * 65536):
                    pass
            except OSError:
                pass
        os.truncate(filler, max(0, os.path.getsize(filler) - leave))

    results = []
    for step in json.load(open(sys.argv[1])):
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if isinstance(step, str):
                    exec(step, {"fill": fill})
                else:
                    sys.argv = ["embedpipe", *step]
                    main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = -1
        close_all()
        results.append({"step": step, "code": code, "out": out.getvalue(), "err": err.getvalue()})
    print("RESULTS " + json.dumps(results))
''')


def _in_namespace(tmp_path: Path, mount: str, steps: list) -> list[dict]:
    """Run ``steps`` in a child process whose mount namespace first runs ``mount``."""
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    (tmp_path / "steps.json").write_text(json.dumps(steps), encoding="utf-8")
    script = f"{mount} && exec {sys.executable} runner.py steps.json"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, done.stdout + done.stderr
    return json.loads(line[len("RESULTS "):])


def _one_line_error(result: dict, code: int, *words: str) -> str:
    err = result["err"]
    assert result["code"] == code, result
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in line, line
    return line


@pytest.fixture
def indexed(tmp_path: Path, static_model_dir: Path):
    """An index ``kb`` synced from ``src``, on the static model; ``static-q`` is another space."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "venus.txt").write_text("Venus has a runaway greenhouse effect.", encoding="utf-8")
    (src / "bread.md").write_text("Sourdough rises because wild yeast ferments the dough.",
                                  encoding="utf-8")
    write_config(tmp_path, 'default_profile = "static"\n' + static_profile_toml(static_model_dir)
                 + static_profile_toml(static_model_dir, "static-q") + 'query_prompt = "q: "\n'
                 + f'\n[indexes.kb]\nsource = "{src}"\n')
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "new", "text": "Compilers emit machine code."}])
    return tmp_path


@needs_mounts
def test_a_read_only_data_dir_serves_reads_and_refuses_writes_in_one_line(indexed: Path) -> None:
    from embedpipe.config import load_settings
    from embedpipe.sync import sync

    settings = load_settings(indexed / "embedpipe.toml")
    sync(settings, "kb")
    from embedpipe.engine import close_all

    close_all()
    (indexed / "src" / "tcp.md").write_text("TCP retransmits lost segments.", encoding="utf-8")
    runs = (indexed / "data" / "runs" / "kb.jsonl").read_text(encoding="utf-8")
    data = indexed / "data"
    mount = f"mount --bind {data} {data} && mount -o remount,bind,ro {data}"
    reads = [["search", "greenhouse planet", "--index", "kb", "--json"],
             ["status", "--json"],
             ["ingest", "docs.jsonl", "--index", "kb", "--dry-run", "--json"],
             ["sync", "--index", "kb", "--dry-run", "--json"],
             ["migrate", "--to", "static-q", "--index", "kb", "--dry-run", "--json"]]
    writes = [["sync", "--index", "kb"], ["ingest", "docs.jsonl", "--index", "kb"],
              ["rollback", "--index", "kb"]]
    results = _in_namespace(indexed, mount, reads + writes)
    search, status, ingest_plan, sync_plan, migrate_plan = results[:5]
    for result in results[:5]:
        assert result["code"] == 0, result
        assert "Traceback" not in result["err"] and "error" not in result["err"], result
    assert json.loads(search["out"])[0]["id"] == "venus.txt"
    assert json.loads(status["out"])[0]["documents"] == 2
    assert json.loads(ingest_plan["out"])["added"] == 1
    assert json.loads(sync_plan["out"])["added"] == 1
    assert json.loads(migrate_plan["out"])["plan"]["to_embed"] == 2
    sync_err = _one_line_error(results[5], 73, "read-only", str(data))
    assert "could not be recorded" in sync_err and "runs/kb.jsonl" in sync_err
    _one_line_error(results[6], 73, "read-only", str(data))
    _one_line_error(results[7], 73, "read-only")
    assert (data / "runs" / "kb.jsonl").read_text(encoding="utf-8") == runs  # nothing written
    assert not (data / "qdrant" / "filler").exists()


@needs_mounts
def test_a_full_disk_fails_a_sync_in_one_line_and_the_run_is_recorded(indexed: Path) -> None:
    data = indexed / "data"
    data.mkdir()
    mount = f"mount -t tmpfs -o size=16m tmpfs {data}"
    runs = str(data / "runs" / "kb.jsonl")
    store_full = textwrap.dedent(f"""
        import os
        from embedpipe.config import load_settings
        from embedpipe.errors import DiskFull
        from embedpipe.index import IndexVersions
        from embedpipe.engine import connect
        s = load_settings({str(indexed / 'embedpipe.toml')!r})
        try:  # opening the engine needs room for its lock and catalogue
            connect(s)
        except DiskFull as exc:
            print("DiskFull:", exc)
        os.remove({str(data / 'filler')!r})
        versions = IndexVersions.open(s)
        fill({str(data)!r}, 0)
        try:  # the engine finds no room for a new version's shard: through IndexVersions
            versions.create_version("kb", s.profile("static-q"), "ef" * 32)
        except DiskFull as exc:
            print("DiskFull on create:", exc)
    """)
    results = _in_namespace(indexed, mount, [
        ["sync", "--index", "kb"],
        f"open({str(indexed / 'src' / 'tcp.md')!r}, 'w').write('TCP retransmits lost segments.')",
        f"fill({str(data)!r}, 0)",
        ["sync", "--index", "kb"],
        f"print(open({runs!r}).read().splitlines()[-1])",
        store_full])
    assert results[0]["code"] == 0, results[0]
    _one_line_error(results[3], 74, "no space left", str(data))
    last = json.loads(results[4]["out"])  # the failed run is in the run log
    assert last["status"] == "error" and "no space left" in last["error"]
    assert results[5]["code"] == 0, results[5]
    # Opening the engine may find room for its lock's few bytes; a new shard never does,
    # and is refused before Qdrant Edge writes through a memory map (SIGBUS on a full disk).
    assert "DiskFull on create: " in results[5]["out"] and "no space left" in results[5]["out"]


@needs_mounts
def test_compaction_on_a_full_disk_is_best_effort(indexed: Path) -> None:
    data = indexed / "data"
    data.mkdir()
    mount = f"mount -t tmpfs -o size=16m tmpfs {data}"
    compact = textwrap.dedent(f"""
        import base64, os
        from embedpipe.config import load_settings
        from embedpipe.corpus import COMPACT_AFTER, CorpusStore
        from embedpipe.ingest import ingest
        s = load_settings({str(indexed / 'embedpipe.toml')!r})
        docs = {str(indexed / 'many.jsonl')!r}
        def put(i):
            text = base64.b64encode(os.urandom(30000)).decode()
            open(docs, "w").write('{{"id": "d%d", "text": "%s"}}\\n' % (i, text))
            return ingest(s, "big", docs)
        for i in range(COMPACT_AFTER - 1):
            put(i)
        fill({str(data)!r}, 400_000)
        report = put(COMPACT_AFTER)  # commits; the compaction that follows finds no room
        corpus = CorpusStore.for_index(s.data_dir, "big")
        left = [p.name for p in corpus.root.iterdir() if p.name.startswith(".tmp-")]
        print("RESULT", report.added, len(corpus.folder.segments()), corpus.count(), left)
    """)
    (result,) = _in_namespace(indexed, mount, [compact])
    assert result["code"] == 0, result
    assert "RESULT 1 32 32 []" in result["out"], result
    assert "compact" in result["err"] and "no space left" in result["err"], result["err"]
