"""Embedding a migration's backfill, and an ingest, on Ray (``--executor ray``): a real Ray
started by the test on this machine, real models, the real vector store and engine.

The index starts on the bundled MiniLM and moves to the static model; the Ray run must
give the in-process vectors, the same fingerprint and the same counts. An ingest on Ray
must give what an in-process ingest of the same documents into another data directory
gives, and a re-ingest embeds nothing.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.backends.local import LocalEmbedder
from embedpipe.corpus import CorpusStore
from embedpipe.errors import ConfigError, ExecutionError
from embedpipe.execution import (
    EmbedAhead,
    PreEmbedStats,
    migration_streams,
    partitions,
    planned_waves,
    resolve_executor,
)
from embedpipe.index import IndexVersions
from embedpipe.ingest import ingest
from embedpipe.migration import Migration
from embedpipe.pipeline import Work
from embedpipe.profiles import fingerprint
from embedpipe.vectors import VectorStore

from embedpipe.config import load_settings

from conftest import EXAMPLES, cli, hosted_profile_toml, static_profile_toml, write_config

CORPUS = EXAMPLES / "corpus" / "docs.jsonl"
RAY_TOML = "\n[execution]\nengine = \"ray\"\n[execution.ray]\nworkers = 1\ncpus_per_worker = 1\nbatch_size = 8\n"


def _hash(n: int) -> str:
    return f"{n:064x}"


# --- the plan, without Ray -----------------------------------------------------------


def test_partitions_are_sized_and_longest_first() -> None:
    todo = {_hash(i): "x" * i for i in range(1, 11)}
    parts = partitions(todo, 4)
    assert [len(p) for p in parts] == [4, 4, 2]
    flat = [len(todo[h]) for p in parts for h in p]
    assert flat == sorted(flat, reverse=True)
    assert sorted(h for p in parts for h in p) == sorted(todo)


def _works(n: int, distinct: int) -> list[Work]:
    return [Work(f"d{i}", f"text {i % distinct}", _hash(i % distinct), {"id": f"d{i}"}) for i in range(n)]


def test_planned_waves_skip_stored_and_repeated_texts_and_cut_partitions_in_stream_order(
        tmp_path: Path) -> None:
    store = VectorStore(tmp_path, "f" * 64, 2, "p")
    store.add([_hash(1)], np.ones((1, 2), np.float32))
    works = _works(12, 6)  # texts 0..5, then the same six again
    [(wave, parts)] = list(planned_waves(works, store, 2))
    assert list(wave) == [_hash(i) for i in (0, 2, 3, 4, 5)]  # stored and repeated texts left out
    assert [p.hashes for p in parts] == [[_hash(0), _hash(2)], [_hash(3), _hash(4)], [_hash(5)]]
    # a partition's boundary: the works before it need nothing later partitions hold
    assert [p.boundary for p in parts] == [3, 5, 12]


def test_planned_waves_hold_at_most_a_wave_and_skip_what_earlier_waves_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import embedpipe.execution as execution

    monkeypatch.setattr(execution, "WAVE", 8)
    store = VectorStore(tmp_path, "f" * 64, 2, "p")
    # 30 distinct texts, each twice, the repeat coming after earlier waves were stored
    planned = []
    for wave, parts in planned_waves(_works(60, 30), store, 4):
        assert len(wave) <= 8 + 4 and sum(len(p.hashes) for p in parts) == len(wave)
        planned.extend(wave)
        store.add(list(wave), np.ones((len(wave), 2), np.float32))  # the caller stores it
    assert sorted(planned) == sorted(_hash(i) for i in range(30))  # each text once, none twice


class _Cluster:
    """A fake ``embed_on_ray``: stores partitions one at a time, in order, and after the
    first waits until the write path has taken a work (so the test proves the overlap
    instead of hoping for it); records what the write path had taken at each commit."""

    def __init__(self) -> None:
        self.taken = 0
        self.first_taken = threading.Event()
        self.taken_at_commit: list[int] = []

    def __call__(self, settings, profile, fp, todo, store, progress=None, parts=None,
                 on_commit=None, stop=None) -> PreEmbedStats:
        stats = PreEmbedStats(executor="ray", planned=len(todo), partitions=len(parts))
        for n, part in enumerate(parts):
            stats.embedded += store.add(part, np.ones((len(part), 2), np.float32))
            stats.committed += 1
            self.taken_at_commit.append(self.taken)
            on_commit(list(part))
            if n == 0:
                assert self.first_taken.wait(30), "the write path got nothing after the first partition"
        return stats


def test_embed_ahead_hands_each_work_on_once_its_partition_is_stored_while_the_rest_embeds(
        make_settings, static_model_dir, tmp_path: Path) -> None:
    settings = make_settings(static_profile_toml(static_model_dir) + RAY_TOML.replace("= 8", "= 3"))
    store = VectorStore(tmp_path, "f" * 64, 2, "p")
    works = _works(20, 20)
    cluster = _Cluster()
    with EmbedAhead(settings, settings.profile("static"), "f" * 64, [lambda: works], store, "ray",
                    embed=cluster) as ahead:
        for work in ahead.gate(0, works):
            assert store.present([work.content_hash]) == {work.content_hash}  # stored before handed on
            cluster.taken += 1
            cluster.first_taken.set()
    assert cluster.taken == 20 and ahead.stats.embedded == 20 and ahead.stats.committed == 7
    assert cluster.taken_at_commit[0] == 0 and cluster.taken_at_commit[-1] > 0  # writes overlapped


class _Stored:
    """A fake ``embed_on_ray`` that stores every partition (the target's dims) and
    counts its calls: one call is one wave, one actor pool."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, settings, profile, fp, todo, store, progress=None, parts=None,
                 on_commit=None, stop=None) -> PreEmbedStats:
        self.calls += 1
        stats = PreEmbedStats(executor="ray", planned=len(todo), partitions=len(parts))
        for part in parts:
            stats.embedded += store.add(part, np.ones((len(part), store.dims), np.float32))
            stats.committed += 1
            on_commit(list(part))
        return stats


