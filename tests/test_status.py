"""`status` and `models` warn when a live index uses a deprecated or retired model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from embedpipe.ingest import ingest
from embedpipe.engine import close_all
from embedpipe.status import index_status, profile_status

from conftest import write_config, write_jsonl

DOCS = [{"id": "a", "text": "lift and drag in a wind tunnel"}, {"id": "b", "text": "boundary layers"}]
RETIRED = '[profiles.local-minilm.deprecation]\nshutdown = "2020-01-01"\nreplacement = "local-bge"\n'
ANNOUNCED = '[profiles.local-minilm.deprecation]\nannounced = "2026-01-01"\nshutdown = "2999-01-01"\n'


def test_a_live_index_on_a_retired_model_is_warned_about(make_settings, tmp_path: Path) -> None:
    ingest(make_settings(), "kb", write_jsonl(tmp_path / "d.jsonl", DOCS))
    settings = make_settings(RETIRED)
    [entry] = index_status(settings)
    assert entry["warnings"] == [
        "index 'kb' is live on profile 'local-minilm', whose model was retired (shutdown "
        "2020-01-01); run `embedpipe migrate --to local-bge --index kb`"
    ]
    minilm = next(p for p in profile_status(settings) if p["name"] == "local-minilm")
    assert minilm["live_indexes"] == ["kb"] and minilm["deprecation"] == "retired"
    assert minilm["warnings"] == entry["warnings"]
    others = [p for p in profile_status(settings) if p["name"] != "local-minilm"]
    assert not any(p["warnings"] for p in others)


def test_deprecated_without_replacement_points_at_models(make_settings, tmp_path: Path) -> None:
    ingest(make_settings(), "kb", write_jsonl(tmp_path / "d.jsonl", DOCS))
    [entry] = index_status(make_settings(ANNOUNCED))
    assert "is deprecated (shutdown 2999-01-01)" in entry["warnings"][0]
    assert "embedpipe migrate --to PROFILE --index kb (pick one from `embedpipe models`)" in entry["warnings"][0]
    assert index_status(make_settings())[0]["warnings"] == []


def test_the_cli_prints_the_warning_on_stderr(make_settings, tmp_path: Path) -> None:
    ingest(make_settings(), "kb", write_jsonl(tmp_path / "d.jsonl", DOCS))
    close_all()  # the CLI runs in another process and needs the local-mode lock
    write_config(tmp_path, RETIRED)
    for command in ("status", "models"):
        out = subprocess.run([sys.executable, "-m", "embedpipe.cli", command], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "warning: index 'kb' is live on profile 'local-minilm'" in out.stderr
    data = subprocess.run([sys.executable, "-m", "embedpipe.cli", "models", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(data.stdout)  # warnings never break the JSON on stdout


def test_models_reports_keys_by_the_rule_the_clients_follow(make_settings, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    settings = make_settings(
        '[profiles.tei]\nprovider = "openai"\nmodel = "bge"\ndims = 384\n'
        'base_url = "http://127.0.0.1:8080/v1"\n'
        '[profiles.remote]\nprovider = "openai"\nmodel = "bge"\ndims = 384\n'
        'base_url = "http://gpu.internal:8080/v1"\napi_key_env = "OPENAI_API_KEY"\n')
    where = {p["name"]: (p["usable"], p["where"]) for p in profile_status(settings)}
    assert where["tei"] == (True, "http://127.0.0.1:8080/v1, no key")  # never $OPENAI_API_KEY
    assert where["openai-3-small"] == (True, "api.openai.com, key in $OPENAI_API_KEY")
    assert where["remote"][0] is False and "allow_insecure_key" in where["remote"][1]
