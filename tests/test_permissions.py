"""The data directory is private: folders 0700, files 0600, whatever the umask; a data
directory others can write is warned about."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedpipe._files import append_line, make_dir, write_json
from embedpipe.layout import Layout

from conftest import write_config, write_jsonl


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that takes nothing away: modes must come from embedpipe itself."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ours(data: Path) -> Iterator[Path]:
    """Everything under the data directory that embedpipe writes itself (not Qdrant Edge's
    own files inside a shard folder, made with the umask's modes while it is open)."""
    shards = [p for p in (data / "engine").glob("*__*") if p.is_dir()]
    for path in data.rglob("*"):
        if not any(path.is_relative_to(shard) and path != shard for shard in shards):
            yield path


def test_ingest_and_sync_make_private_folders_and_files(make_settings, tmp_path, open_umask) -> None:
    from embedpipe.ingest import ingest
    from embedpipe.sync import sync

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Glaciers carve valleys.", encoding="utf-8")
    settings = make_settings(f'[indexes.kb]\nsource = "{src}"\n')
    sync(settings, "kb")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "b", "text": "Compilers emit code."}])
    ingest(settings, "other", docs)

    data = settings.data_dir
    assert _mode(data) == 0o700
    seen = {p.relative_to(data).as_posix() for p in _ours(data)}
    assert {"corpus/kb", "runs/kb.jsonl", "locks", "vectors", "corpus/other"} <= seen
    assert {"engine/catalogue.json", "engine/engine.lock", "engine/kb__local-minilm__v1"} <= seen
    for path in _ours(data):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    from embedpipe.engine import close_all

    close_all()  # closing a shard makes what Edge wrote in it private too
    shard_files = list((data / "engine").rglob("*"))
    assert len(shard_files) > 10
    for path in shard_files:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path


def test_file_helpers_ignore_the_umask(tmp_path: Path, open_umask) -> None:
    made = make_dir(tmp_path / "a" / "b" / "c")
    for folder in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert _mode(folder) == 0o700
    assert _mode(write_json(made / "state.json", {"x": 1})) == 0o600
    log = made / "log.jsonl"
    append_line(log, b'{"n": 1}\n')
    append_line(log, b'{"n": 2}\n')
    assert _mode(log) == 0o600 and log.read_bytes().count(b"\n") == 2


def test_ledgers_and_audit_log_are_private(tmp_path: Path, open_umask) -> None:
    from embedpipe.gateway import AuditLog
    from embedpipe.usage import UsageLedger

    data = tmp_path / "data"
    ledger = UsageLedger(data)
    ledger.record("hosted", "m", "embeddings", 1, 10, 0.02)
    AuditLog(data).append({"backend": "x", "ok": True})
    for path in (ledger.path, Layout(data).audit_log):
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700 and _mode(data) == 0o700


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    os.chmod(shared, 0o750)
    make_dir(shared / "inner")
    assert _mode(shared) == 0o750 and _mode(shared / "inner") == 0o700


def test_a_data_dir_others_can_write_is_warned_about_once(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    with caplog.at_level(logging.WARNING, logger="embedpipe.layout"):
        Layout(data).corpus("kb")
        Layout(data).runs("kb")
    warned = [r.getMessage() for r in caplog.records if "writable" in r.getMessage()]
    assert len(warned) == 1
    assert str(data) in warned[0] and "group and others" in warned[0] and "chmod" in warned[0]


def test_a_private_data_dir_is_not_warned_about(tmp_path: Path, caplog) -> None:
    data = make_dir(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="embedpipe.layout"):
        Layout(data).corpus("kb")
    assert not [r for r in caplog.records if "writable" in r.getMessage()]


def test_status_warns_once_about_a_group_writable_data_dir(tmp_path: Path) -> None:
    write_config(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o770)
    out = subprocess.run([sys.executable, "-m", "embedpipe.cli", "status"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "writable" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "by group" in lines[0]
    assert "chmod" in lines[0] and "Traceback" not in out.stderr