def test_a_migration_s_slices_share_one_wave_and_the_backfill_finds_every_vector(
        make_settings, static_model_dir) -> None:
    # windows of 4 works and slices of 15 documents: the backfill looks vectors up many
    # times while the background thread stores more (it must see them: one store)
    settings = make_settings("window = 4\n" + static_profile_toml(static_model_dir)
                             + "\n[migration]\nslice_size = 15\nsample_size = 40\n"
                             + RAY_TOML.replace("= 8", "= 3"))
    ingest(settings, "kb", CORPUS, profile="local-minilm", executor="local")
    m = Migration(settings, "kb", "static")
    m.prepare()
    todo = m.todo()
    slices = m.slices(todo)
    cluster = _Stored()
    ahead = EmbedAhead(settings, m.profile, m.fingerprint, migration_streams(m, slices), m.store(), "ray",
                       embed=cluster)
    with ahead:
        embedded = [m.backfill(ids, ahead=ahead, number=n).embedded for n, ids in enumerate(slices)]
    assert len(slices) == 3 and embedded == [0, 0, 0]  # every vector came from the cluster
    assert cluster.calls == 1 and ahead.stats.embedded == len(_texts(settings))  # one wave, all slices


def test_embed_ahead_raises_the_cluster_s_failure_in_the_write_path(
        make_settings, static_model_dir, tmp_path: Path) -> None:
    settings = make_settings(static_profile_toml(static_model_dir) + RAY_TOML)

    def refuse(*args, **kwargs) -> PreEmbedStats:
        raise ExecutionError("worker on host-b cannot embed: no weights")

    store = VectorStore(tmp_path, "f" * 64, 2, "p")
    works = _works(5, 5)
    with pytest.raises(ExecutionError, match="host-b"):
        with EmbedAhead(settings, settings.profile("static"), "f" * 64, [lambda: works], store, "ray",
                        embed=refuse) as ahead:
            list(ahead.gate(0, works))
    assert store.present([w.content_hash for w in works]) == set()


def test_executor_is_the_flag_else_the_config(make_settings) -> None:
    assert resolve_executor(make_settings()) == "local"
    settings = make_settings(RAY_TOML)
    assert resolve_executor(settings) == "ray"
    assert resolve_executor(settings, "local") == "local"
    assert settings.execution.ray.batch_size == 8
    with pytest.raises(ConfigError):
        resolve_executor(settings, "dask")


def test_ray_address_comes_from_the_environment(make_settings, monkeypatch) -> None:
    monkeypatch.setenv("EMBEDPIPE_RAY_ADDRESS", "auto")
    assert make_settings(RAY_TOML).execution.ray.address == "auto"


@pytest.mark.parametrize("command", [
    ("migrate", "--to", "static", "--index", "kb", "--yes"),
    ("ingest", str(CORPUS), "--index", "kb", "--profile", "static"),
], ids=["migrate", "ingest"])
def test_executor_ray_without_ray_says_how_to_install(make_settings, static_model_dir, capsys,
                                                      monkeypatch, command) -> None:
    make_settings(static_profile_toml(static_model_dir))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out, err = cli(capsys, monkeypatch, *command, "--executor", "ray")
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'embedpipe[ray]'" in lines[0], err
    assert "Traceback" not in err


