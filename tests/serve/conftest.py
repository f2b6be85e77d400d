"""A real ``embedpipe serve`` in a subprocess, and a real OpenAI-protocol server beside it.

The server is the command users run (``python -m embedpipe.cli serve --port 0``), found
through the ``server.json`` it writes. One serves the whole package (model loads are
paid once); tests that start and stop servers start their own with ``start_server``.
Its configuration:

* profile ``static``: the real static model distilled in the session (256 dims), the
  index ``kb`` is built on it through the documents endpoint;
* profile ``hosted``: ``text-embedding-3-small`` on the loopback OpenAI server, which
  serves the same static model's vectors: a hosted upstream the tests can hold;
* ``[chat]``: a self-hosted backend nobody listens for (``dead``), then the loopback
  server (``loop``, hosted): a fallback on every request, 503 for a sensitive one;
* small ``[server]`` limits, so 413s take little data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import LOOPBACK_KEY, hosted_profile_toml, static_profile_toml

MAX_BATCH = 64
MAX_K = 50
MAX_BODY = 256 * 1024
START_TIMEOUT_S = 180  # the CLI imports and Edge opens; a busy machine is slow, not wrong


@dataclass
class Served:
    """A running ``embedpipe serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    config: Path
    log: Path  # its stdout and stderr

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def server_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_")}
    env.update(EMBEDPIPE_CACHE_DIR=str(folder / "cache"), HF_HUB_OFFLINE="1",
               OPENAI_API_KEY=LOOPBACK_KEY, PYTHONUNBUFFERED="1")
    return env


def serve_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embedpipe.cli", "serve", "--config", str(config), "--port", "0", *extra]


def start_server(config: Path, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> Served:
    """Start ``embedpipe serve`` (``args``: more options, ``env``: more variables;
    ``command``: another command line that serves, e.g. the CLI behind a test's hook) and
    wait for the server.json that names its process."""
    folder = config.parent
    log = folder / f"serve-{time.monotonic_ns()}.log"
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(command or serve_command(config, *args), cwd=folder,
                                env={**server_env(folder), **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    info = data_dir / "server.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"embedpipe serve exited {proc.returncode}:\n{log.read_text()}")
        try:
            found = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = {}
        if found.get("pid") == proc.pid:
            return Served(proc, found["url"], data_dir, config, log)
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"embedpipe serve wrote no server.json in {START_TIMEOUT_S} s:\n{log.read_text()}")


def refused(command: list[str], folder: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command that must fail in one line (``error: ...``, no traceback):
    (exit code, stderr)."""
    done = subprocess.run(command, cwd=folder, env={**server_env(folder), **(env or {})}, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.returncode, done.stderr


def cli(served: Served, *args: str, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI with the served config, as a user runs it beside the server (so it goes
    through it); ``check``: assert it exits 0. Never a traceback."""
    done = subprocess.run([sys.executable, "-m", "embedpipe.cli", "--config", str(served.config), *args],
                          cwd=served.config.parent, env={**server_env(served.config.parent), **(env or {})},
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    if check:
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="package")
def loopback(static_model_dir: Path) -> Iterator[object]:
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    config = ServerConfig(model_path=static_model_dir, api_key=LOOPBACK_KEY, retry_after_s=0.01)
    with LoopbackOpenAI(config) as server:
        server.load_model()
        yield server


def package_config(folder: Path, static_model_dir: Path, loopback_url: str, server: str = "") -> Path:
    """The served configuration (see the module docstring); ``server``: more ``[server]`` lines."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    body = (
        'data_dir = "data"\n'
        f"[server]\nmax_batch = {MAX_BATCH}\nmax_k = {MAX_K}\nmax_body_bytes = {MAX_BODY}\n"
        "write_wait_s = 0.2\n" + server +
        '[chat]\nroute = ["dead", "loop"]\nbreaker_failures = 1000\n'
        f'[chat.backends.dead]\nbase_url = "{dead}"\nmodel = "llama-local"\nhosted = false\n'
        'api_key_env = ""\ntimeout_s = 2\nconnect_timeout_s = 0.5\n'
        f'[chat.backends.loop]\nbase_url = "{loopback_url}"\nmodel = "loopback-chat"\n'
        'api_key_env = "OPENAI_API_KEY"\ntimeout_s = 60\n'
        + static_profile_toml(static_model_dir)
        + hosted_profile_toml(loopback_url, limits="timeout_s = 120\nmax_retries = 0")
    )
    path = folder / "embedpipe.toml"
    path.write_text(body, encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory, static_model_dir: Path, loopback) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served")
    config = package_config(folder, static_model_dir, loopback.base_url)  # type: ignore[attr-defined]
    server = start_server(config, folder / "data")
    yield server
    loopback.configure(hold=False)  # type: ignore[attr-defined]
    assert server.stop() == 0, server.log_text()


@pytest.fixture(scope="package")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client


DOCS = [
    {"id": "fjord", "text": "Glaciers carve U-shaped valleys and fjords.", "metadata": {"kind": "geo", "year": 2021}},
    {"id": "compiler", "text": "Compilers translate source code into machine instructions.",
     "metadata": {"kind": "cs", "year": 2023}},
    {"id": "volcano", "text": "Volcanoes erupt molten rock called lava from the mantle.",
     "metadata": {"kind": "geo", "year": 2023}},
    {"id": "notes/cache.md", "text": "A cache keeps recent answers close to the processor.",
     "metadata": {"kind": "cs", "year": 2024}},
]


@pytest.fixture(scope="package")
def kb(http: httpx.Client) -> str:
    """Index ``kb`` on the static profile, made through the documents endpoint."""
    answer = http.post("/v1/indexes/kb/documents", json={"documents": DOCS, "profile": "static"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["added"] == len(DOCS)
    return "kb"
