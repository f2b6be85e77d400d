"""Profiles: the catalogue, user overrides, weight lookup and the fingerprint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from embedpipe.errors import ConfigError, UnknownProfile, WeightsNotFound
from embedpipe.profiles import fingerprint, load_catalogue, merge_profiles, resolve_weights

REQUIRED = {
    "local-minilm": 384,
    "local-bge": 384,
    "local-bge-base": 768,
    "openai-3-small": 1536,
    "openai-3-large": 3072,
    "openai-ada-002": 1536,
}


def test_catalogue_has_the_required_profiles() -> None:
    profiles = merge_profiles(load_catalogue(), {})
    for name, dims in REQUIRED.items():
        assert profiles[name].dims == dims
    bge = profiles["local-bge"]
    assert bge.query_prompt == "Represent this sentence for searching relevant passages: "
    assert bge.document_prompt == ""
    assert profiles["local-minilm"].normalize is True


def test_partial_override_merges_field_by_field(make_settings) -> None:
    settings = make_settings(
        '[profiles.local-bge]\npath = "models/bge"\nbatch_size = 8\n'
        '[profiles.mine]\nprovider = "sentence-transformers"\nmodel = "x/y"\ndims = 12\n'
    )
    bge = settings.profile("local-bge")
    assert bge.batch_size == 8
    assert bge.path == (Path.cwd() / "models" / "bge").resolve()  # relative to the config file
    assert bge.query_prompt.startswith("Represent this sentence")  # kept from the catalogue
    assert settings.profile("mine").dims == 12


def test_unknown_profile_lists_the_known_ones(settings) -> None:
    with pytest.raises(UnknownProfile) as err:
        settings.profile("local-bgee")
    assert "local-bge" in str(err.value) and "local-minilm" in str(err.value)


def test_invalid_profile_field_is_a_config_error(make_settings) -> None:
    with pytest.raises(ConfigError, match="dims"):
        make_settings('[profiles.local-minilm]\ndims = -3\n')


def test_missing_weights_say_where_it_looked(settings) -> None:
    with pytest.raises(WeightsNotFound) as err:
        resolve_weights(settings.profile("local-bge"))
    message = str(err.value)
    assert "BAAI/bge-small-en-v1.5" in message and "Hugging Face cache" in message
    assert "path =" in message  # says how to fix it


def test_fingerprint_ignores_the_name_but_not_the_space(make_settings) -> None:
    base = make_settings().profile("local-minilm")
    renamed = base.model_copy(update={"name": "renamed"})
    prompted = base.model_copy(update={"query_prompt": "query: "})
    unnormalised = base.model_copy(update={"normalize": False})
    assert fingerprint(base) == fingerprint(renamed)
    assert len({fingerprint(base), fingerprint(prompted), fingerprint(unnormalised)}) == 3


def test_fingerprint_changes_with_the_weights(settings, tmp_path: Path) -> None:
    copy = tmp_path / "minilm"
    shutil.copytree(resolve_weights(settings.profile("local-minilm")).path, copy)
    profile = settings.profile("local-minilm").model_copy(update={"path": copy, "package": None})
    before = fingerprint(profile)
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint(profile) != before


def test_weights_hash_is_cached(settings, tmp_path: Path) -> None:
    profile = settings.profile("local-minilm")
    first = fingerprint(profile)
    cache = tmp_path / "cache" / "weights.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    # Poison the cached digest: a cached lookup must return it unchanged (proof it did not re-hash).
    (key,) = entries
    entries[key]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert fingerprint(profile) != first


def _minilm_copy(settings, tmp_path: Path):
    copy = tmp_path / "minilm"
    shutil.copytree(resolve_weights(settings.profile("local-minilm")).path, copy)
    return settings.profile("local-minilm").model_copy(update={"path": copy, "package": None}), copy


def test_new_weights_with_the_old_size_and_mtime_get_a_new_fingerprint(settings, tmp_path: Path) -> None:
    """Bytes changed in place, size kept and mtime restored (as cp -p, rsync -a or a
    reproducible image leave them): the cache must not hand back the old fingerprint."""
    import os

    profile, copy = _minilm_copy(settings, tmp_path)
    before = fingerprint(profile)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    with weights.open("r+b") as fh:
        fh.seek(stat.st_size // 2)
        fh.write(b"\0" * 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert fingerprint(profile) != before


def test_verify_rehashes_past_a_stale_cache(settings, tmp_path: Path) -> None:
    profile = settings.profile("local-minilm")
    first = fingerprint(profile)
    cache = tmp_path / "cache" / "weights.json"
    entries = json.loads(cache.read_text())
    (key,) = entries
    entries[key]["sha256"] = "0" * 64  # a cache that lies
    cache.write_text(json.dumps(entries))
    assert fingerprint(profile) != first
    assert fingerprint(profile, rehash=True) == first
    assert fingerprint(profile) == first  # the re-hash mended the cache


def test_models_verify_names_an_index_whose_weights_changed(tmp_path: Path, capsys, monkeypatch) -> None:
    from conftest import cli, write_config, write_jsonl
    from embedpipe.config import load_settings

    copy = tmp_path / "minilm"
    shutil.copytree(resolve_weights(load_settings().profile("local-minilm")).path, copy)
    config = write_config(tmp_path, f'[profiles.mine]\nprovider = "sentence-transformers"\n'
                                    f'model = "mine"\npath = "{copy}"\ndims = 384\n')
    docs = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "Fjords are glacial valleys."}])
    assert cli(capsys, monkeypatch, "-c", str(config), "ingest", str(docs), "--index", "kb",
               "--profile", "mine")[0] == 0
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models", "--verify", "--json")
    mine = {m["name"]: m for m in json.loads(out)}["mine"]
    assert code == 0 and mine["verified"] is True and mine["mismatched_indexes"] == []

    cache = tmp_path / "cache" / "weights.json"
    old_digest = json.loads(cache.read_text())[str(copy.resolve())]["sha256"]
    tweaked = json.loads((copy / "config.json").read_text())
    tweaked["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(tweaked))
    fingerprint(load_settings(config).profile("mine"))  # the cache learns the new files' stamp
    entries = json.loads(cache.read_text())
    entries[str(copy.resolve())]["sha256"] = old_digest  # and now vouches for them falsely
    cache.write_text(json.dumps(entries))
    assert cli(capsys, monkeypatch, "-c", str(config), "models")[0] == 0  # the cache is believed
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "--verify")
    assert code == 2
    assert "'kb'" in err and "'mine'" in err and "embedpipe migrate" in err


def test_wheel_ships_the_catalogue(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("embedpipe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = zf.read("embedpipe/models.toml").decode()
        gpus = zf.read("embedpipe/gpus.toml").decode()  # `cost report`'s hourly prices
    assert packaged == (repo / "configs" / "models.toml").read_text()
    assert gpus == (repo / "configs" / "gpus.toml").read_text()