# --- on a real Ray -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray (2 CPUs) for the module; stopped at its end."""
    ray = pytest.importorskip("ray")
    cache = tmp_path_factory.mktemp("ray-cache")
    # address="local": a Ray of its own, never one another process left running here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"EMBEDPIPE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def cfg(make_settings, static_model_dir: Path):
    """Ray settings with the static profile, and the example corpus live on local-minilm."""
    settings = make_settings(static_profile_toml(static_model_dir) + "\n[migration]\nsample_size = 40\n"
                             + RAY_TOML)
    ingest(settings, "kb", CORPUS, profile="local-minilm", executor="local")
    return settings


def _texts(settings) -> dict[str, str]:
    corpus = CorpusStore.for_index(settings.data_dir, "kb")
    out: dict[str, str] = {}
    for batch in corpus.iter_batches(columns=["text", "content_hash"]):
        out.update(zip(batch.column("content_hash").to_pylist(), batch.column("text").to_pylist()))
    return out


def test_ray_backfill_gives_the_in_process_vectors(cfg, ray_cluster) -> None:
    m = Migration(cfg, "kb", "static")
    m.prepare()
    todo = m.todo()
    texts = _texts(cfg)
    done = m.pre_embed(todo, "ray")
    assert (done["executor"], done["planned"], done["embedded"], done["failed"]) == ("ray", len(texts), len(texts), 0)
    assert done["partitions"] == done["committed"] == -(-len(texts) // 8)
    # the ordinary backfill finds every vector stored: it embeds nothing
    for ids in m.slices(todo):
        assert m.backfill(ids).embedded == 0
    m.catch_up()
    m.cutover(m.validate())
    report = m.report("live").to_dict()
    assert report["embedded"] == len(texts) and report["failed"] == 0
    assert report["executor"]["embedded"] == len(texts)

    fp = fingerprint(cfg.profile("static"))
    live = IndexVersions.open(cfg).require_live("kb")
    assert live.fingerprint == fp and live.profile == "static"
    assert len(IndexVersions.open(cfg).contents(live.collection)) == len(json.loads("[" + ",".join(
        line for line in CORPUS.read_text().splitlines() if line.strip()) + "]"))
    hashes = sorted(texts)
    from_ray = VectorStore(cfg.data_dir, fp, 256, "static").lookup(hashes)
    local = LocalEmbedder(cfg.profile("static")).embed_documents([texts[h] for h in hashes]).vectors
    for h, vec in zip(hashes, local):
        cosine = float(np.dot(from_ray[h], vec) / (np.linalg.norm(from_ray[h]) * np.linalg.norm(vec)))
        assert cosine >= 0.9999, h


def test_a_worker_with_other_weights_is_refused_naming_its_host(cfg, ray_cluster) -> None:
    from embedpipe.execution.ray_embed import embed_on_ray

    profile = cfg.profile("static")
    store = VectorStore(cfg.data_dir, "e" * 64, 256, "static")
    todo = dict(list(_texts(cfg).items())[:5])
    with pytest.raises(ExecutionError) as caught:
        embed_on_ray(cfg, profile, "e" * 64, todo, store)  # the driver's fingerprint is another
    line = str(caught.value)
    assert "\n" not in line and socket.gethostname() in line and "fingerprint" in line
    assert store.present(todo) == set()  # nothing of the other space was stored


@pytest.mark.slow  # each Ray test starts actors that load the model (tens of seconds)
def test_a_rerun_embeds_only_what_no_committed_partition_holds(cfg, ray_cluster) -> None:
    m = Migration(cfg, "kb", "static")
    m.prepare()
    todo = m.todo()
    first = m.pre_embed(todo[:15], "ray")  # as if the driver had died after these partitions
    assert first["embedded"] == first["planned"] > 0
    store = m.store()
    held = store.present(_texts(cfg))
    assert len(held) == first["embedded"]
    again = Migration(cfg, "kb", "static")
    again.prepare()
    second = again.pre_embed(again.todo(), "ray")
    assert second["planned"] == second["embedded"] == len(_texts(cfg)) - len(held)
    assert again.store().present(_texts(cfg)) == set(_texts(cfg))  # a fresh look at the files


# --- ingest on a real Ray ------------------------------------------------------------

COUNTS = ("documents", "added", "updated", "unchanged", "failed", "embedded", "reused", "created_version")
CHUNKED = "\n[indexes.kb]\nchunk_tokens = 32\nchunk_overlap = 8\n"


def _stored(settings, profile: str) -> dict[str, np.ndarray]:
    """content hash -> vector of everything the vector store of ``profile`` holds."""
    store = VectorStore(settings.data_dir, fingerprint(settings.profile(profile)), 256, profile)
    table = pa.concat_tables([pq.read_table(p) for p in store.folder.segments()])
    return dict(zip(table.column("content_hash").to_pylist(),
                    np.asarray(table.column("vector").to_pylist(), np.float32)))


def _same_vectors(ray_run: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> None:
    assert sorted(ray_run) == sorted(local)
    for h, vec in local.items():
        other = ray_run[h]
        assert float(np.dot(other, vec) / (np.linalg.norm(other) * np.linalg.norm(vec))) >= 0.9999, h


def _in_process(tmp_path: Path, body: str):
    """The same documents ingested in this process into another data directory."""
    folder = tmp_path / "in-process"
    folder.mkdir()
    settings = load_settings(write_config(folder, body))
    return settings, ingest(settings, "kb", CORPUS, profile="static", executor="local").to_dict()


def test_ray_ingest_gives_the_in_process_vectors_and_counts(tmp_path, make_settings, static_model_dir,
                                                            ray_cluster) -> None:
    body = static_profile_toml(static_model_dir) + RAY_TOML.replace('engine = "ray"', 'engine = "local"')
    settings = make_settings(body)
    local_settings, local = _in_process(tmp_path, body)
    report = ingest(settings, "kb", CORPUS, profile="static", executor="ray").to_dict()
    assert {k: report[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
    texts = len(_texts(settings))
    ran = report["executor"]
    assert (ran["executor"], ran["planned"], ran["embedded"], ran["failed"]) == ("ray", texts, texts, 0)
    assert ran["partitions"] == ran["committed"] == -(-texts // 8)
    assert report["embedded"] == texts and local["executor"] is None
    live = IndexVersions.open(settings).require_live("kb")
    assert live.fingerprint == report["fingerprint"] == local["fingerprint"]
    assert len(IndexVersions.open(settings).contents(live.collection)) == report["documents"]
    _same_vectors(_stored(settings, "static"), _stored(local_settings, "static"))

    again = ingest(settings, "kb", CORPUS, executor="ray").to_dict()
    assert again["embedded"] == 0 and again["unchanged"] == again["documents"]
    assert again["executor"]["executor"] == "ray" and again["executor"]["embedded"] == 0


@pytest.mark.slow  # each Ray test starts actors that load the model (tens of seconds)
def test_ray_ingest_from_the_cli_chunks_as_the_index_does(tmp_path, make_settings, static_model_dir,
                                                          ray_cluster, capsys, monkeypatch) -> None:
    body = static_profile_toml(static_model_dir) + CHUNKED
    settings = make_settings(body)
    local_settings, local = _in_process(tmp_path, body)
    code, out, err = cli(capsys, monkeypatch, "ingest", str(CORPUS), "--index", "kb", "--profile", "static",
                         "--executor", "ray", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert {k: report[k] for k in COUNTS} == {k: local[k] for k in COUNTS}
    stored = _stored(settings, "static")
    assert len(stored) > report["documents"]  # chunked: more pieces than documents
    assert report["executor"]["embedded"] == report["embedded"] == len(stored)
    _same_vectors(stored, _stored(local_settings, "static"))

    # a new document goes through the same path; the rest is unchanged and reused
    extra = tmp_path / "extra.jsonl"
    extra.write_text(CORPUS.read_text() + json.dumps({"id": "new-doc", "text": "A brand new text. " * 30}) + "\n")
    code, out, err = cli(capsys, monkeypatch, "ingest", str(extra), "--index", "kb", "--executor", "ray")
    assert code == 0, err
    assert "1 added" in out and "executor ray:" in out
    code, out, err = cli(capsys, monkeypatch, "ingest", str(CORPUS), "--index", "kb", "--executor", "ray",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 0


def test_a_hosted_ingest_stays_on_the_driver_with_one_note(make_settings, openai_server, capsys,
                                                           monkeypatch) -> None:
    make_settings(hosted_profile_toml(openai_server.base_url) + RAY_TOML)
    code, out, err = cli(capsys, monkeypatch, "ingest", str(CORPUS), "--index", "kb", "--profile", "hosted",
                         "--executor", "ray")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "is hosted" in line]
    assert len(notes) == 1 and "stay on this machine" in notes[0], err
    assert "executor ray:" not in out and "40 added" in out
