"""The engine of a data directory held by another process: IndexBusy (exit 75), said at
once, naming the holder and what to use for concurrent access; threads of the owning
process share it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from conftest import HOLD_ENGINE, cli, write_config


def test_an_engine_held_by_another_process_exits_75_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENGINE, str(config)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for command in (["status"], ["search", "anything", "--index", "kb"]):
            code, out, err = cli(capsys, monkeypatch, "-c", str(config), *command)
            assert code == 75, err
            assert err.startswith("error: ") and err.count("\n") == 1
            assert f"pid {holder.pid}" in err and "qdrant.url" in err
    finally:
        holder.kill()
        holder.wait()
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "status")
    assert code == 0, err  # the kernel released the lock with the process


def test_many_threads_of_one_process_search_one_engine(settings) -> None:
    from embedpipe.index import IndexVersions

    versions = IndexVersions.open(settings)
    profile = settings.profile("local-minilm")
    version = versions.create_version("kb", profile, "ab" * 32)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, profile.dims)).astype(np.float32)
    ids = [f"d{i}" for i in range(300)]
    versions.upsert(version.collection, ids, vectors, [{"id": i} for i in ids])
    found: list[str] = []
    errors: list[BaseException] = []

    def search(rows: range) -> None:
        try:
            for row in rows:
                found.append(versions.search(version.collection, vectors[row], 1)[0].id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=search, args=(range(t, 300, 6),)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(found) == sorted(ids)  # each vector found itself, from every thread
