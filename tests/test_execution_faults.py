"""Faults in a Ray run: a worker killed by pid mid-run, the driver killed and the same
command re-run. Real Ray on this machine, the real CLI in a subprocess, real models.
Slow (each starts its own Ray and embeds thousands of texts): run with -m slow.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe.backends.local import LocalEmbedder
from embedpipe.corpus import content_hash
from embedpipe.engine import close_all
from embedpipe.ingest import ingest
from embedpipe.profiles import fingerprint
from embedpipe.vectors import VectorStore

from conftest import static_profile_toml, write_jsonl

pytestmark = pytest.mark.slow

WORDS = ("wing flow shock boundary layer pressure heat transfer nozzle supersonic lift drag "
         "panel buckling cylinder plate turbulent laminar mach number jet").split()


def _texts(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for i in range(n)]


def _worker_pids() -> list[int]:
    """Pids of this machine's Ray Data actors running EmbedWorker (by their process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"EmbedWorker" in cmdline and b"MapWorker" in cmdline:
                pids.append(int(entry.name))
    return pids


def _segment_rows(store: VectorStore) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in store.folder.segments())


@pytest.fixture
def ray_local(tmp_path: Path):
    ray = pytest.importorskip("ray")
    # address="local": a Ray of its own, never one an earlier test or process left behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"EMBEDPIPE_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def test_a_worker_killed_mid_run_is_retried_and_every_text_stored_once(
        make_settings, static_model_dir, ray_local) -> None:
    from embedpipe.execution.ray_embed import embed_on_ray

    if not Path("/proc").is_dir():
        pytest.skip("finds the worker's pid through /proc")
    settings = make_settings(static_profile_toml(static_model_dir)
                             + "\n[execution.ray]\nworkers = 1\nbatch_size = 25\n")
    profile = settings.profile("static")
    fp = fingerprint(profile)
    texts = _texts(4000)
    todo = {content_hash(t): t for t in texts}
    store = VectorStore(settings.data_dir, fp, 256, "static")
    killed: list[int] = []
    after_kill = []

    def progress(n: int) -> None:
        if not killed:
            pids = _worker_pids()
            assert pids, "no EmbedWorker process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)
        else:
            after_kill.append(n)

    stats = embed_on_ray(settings, profile, fp, todo, store, progress=progress)
    assert killed and sum(after_kill) > 0  # the run went on after its worker died
    assert not set(killed) & set(_worker_pids())
    assert stats.planned == stats.embedded == len(todo) and stats.failed == 0
    fresh = VectorStore(settings.data_dir, fp, 256, "static")
    assert fresh.present(todo) == set(todo)
    assert _segment_rows(fresh) == len(todo)  # each text stored once
    sample = list(todo)[:50]
    local = LocalEmbedder(profile).embed_documents([todo[h] for h in sample]).vectors
    stored = fresh.lookup(sample)
    for h, vec in zip(sample, local):
        assert float(np.dot(stored[h], vec)) >= 0.9999 * float(np.linalg.norm(stored[h]) * np.linalg.norm(vec))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path: Path):
    """``ray start --head --block`` on 127.0.0.1, in its own session; ended by its pid group."""
    pytest.importorskip("ray")
    port = _free_port()
    env = {**os.environ, "EMBEDPIPE_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}  # a loopback-only cluster of the test's own
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start --head did not come up")
            time.sleep(0.5)
        time.sleep(3)  # the raylet registers after the GCS port opens
        yield f"127.0.0.1:{port}"
    finally:
        _end_group(head)


def _end_group(proc: subprocess.Popen, signals=(signal.SIGTERM, signal.SIGKILL)) -> None:
    for sig in signals:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def test_the_driver_killed_mid_run_resumes_with_only_uncommitted_partitions(
        tmp_path: Path, make_settings, static_model_dir, ray_head) -> None:
    n = 3000
    settings = make_settings(
        static_profile_toml(static_model_dir) + static_profile_toml(static_model_dir, "static_raw")
        .replace("normalize = true", "normalize = false")
        + f"\n[execution]\nengine = \"ray\"\n[execution.ray]\naddress = \"{ray_head}\"\nbatch_size = 20\n")
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(_texts(n, seed=11))]
    ingest(settings, "kb", write_jsonl(tmp_path / "docs.jsonl", docs), profile="static", executor="local")
    close_all()  # the CLI below opens the engine
    fp = fingerprint(settings.profile("static_raw"))
    hashes = [content_hash(d["text"]) for d in docs]
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}
    cmd = [str(Path(sys.executable).parent / "embedpipe"), "migrate", "--to", "static_raw", "--index", "kb",
           "--executor", "ray", "--yes", "--json"]

    def stored() -> int:
        store = VectorStore.existing(settings.data_dir, fp, 256)
        return len(store.present(hashes)) if store is not None else 0

    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while stored() < 32 + 3 * 20:  # the plan's probe keeps 32, then some partitions
            if driver.poll() is not None:
                pytest.fail(f"the driver ended before it could be killed: {driver.stderr.read()[-2000:]!r}")
            if time.monotonic() > deadline:
                pytest.fail("no partition was committed in time")
            time.sleep(0.05)
    finally:
        _end_group(driver, (signal.SIGKILL,))  # kill -9 the driver (and the Prefect server it started)
    before = stored()
    assert 0 < before < n, "the kill did not land mid-run"

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["status"] == "live" and report["documents"] == n and report["failed"] == 0
    probed = report["plan"]["probe_kept"]  # the re-run's plan embedded (and kept) a sample first
    assert report["executor"]["planned"] == report["executor"]["embedded"] == n - before - probed
    store = VectorStore(settings.data_dir, fp, 256, "static_raw")
    assert store.present(hashes) == set(hashes)
    assert _segment_rows(store) == n  # nothing embedded twice
