"""Query adapters (embedpipe.adapters): fitted from stored vectors, judged, used when the
live model is gone, retired by the migration that replaces them.

The index lives on a hosted profile served by the loopback OpenAI server (the static
model's vectors behind the OpenAI protocol); the adapter maps the local static profile's
queries into it. The loopback server's ``deprecated_models`` retires the hosted model
(404 model_not_found), as on deprecation day.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from embedpipe.adapters import active_adapter, adapters_of, apply_map, fit_map
from embedpipe.errors import (
    AdapterRefused,
    FingerprintMismatch,
    InputError,
    ModelDeprecated,
    NoAdapter,
    StoreError,
)
from embedpipe.index import Index, IndexVersions
from embedpipe.ingest import ingest

from conftest import CRANFIELD, cli, hosted_profile_toml, static_profile_toml, write_jsonl

RETIRE = {"deprecated_models": ("text-embedding-3-small",)}


# --- the map ---------------------------------------------------------------------------------


def test_procrustes_recovers_a_rotation_exactly() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 24))
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    w = fit_map("procrustes", x, x @ q)
    assert w.shape == (25, 24) and np.allclose(w[:-1], q, atol=1e-4) and not w[-1].any()


def test_ridge_recovers_an_affine_map_between_different_widths_and_lowrank_cuts_its_rank() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((800, 16))
    a, b = rng.standard_normal((16, 8)), rng.standard_normal(8)
    y = x @ a + b + 0.01 * rng.standard_normal((800, 8))
    w = fit_map("ridge", x, y)
    assert np.abs(apply_map(w, x) - (x @ a + b)).max() < 0.1
    low = fit_map("lowrank", x, y)
    assert np.linalg.matrix_rank(low[:-1], tol=1e-4) == 2  # a quarter of min(16, 8)
    mapped = apply_map(w, x[:5], normalize=True)
    assert np.allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(Exception, match="procrustes, ridge, lowrank"):
        fit_map("mlp", np.zeros((4, 2)), np.zeros((4, 2)))


# --- end to end ------------------------------------------------------------------------------


def _cranfield(n: int) -> list[dict]:
    from embedpipe.evaluation import read_cranfield

    docs = read_cranfield(CRANFIELD).documents
    return [{"id": i, "text": t} for i, t in list(docs.items())[:n] if t.strip()]


@pytest.fixture
def hosted(openai_server, make_settings, static_model_dir: Path, tmp_path: Path):
    """200 Cranfield documents live on the hosted profile; ``static`` is the new model."""
    openai_server.load_model()
    body = (hosted_profile_toml(openai_server.base_url, name="hosted", limits="max_retries = 1\ntimeout_s = 20")
            + static_profile_toml(static_model_dir) + "[adapter]\nsample_queries = 60\n"
            + '[chat]\nroute = ["loop"]\n[chat.backends.loop]\nmodel = "loopback-chat"\n'
            + f'base_url = "{openai_server.base_url}"\napi_key_env = "OPENAI_API_KEY"\n')
    settings = make_settings(body)
    ingest(settings, "kb", write_jsonl(tmp_path / "docs.jsonl", _cranfield(200)), profile="hosted")
    return settings


def _adapt(settings, **kw):
    from embedpipe.adapters import adapt

    return adapt(settings, "kb", "static", **kw)


def test_an_adapter_is_fitted_from_stored_vectors_after_the_old_model_is_gone(hosted, openai_server) -> None:
    openai_server.configure(**RETIRE)
    openai_server.reset_counters()
    report = _adapt(hosted)
    # The live version's side of every pair came from the vector store: not one input
    # reached the (retired) hosted model.
    assert openai_server.counters()["inputs_received"] == 0, openai_server.counters()
    assert report["state"] == "accepted" and not report["old_can_query"]
    assert "no longer serves" in report["old_reason"] and report["mode"] == "self-retrieval"
    assert report["metrics"]["self-retrieval@10"]["old"] is None
    assert report["metrics"]["self-retrieval@10"]["adapter"] >= hosted.adapter.min_self_retrieval
    assert report["pairs"] + report["held_out"] <= 200 and report["held_out"] >= 8


def test_accepted_adapter_is_stored_with_its_version_and_its_own_fingerprint(hosted) -> None:
    report = _adapt(hosted, sample=150)
    live = IndexVersions.open(hosted).live("kb")
    adapter = active_adapter(hosted, live)
    assert adapter is not None and adapter.id == report["adapter"] and adapter.target == live.collection
    folder = hosted.data_dir / "adapters" / "kb" / live.collection / adapter.id
    weights = np.load(folder / "weights.npy")
    assert weights.shape == (257, 256) and adapter.pairs == report["pairs"] == 150
    assert hashlib.sha256(weights.tobytes()).hexdigest() == adapter.weights_sha256
    assert adapter.fingerprint not in (adapter.source_fingerprint, adapter.target_fingerprint)
    assert adapter.fingerprint.startswith(adapter.id)
    # Judged against the old model while it can still embed queries: retention = adapter / old.
    m = report["metrics"]["self-retrieval@10"]
    assert report["old_can_query"] and m["old"] > 0 and m["retention"] == round(m["adapter"] / m["old"], 4)
    assert report["pair_cosine"] > 0.9  # the two profiles serve the same static model


def test_the_new_models_pair_vectors_are_stored_for_the_migration_to_reuse(hosted) -> None:
    from embedpipe.migration import plan_migration

    report = _adapt(hosted)
    plan = plan_migration(hosted, "kb", "static", dry_run=True, probe=False)
    assert plan.reusable == report["embedded"] == report["pairs"] + report["held_out"]
    assert plan.to_embed == 200 - plan.reusable
    assert _adapt(hosted)["embedded"] == 0  # a second fit embeds nothing either


def test_search_survives_the_retirement_through_the_adapter(hosted, openai_server) -> None:
    _adapt(hosted)
    index = Index("kb", hosted)
    native = index.search("boundary layer flow over a flat plate", k=5)
    assert all(h.via is None for h in native)
    openai_server.configure(**RETIRE)  # retired while this Index is pinned to the model
    adapted = index.search("boundary layer flow over a flat plate", k=5)
    adapter = index.adapter()
    assert adapter is not None and all(h.via == f"adapter {adapter.id} (static)" for h in adapted)
    assert adapted[0].id == native[0].id  # same static vectors behind both profiles
    fresh = Index("kb", hosted).search("heat transfer at hypersonic speed", k=3)
    assert len(fresh) == 3 and fresh[0].via


def test_ask_retrieves_through_the_adapter_and_says_so(hosted, openai_server, capsys, monkeypatch,
                                                       tmp_path) -> None:
    adapter = _adapt(hosted)["adapter"]
    openai_server.configure(**RETIRE)
    answer = Index("kb", hosted).answer("what is known about boundary layer transition?", k=3)
    assert len(answer.sources) == 3 and all(s["via"] == f"adapter {adapter} (static)" for s in answer.sources)
    code, out, err = cli(capsys, monkeypatch, "-c", str(tmp_path / "embedpipe.toml"), "ask",
                         "what is known about boundary layer transition?", "--index", "kb")
    assert code == 0 and f"retrieved through adapter {adapter}" in err and "cited:" in out


def test_a_revoked_key_switches_search_to_the_adapter(hosted, openai_server) -> None:
    from embedpipe.errors import KeyRefused

    index = Index("kb", hosted)
    assert index.search("boundary layer", k=3)[0].via is None
    openai_server.configure(api_key="sk-rotated-elsewhere")  # the key we hold is revoked (401)
    with pytest.raises(KeyRefused, match="refused the API key"):
        Index("kb", hosted).search("boundary layer", k=3)  # no adapter yet: the provider's error
    openai_server.configure(api_key=None)
    adapter = _adapt(hosted)["adapter"]
    openai_server.configure(api_key="sk-rotated-elsewhere")
    hits = index.search("boundary layer", k=3)
    assert hits[0].via == f"adapter {adapter} (static)"


def test_without_an_adapter_the_retirement_is_the_providers_error(hosted, openai_server) -> None:
    index = Index("kb", hosted)
    openai_server.configure(**RETIRE)
    with pytest.raises(ModelDeprecated, match="no longer serves"):
        index.search("boundary layer", k=3)


def test_a_refused_adapter_is_recorded_and_never_used_and_force_overrides(hosted, openai_server) -> None:
    strict = hosted.model_copy(update={"adapter": hosted.adapter.model_copy(update={"min_retention": 1.5})})
    with pytest.raises(AdapterRefused, match=r"full re-index is needed.*--force"):
        _adapt(strict)
    live = IndexVersions.open(hosted).live("kb")
    assert [a.state for a in adapters_of(hosted, live)] == ["refused"]
    assert active_adapter(hosted, live) is None
    openai_server.configure(**RETIRE)
    with pytest.raises(ModelDeprecated):
        Index("kb", hosted).search("boundary layer", k=3)
    openai_server.configure(deprecated_models=())  # judged against the old model again
    forced = _adapt(strict, force=True)
    assert forced["state"] == "accepted" and forced["forced"]
    assert active_adapter(hosted, live).forced
    openai_server.configure(**RETIRE)
    assert Index("kb", hosted).search("boundary layer", k=3)[0].via


def test_query_via_adapter_uses_it_while_the_model_works_and_needs_one(hosted, openai_server) -> None:
    via = hosted.model_copy(update={"indexes": {"kb": hosted.index_settings("kb").model_copy(
        update={"query_via": "adapter"})}})
    with pytest.raises(NoAdapter, match="embedpipe adapt --index kb"):
        Index("kb", via).search("boundary layer", k=3)
    _adapt(hosted)
    openai_server.reset_counters()
    hits = Index("kb", via).search("boundary layer", k=3)
    assert hits[0].via and openai_server.counters()["embedding_requests"] == 0


def test_tampered_weights_are_refused_at_search(hosted, openai_server) -> None:
    report = _adapt(hosted)
    live = IndexVersions.open(hosted).live("kb")
    path = hosted.data_dir / "adapters" / "kb" / live.collection / report["adapter"] / "weights.npy"
    weights = np.load(path)
    weights[0, 0] += 1.0
    np.save(path, weights)
    openai_server.configure(**RETIRE)
    with pytest.raises(StoreError, match="changed since it was validated.*embedpipe adapt"):
        Index("kb", hosted).search("boundary layer", k=3)


def test_an_adapter_whose_profile_changed_is_refused(hosted, openai_server) -> None:
    _adapt(hosted)
    openai_server.configure(**RETIRE)
    changed = hosted.model_copy(update={"profiles": {**hosted.profiles, "static": hosted.profiles["static"]
                                                     .model_copy(update={"query_prompt": "q: "})}})
    with pytest.raises(FingerprintMismatch, match="fit it again"):
        Index("kb", changed).search("boundary layer", k=3)


def test_the_migration_retires_the_adapter_and_a_rollback_reinstates_it(hosted, openai_server) -> None:
    from embedpipe.migration import Migration, rollback

    report = _adapt(hosted)
    openai_server.configure(**RETIRE)
    m = Migration(hosted, "kb", "static")
    m.prepare()
    m.backfill(m.todo())
    assert Index("kb", hosted).search("boundary layer", k=3)[0].via  # during the backfill
    m.catch_up()
    m.cutover(m.validate())
    assert m.report("live").adapters_retired == [report["adapter"]]
    old = next(v for v in IndexVersions.open(hosted).versions("kb") if v.profile == "hosted")
    assert [a.state for a in adapters_of(hosted, old)] == ["retired"]
    assert Index("kb", hosted).search("boundary layer", k=3)[0].via is None  # native now
    back = rollback(hosted, "kb")  # the hosted model is gone, but its adapter stands in
    assert back["adapter_reinstated"] == report["adapter"]
    assert Index("kb", hosted).search("boundary layer", k=3)[0].via


def test_retire_removes_the_adapters_of_dropped_versions(hosted, openai_server) -> None:
    from embedpipe.migration import Migration, retire

    report = _adapt(hosted)
    m = Migration(hosted, "kb", "static")
    m.prepare()
    m.backfill(m.todo())
    m.catch_up()
    m.cutover(m.validate())
    folder = hosted.data_dir / "adapters" / "kb" / "kb__hosted__v1"
    assert (folder / report["adapter"]).is_dir()
    retire(hosted, "kb", keep=0)
    assert not folder.exists()


def test_adapting_into_the_live_space_is_refused_and_writes_nothing(hosted) -> None:
    from embedpipe.adapters import adapt

    with pytest.raises(InputError, match="already lives in"):
        adapt(hosted, "kb", "hosted")
    assert not (hosted.data_dir / "adapters").exists()


def test_without_stored_vectors_an_adapter_cannot_be_fitted(hosted) -> None:
    import shutil

    shutil.rmtree(hosted.data_dir / "vectors")
    with pytest.raises(StoreError, match="needs a full re-index"):
        _adapt(hosted)


# --- the command line ------------------------------------------------------------------------


def test_cli_adapt_search_status_and_migrate(hosted, openai_server, capsys, monkeypatch, tmp_path) -> None:
    config = str(tmp_path / "embedpipe.toml")
    code, out, err = cli(capsys, monkeypatch, "-c", config, "adapt", "--index", "kb", "--to", "static",
                         "--kind", "procrustes", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "procrustes" and report["state"] == "accepted"
    code, out, err = cli(capsys, monkeypatch, "-c", config, "status", "--index", "kb", "--json")
    assert json.loads(out)[0]["adapter"]["id"] == report["adapter"]
    openai_server.configure(**RETIRE)
    code, out, err = cli(capsys, monkeypatch, "-c", config, "search", "boundary layer", "--index", "kb")
    assert code == 0 and f"served through adapter {report['adapter']}" in err and " 1. " in out
    code, out, err = cli(capsys, monkeypatch, "-c", config, "adapt", "--index", "kb", "--to", "static",
                         "--kind", "mlp")
    assert code == 2 and err.count("\n") == 1 and "procrustes, ridge, lowrank" in err


def test_migrate_fits_an_adapter_first_when_the_live_model_is_gone(
    hosted, openai_server, capsys, monkeypatch, tmp_path, prefect_api
) -> None:
    config = str(tmp_path / "embedpipe.toml")
    openai_server.configure(**RETIRE)
    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--index", "kb",
                         "--yes", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["status"] == "live" and len(report["adapters_retired"]) == 1
    old = next(v for v in IndexVersions.open(hosted).versions("kb") if v.profile == "hosted")
    assert [a.state for a in adapters_of(hosted, old)] == ["retired"]


@pytest.mark.slow
def test_migrate_no_adapter_skips_the_offer(hosted, openai_server, capsys, monkeypatch, tmp_path,
                                            prefect_api) -> None:
    config = str(tmp_path / "embedpipe.toml")
    openai_server.configure(**RETIRE)
    code, out, err = cli(capsys, monkeypatch, "-c", config, "migrate", "--to", "static", "--index", "kb",
                         "--yes", "--no-adapter", "--json")
    assert code == 0, err
    assert json.loads(out)["adapters_retired"] == []
    assert not (hosted.data_dir / "adapters").exists()


def test_a_chunked_index_is_refused_in_one_line(make_settings, static_model_dir: Path, tmp_path: Path) -> None:
    from embedpipe.adapters import adapt

    settings = make_settings(static_profile_toml(static_model_dir)
                             + '[indexes.ch]\nprofile = "static"\nchunk_tokens = 64\n')
    ingest(settings, "ch", write_jsonl(tmp_path / "d.jsonl", _cranfield(40)))
    with pytest.raises(InputError, match="chunked.*embedpipe migrate"):
        adapt(settings, "ch", "local-minilm")
    assert not (settings.data_dir / "adapters").exists()
