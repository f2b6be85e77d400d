"""Qdrant local storage held by another process: IndexBusy (exit 75), said at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import cli, write_config

HOLD = (
    "import sys, time\n"
    "from qdrant_client import QdrantClient\n"
    "client = QdrantClient(path=sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_storage_held_by_another_process_exits_75(tmp_path: Path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    storage = tmp_path / "data" / "qdrant"
    storage.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(storage)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, out, err = cli(capsys, monkeypatch, "-c", str(config), "status")
        assert code == 75, err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert "in use by another process" in err and "qdrant.url" in err
    finally:
        holder.kill()
        holder.wait()
