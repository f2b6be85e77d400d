"""The storage boundary: both engines (Qdrant Edge, and the server engine on qdrant-client's
local mode, the stand-in for a Qdrant server) answer the same filters and group-bys with
the same points, and Edge's catalogue moves an alias with its states in one write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.engine.filters import Typed
from embedpipe.errors import InputError
from embedpipe.index import IndexVersions

DIMS = 384  # local-minilm's, the default profile of the test settings


@pytest.fixture(params=["edge", "server"])
def versions(request, settings) -> IndexVersions:
    if request.param == "edge":
        return IndexVersions.open(settings)
    from embedpipe.engine.server import ServerEngine
    from embedpipe.qdrant import connect

    return IndexVersions(ServerEngine(connect(settings), settings), settings)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIMS)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _metadata(i: int) -> dict:
    return {"lang": ["en", "de", "fr"][i % 3], "year": 2019 + i % 4, "draft": i % 5 == 0,
            "score": [0.5, 0.25][i % 2], "tag": str(2019 + i % 4)}


FILTERS = [
    ({"lang": "en"}, lambda m: m["lang"] == "en"),
    ({"year": [2020, 2021]}, lambda m: m["year"] in (2020, 2021)),
    ({"draft": True}, lambda m: m["draft"] is True),
    ({"draft": False}, lambda m: m["draft"] is False),
    ({"score": 0.5}, lambda m: m["score"] == 0.5),
    ({"lang": ["de", "fr"], "draft": False}, lambda m: m["lang"] != "en" and not m["draft"]),
    # as typed on a command line: the number 2020 or the text "2020"
    ({"year": Typed("2020")}, lambda m: m["year"] == 2020),
    ({"tag": Typed("2020")}, lambda m: m["tag"] == "2020"),
    ({"draft": Typed("true")}, lambda m: m["draft"] is True),
]


@pytest.mark.parametrize("flt,expected", FILTERS, ids=[str(f) for f, _ in FILTERS])
def test_filters_select_exactly_the_matching_points(versions, settings, flt, expected) -> None:
    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    ids = [f"d{i}" for i in range(60)]
    meta = {i: _metadata(n) for n, i in enumerate(ids)}
    versions.upsert(version.collection, ids, _unit(np.random.default_rng(1), 60),
                    [{"id": i, "metadata": meta[i]} for i in ids])
    hits = versions.search(version.collection, _unit(np.random.default_rng(2), 1)[0], 60, flt)
    assert {h.id for h in hits} == {i for i in ids if expected(meta[i])}
    assert all(h.metadata == meta[h.id] for h in hits)  # the boolean mirror stays out of sight


def test_a_qdrant_client_filter_still_works(versions, settings) -> None:
    from qdrant_client import models

    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    ids = [f"d{i}" for i in range(30)]
    versions.upsert(version.collection, ids, _unit(np.random.default_rng(1), 30),
                    [{"id": i, "metadata": _metadata(n)} for n, i in enumerate(ids)])
    flt = models.Filter(must=[models.FieldCondition(key="metadata.lang", match=models.MatchValue(value="de"))],
                        must_not=[models.FieldCondition(key="metadata.year", range=models.Range(gte=2021))])
    hits = versions.search(version.collection, _unit(np.random.default_rng(2), 1)[0], 30, flt)
    expected = {i for n, i in enumerate(ids) if _metadata(n)["lang"] == "de" and _metadata(n)["year"] < 2021}
    assert expected and {h.id for h in hits} == expected
    with pytest.raises(InputError, match="not supported"):
        versions.search(version.collection, _unit(np.random.default_rng(2), 1)[0], 3,
                        models.Filter(must=[models.HasIdCondition(has_id=[1])]))


def test_group_by_doc_returns_the_k_best_documents_when_one_document_crowds_the_top(versions, settings) -> None:
    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    rng = np.random.default_rng(3)
    query = _unit(rng, 1)[0]
    noise = _unit(rng, 200)
    # 100 chunks of "big" all nearer the query than any other document's best chunk, so
    # one fetch of a few times k points holds no second document.
    keys, vectors, payloads = [], [], []
    for n in range(100):
        keys.append(f"big#{n}")
        vectors.append(query + 0.05 * noise[n])
        payloads.append({"id": "big", "chunk": n, "chunks": 100})
    for n, doc in enumerate(["a", "b", "c", "d"]):
        keys.append(doc)
        vectors.append(query + (0.3 + 0.1 * n) * noise[100 + n])
        payloads.append({"id": doc})
    for n in range(60):  # far away
        keys.append(f"far{n}")
        vectors.append(noise[140 + n])
        payloads.append({"id": f"far{n}"})
    matrix = np.asarray(vectors, dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    versions.upsert(version.collection, keys, matrix, payloads)

    hits = versions.search(version.collection, query, 3, group_by_doc=True)
    assert [h.id for h in hits] == ["big", "a", "b"]
    assert hits[0].chunk is not None and hits[0].score > hits[1].score > hits[2].score
    everything = versions.search(version.collection, query, 500, group_by_doc=True)
    assert len(everything) == 65  # fewer documents than k: every one, once


def test_the_edge_catalogue_moves_the_alias_and_the_states_in_one_write(settings) -> None:
    versions = IndexVersions.open(settings)
    profile = settings.profile()
    first = versions.create_version("kb", profile, "ab" * 32)
    versions.point_alias("kb", first)
    second = versions.create_version("kb", profile, "cd" * 32)
    writes = []
    real = versions.engine._write_catalogue
    versions.engine._write_catalogue = lambda change: (writes.append(1), real(change))[1]
    versions.point_alias("kb", second)
    assert len(writes) == 1
    catalogue = json.loads((settings.data_dir / "engine" / "catalogue.json").read_text())
    assert catalogue["aliases"] == {"kb": second.collection}
    assert catalogue["spaces"][second.collection]["state"] == "live"
    assert catalogue["spaces"][second.collection]["previous"] == first.collection
    assert catalogue["spaces"][first.collection]["state"] == "standby"
    assert not [p for p in (settings.data_dir / "engine").iterdir() if p.name.endswith(".tmp")]


def test_edge_refuses_a_batch_with_a_wrong_dimension_before_writing_any_of_it(settings) -> None:
    from embedpipe.errors import EngineError

    versions = IndexVersions.open(settings)
    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    with pytest.raises(EngineError, match=r"expected \(2, 384\)"):
        versions.upsert(version.collection, ["a", "b"], np.ones((2, 10), np.float32), [{"id": "a"}, {"id": "b"}])
    assert versions.count(version.collection) == 0


@pytest.mark.parametrize("quantization", ["int8", "none"])
def test_edge_searches_an_indexed_shard_with_exact_scores_whatever_its_quantization(
        make_settings, quantization) -> None:
    """Past Edge's indexing threshold the HNSW build runs; with int8 quantization the
    graph walk compares int8 copies, and the answers are rescored with the stored
    float32 vectors: the scores are the exact cosines, the best hit is the exact best."""
    settings = make_settings(f'[qdrant]\nquantization = "{quantization}"\n')
    versions = IndexVersions.open(settings)
    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    n = 12_000  # 18 MB of float32 vectors: above the 10 MB past which Edge indexes
    vectors = _unit(np.random.default_rng(5), n)
    ids = [f"d{i}" for i in range(n)]
    for start in range(0, n, 2_000):
        versions.upsert(version.collection, ids[start:start + 2_000], vectors[start:start + 2_000],
                        [{"id": i} for i in ids[start:start + 2_000]])
    versions.build_index(version.collection)
    edge_config = json.loads((settings.data_dir / "engine" / version.collection / "edge_config.json").read_text())
    assert ("scalar" in json.dumps(edge_config.get("quantization_config"))) == (quantization == "int8")
    assert versions.engine.info(version.collection).indexed == n
    queries = vectors[:20] + 0.05 * _unit(np.random.default_rng(6), 20)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    row = {i: r for r, i in enumerate(ids)}
    for q, query in enumerate(queries):
        hits = versions.search(version.collection, query, 10)
        assert hits[0].id == f"d{q}"
        for hit in hits:
            assert hit.score == pytest.approx(float(vectors[row[hit.id]] @ query), abs=1e-5)


def test_a_server_builds_a_version_that_is_not_live_in_a_child_process_while_searches_go_on(
        make_settings) -> None:
    """Edge's HNSW build holds the interpreter; in a serving process it runs in a child
    process, so searches of a live index go on through it, and a call that needs the
    shard being built waits for it and then sees every point."""
    import os
    import threading

    from embedpipe.engine.edge import build_in_child

    settings = make_settings("")
    versions = IndexVersions.open(settings)
    live = versions.create_version("live", settings.profile(), "cd" * 32)
    small = _unit(np.random.default_rng(7), 300)
    versions.upsert(live.collection, [f"s{i}" for i in range(300)], small, [{"id": f"s{i}"} for i in range(300)])
    versions.point_alias("live", live)
    version = versions.create_version("kb", settings.profile(), "ab" * 32)
    n = 12_000  # past Edge's indexing threshold: a real HNSW build
    vectors = _unit(np.random.default_rng(5), n)
    ids = [f"d{i}" for i in range(n)]
    for start in range(0, n, 2_000):
        versions.upsert(version.collection, ids[start:start + 2_000], vectors[start:start + 2_000],
                        [{"id": i} for i in ids[start:start + 2_000]])
    build_in_child(True)
    try:
        builder = threading.Thread(target=versions.build_index, args=(version.collection,))
        builder.start()
        counted: list[int] = []
        counter = threading.Thread(target=lambda: counted.append(versions.count(version.collection)))
        counter.start()  # needs the shard being built: waits for the build
        searches = 0
        while builder.is_alive():
            assert versions.search(live.collection, small[searches % 300], 1)[0].id == f"s{searches % 300}"
            searches += 1
        builder.join()
        counter.join()
    finally:
        build_in_child(False)
    assert searches > 500  # in-process, the build stops every search in this process
    assert counted == [n]
    assert versions.engine.last_build_pid not in (None, os.getpid())
    assert versions.engine.info(version.collection).indexed == n
    hits = versions.search(version.collection, vectors[3], 5)
    assert hits[0].id == "d3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
