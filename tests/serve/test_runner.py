"""Owning a data directory: ``server.json`` written and removed, one server per data
directory, a killed server's leftovers replaced, and the one-line refusals (a second
server, an engine another process holds, an address that is not loopback without API keys,
a port in use)."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys

import httpx
import pytest

import embedpipe
from conftest import HOLD_ENGINE, cli, write_config

from .conftest import refused, serve_command, server_env, start_server


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_server_json_is_written_while_it_runs_and_removed_when_it_stops(tmp_path, stop, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    data = tmp_path / "data"
    server = start_server(config, data)
    info_path = data / "server.json"
    info = json.loads(info_path.read_text())
    assert set(info) == {"url", "pid", "started", "version"}
    assert info["pid"] == server.proc.pid and info["version"] == embedpipe.__version__
    assert info["url"].startswith("http://127.0.0.1:") and info["url"] == server.url
    assert stat.S_IMODE(info_path.stat().st_mode) == 0o600
    assert httpx.get(f"{server.url}/healthz", timeout=60).json()["pid"] == server.proc.pid
    assert f"embedpipe serve: {server.url} for {data}" in server.log_text()
    server.proc.send_signal(stop)
    assert server.proc.wait(timeout=120) == 0, server.log_text()
    assert not info_path.exists()
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "status")  # the engine was released
    assert code == 0, err


def test_a_second_server_on_the_same_data_directory_isrefused(tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path)
    first = start_server(config, tmp_path / "data")
    try:
        before = (tmp_path / "data" / "server.json").read_text()
        code, err = refused(serve_command(config), tmp_path)
        assert code == 75
        assert err.startswith(f"error: embedpipe serve is already running for {tmp_path / 'data'} at "
                              f"{first.url} (pid {first.proc.pid}, since ")
        assert (tmp_path / "data" / "server.json").read_text() == before
        assert httpx.get(f"{first.url}/healthz", timeout=60).status_code == 200
        code, out, err = cli(capsys, monkeypatch, "-c", str(config), "status")  # goes through the server
        assert code == 0, err
        # a command that still opens the engine itself meets the engine lock, naming the server
        code, out, err = cli(capsys, monkeypatch, "-c", str(config), "rebuild", "--index", "kb")
        assert code == 75 and f"pid {first.proc.pid}" in err
    finally:
        assert first.stop() == 0


def test_a_killed_server_leaves_server_json_and_the_next_replaces_it(tmp_path) -> None:
    config = write_config(tmp_path)
    first = start_server(config, tmp_path / "data")
    first.proc.kill()  # SIGKILL: no cleanup at all
    first.proc.wait(timeout=60)
    assert json.loads((tmp_path / "data" / "server.json").read_text())["pid"] == first.proc.pid
    second = start_server(config, tmp_path / "data")  # the kernel released the locks
    try:
        info = json.loads((tmp_path / "data" / "server.json").read_text())
        assert info["pid"] == second.proc.pid != first.proc.pid and info["url"] == second.url
        assert httpx.get(f"{second.url}/v1/indexes", timeout=60).json() == []
    finally:
        assert second.stop() == 0
    assert not (tmp_path / "data" / "server.json").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_an_address_other_than_loopback_is_refused_without_keys(tmp_path, host) -> None:
    config = write_config(tmp_path)
    code, err = refused(serve_command(config, "--host", host), tmp_path)
    assert code == 2 and f"--host {host} is not loopback, and listening there needs API keys" in err
    assert "embedpipe keys add" in err and "$EMBEDPIPE_SERVER_KEYS" in err
    assert not (tmp_path / "data" / "server.json").exists()


def test_a_port_in_use_isrefused(tmp_path) -> None:
    config = write_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(config), "--port", str(port)]
        code, err = refused(command, tmp_path)
    assert code == 2 and f"port {port} on 127.0.0.1 is in use" in err
    assert not (tmp_path / "data" / "server.json").exists()



def test_an_engine_another_process_holds_isrefused(tmp_path) -> None:
    """An ingest or an application with the engine open: the server does not start."""
    config = write_config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENGINE, str(config)], cwd=tmp_path,
                              env=server_env(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, err = refused(serve_command(config), tmp_path)
        assert code == 75 and f"pid {holder.pid}" in err and "open in another process" in err
        assert not (tmp_path / "data" / "server.json").exists()
    finally:
        holder.kill()
        holder.wait()
    server = start_server(config, tmp_path / "data")  # the server lock was let go too
    assert server.stop() == 0
