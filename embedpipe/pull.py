"""Weights on demand: ``embedpipe models pull PROFILE``.

The one place embedpipe goes online for model weights. A pull downloads a local
profile's files from the Hugging Face Hub (or the mirror in ``HF_ENDPOINT``) with
``huggingface_hub``, pinned to the commit the profile records (``revision``), into a
temporary folder next to its destination. Every file is checked before anything is
kept: against the SHA-256 the catalogue records for it (``[profiles.X.sha256]``), and
against the Hub's own listing (the LFS SHA-256, or the git blob id of a small file).
Only then is the folder renamed into place, in one step, with a marker file written
last inside it, so ``resolve_weights`` never sees a half-downloaded or unverified model.
Any failure deletes the temporary folder and raises one line from the exception tree:
``WeightsNotFound`` (no such repository, revision or file), ``DownloadFailed`` (the
endpoint is unreachable or broke a transfer off: re-run), ``ChecksumMismatch`` (a file
is not the one named: refused).

Where the files land: ``<models_dir>/<org>--<name>/<revision>/`` (``models_dir()``:
``$EMBEDPIPE_MODELS_DIR``, else ``~/.cache/embedpipe/models``), plain files and no links,
so the folder can be copied to an offline machine as it is. ``HF_HUB_OFFLINE=1`` (set by
many offline setups, and by embedpipe's tests) is lifted for the pull's own requests
only, and restored when it ends. ``HF_TOKEN`` is sent when set; it is never logged or
written, and to a mirror only when set explicitly (never the token saved by
``hf auth login``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from embedpipe.errors import (
    ChecksumMismatch,
    ConfigError,
    DataDirReadOnly,
    DiskFull,
    DownloadFailed,
    EmbedpipeError,
    WeightsNotFound,
)
from embedpipe.profiles import (
    _IGNORED_WEIGHT_FILES,
    COMMIT_SHA,
    PULL_MARKER,
    Profile,
    hub_repo,
    models_dir,
    pulled_dir,
    resolve_weights,
)

__all__ = ["DEFAULT_ENDPOINT", "PullReport", "PulledFile", "default_files", "hub_endpoint", "pull"]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# What the sentence-transformers loader reads: configs, tokenizer files, weights.
_LOADER_SUFFIXES = (".json", ".txt", ".model", ".safetensors")
_MODULE_DIR = re.compile(r"\d+_[\w.-]+")  # 1_Pooling, 2_Dense, ...
_TMP_PREFIX = ".pull-"
_ONLINE = threading.Lock()  # one pull at a time lifts HF_HUB_OFFLINE
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class PulledFile:
    """One file of a pulled profile; ``checked`` says what it was verified against:
    ``"catalogue"`` (the profile's SHA-256), ``"hub"`` (the Hub's listing) or ``"size"``."""

    name: str
    bytes: int
    sha256: str
    checked: str


@dataclass(frozen=True)
class PullReport:
    """What a pull did. ``files`` are the profile's files in ``where`` (fetched now, or by
    an earlier pull when ``already_present``); ``downloaded`` the bytes fetched now."""

    profile: str
    repo: str
    revision: str | None
    where: Path
    source: str  # "pulled"; "package" or "path" when those already serve the profile
    already_present: bool
    files: tuple[PulledFile, ...] = ()
    downloaded: int = 0
    seconds: float = 0.0
    endpoint: str | None = None

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["where"] = str(self.where)
        out["files"] = [asdict(f) for f in self.files]
        out["bytes"] = self.bytes
        return out


def hub_endpoint(explicit: str | None = None) -> str:
    """The Hub to pull from: ``explicit``, else ``$HF_ENDPOINT``, else huggingface.co
    (read now, not when huggingface_hub was imported)."""
    value = (explicit or os.environ.get("HF_ENDPOINT", "") or DEFAULT_ENDPOINT).strip()
    return value.rstrip("/")


def _shown(endpoint: str) -> str:
    """The endpoint as it may be printed: no user, password, query or fragment."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_files(names: Iterable[str]) -> list[str]:
    """The files of a repository the sentence-transformers loader needs: top-level and
    ``N_Module/`` configs, tokenizer files and ``*.safetensors`` weights; PyTorch pickles
    only in a folder without safetensors; never ``onnx/``, ``openvino/`` and the like, nor
    files that do not shape the output (README, LICENSE, ...)."""
    listed = sorted(set(names))
    chosen: list[str] = []
    folders = {""}
    for name in listed:
        parts = name.split("/")
        if parts[-1] in _IGNORED_WEIGHT_FILES or parts[-1].startswith("."):
            continue
        if len(parts) == 2 and _MODULE_DIR.fullmatch(parts[0]):
            folders.add(parts[0])
        elif len(parts) != 1:
            continue
        if parts[-1].endswith(_LOADER_SUFFIXES):
            chosen.append(name)
    for folder in sorted(folders):
        prefix = f"{folder}/" if folder else ""
        if any(n.startswith(prefix) and "/" not in n[len(prefix):] and n.endswith(".safetensors")
               for n in chosen):
            continue
        chosen += [n for n in listed if n.startswith(prefix) and "/" not in n[len(prefix):]
                   and re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n[len(prefix):])]
    return sorted(chosen)


def pull(
    profile: Profile,
    *,
    endpoint: str | None = None,
    root: Path | None = None,
    progress: bool = False,
) -> PullReport:
    """Download ``profile``'s weights at its pinned revision and put them where
    ``resolve_weights`` finds them (source ``"pulled"``); a no-op when they are there.

    ``endpoint`` overrides ``$HF_ENDPOINT``; ``root`` overrides ``models_dir()``;
    ``progress`` shows huggingface_hub's progress bars (on a terminal).
    """
    started = time.monotonic()
    if not profile.is_local:
        raise ConfigError(
            f"profile {profile.name!r} is hosted ({profile.model} on "
            f"{profile.base_url or 'api.openai.com'}): it has no weights to pull")
    repo = hub_repo(profile)
    served = _served_without_pull(profile)
    if served is not None:
        return PullReport(profile.name, repo, profile.revision, served[1], served[0], True,
                          seconds=time.monotonic() - started)
    if not profile.revision or not COMMIT_SHA.fullmatch(profile.revision):
        raise ConfigError(
            f"profile {profile.name!r} pins no commit to pull (revision = {profile.revision!r}): set "
            f"revision = \"<40-hex commit of {repo}>\" under [profiles.{profile.name}] (a branch or "
            "tag moves; the model page's history lists the commits)")
    dest = pulled_dir(profile, root)
    if dest is None:
        raise ConfigError(f"profile {profile.name!r}: {repo!r} is not a Hugging Face repository id "
                          "(org/name); fix model (or repo)")
    if (dest / PULL_MARKER).is_file():
        return _present(profile, repo, dest, started)
    base = hub_endpoint(endpoint)
    with _disk_errors(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned(dest.parent)
    tmp = dest.parent / f"{_TMP_PREFIX}{profile.revision[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _online():
            files = _download(profile, repo, base, tmp, progress)
        with _disk_errors(dest.parent):
            _seal(tmp, profile, repo, base, files)
            try:
                os.rename(tmp, dest)  # one step: the folder is complete, or absent
            except OSError:
                if not (dest / PULL_MARKER).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another pull finished first
                return _present(profile, repo, dest, started)
            _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("pulled %s (%s at %s) into %s in %.1fs", profile.name, repo, profile.revision, dest, seconds)
    return PullReport(profile.name, repo, profile.revision, dest, "pulled", False, tuple(files),
                      downloaded=sum(f.bytes for f in files), seconds=seconds, endpoint=_shown(base))


def _served_without_pull(profile: Profile) -> tuple[str, Path] | None:
    """A ``path`` or ``package`` that already serves the profile: nothing to pull."""
    if profile.path is None and not profile.package:
        return None
    try:
        found = resolve_weights(profile)
    except WeightsNotFound:
        return None
    return (found.source, found.path) if found.source in ("path", "package") else None


def _present(profile: Profile, repo: str, dest: Path, started: float) -> PullReport:
    try:
        marker = json.loads((dest / PULL_MARKER).read_text(encoding="utf-8"))
        files = tuple(PulledFile(name, int(f["bytes"]), str(f["sha256"]), str(f["checked"]))
                      for name, f in marker["files"].items())
        endpoint = marker.get("endpoint")
    except (OSError, ValueError, KeyError, TypeError):
        files, endpoint = (), None  # an older or hand-made marker: the folder still resolves
    return PullReport(profile.name, repo, profile.revision, dest, "pulled", True, files,
                      seconds=time.monotonic() - started, endpoint=endpoint)


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """Let huggingface_hub make requests even under ``HF_HUB_OFFLINE=1``, for this block.

    huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``
    and checks that constant before every request; the environment is left alone, and
    the constant is put back when the block ends, so everything else stays offline.
    Telemetry is off meanwhile: with it on, building the user agent fetches an "agent
    harnesses" list from the endpoint huggingface_hub was imported with (huggingface.co
    for a mirror named later) and caches it under HF_HOME. A pull talks to its endpoint only.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as _hub_logging  # sets its level when first imported

    # Its "trying to resume" warnings would bury the one-line error (verbose keeps them).
    hub_log = _hub_logging.get_logger("huggingface_hub")
    with _ONLINE:
        before = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY, hub_log.level
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = False, True
        if not log.isEnabledFor(logging.INFO):
            hub_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY, level = before
            hub_log.setLevel(level)


def _token(endpoint: str) -> str | bool | None:
    """``$HF_TOKEN`` when set; else huggingface_hub's own rule on huggingface.co (the
    saved login), and no token at all for a mirror."""
    explicit = os.environ.get("HF_TOKEN", "").strip()
    if explicit:
        return explicit
    return None if endpoint == DEFAULT_ENDPOINT else False


def _download(profile: Profile, repo: str, base: str, tmp: Path, progress: bool) -> list[PulledFile]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils.tqdm import silent_tqdm

    token = _token(base)
    revision = str(profile.revision)
    with _converted(profile, repo, base, None, tmp):
        info = HfApi(endpoint=base, token=token).model_info(
            repo, revision=revision, files_metadata=True, timeout=60)
    if info.sha and info.sha != revision:
        raise DownloadFailed(
            f"{_shown(base)} answered commit {info.sha} for revision {revision} of {repo}: not a "
            "Hub-compatible endpoint, or a broken mirror; nothing was kept (check HF_ENDPOINT)")
    listing = {s.rfilename: s for s in (info.siblings or [])}
    wanted = _wanted(profile, repo, base, listing)
    with _disk_errors(tmp.parent):
        tmp.mkdir()
    files: list[PulledFile] = []
    for name in wanted:
        with _converted(profile, repo, base, name, tmp):
            local = hf_hub_download(repo, name, revision=revision, endpoint=base, token=token,
                                    local_dir=tmp, tqdm_class=None if progress else silent_tqdm)
        files.append(_check(profile, repo, base, name, Path(local), listing.get(name)))
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    return files


def _wanted(profile: Profile, repo: str, base: str, listing: dict[str, Any]) -> list[str]:
    """The files to fetch: ``files`` or the loader's defaults, and every file the
    catalogue records a hash for; each one must be in the repository."""
    wanted = list(profile.files) if profile.files is not None else default_files(listing)
    wanted += [name for name in profile.sha256 if name not in wanted]
    at = f"{repo} at revision {str(profile.revision)[:12]} on {_shown(base)}"
    for name in wanted:
        if name not in listing:
            raise WeightsNotFound(f"{name!r} is not in {at}; fix files (or sha256) under "
                                  f"[profiles.{profile.name}]")
    if not any(n in ("modules.json", "config.json") for n in wanted):
        raise WeightsNotFound(f"{at} has no modules.json or config.json to fetch: not a "
                              "sentence-transformers model, or files leaves them out")
    return wanted


def _check(profile: Profile, repo: str, base: str, name: str, path: Path, listed: Any) -> PulledFile:
    """Refuse a file that is not the one named: the catalogue's SHA-256 first (the trust
    anchor), then the Hub's listing (size, LFS SHA-256 or git blob id)."""
    size = path.stat().st_size
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha256.update(block)
            blob.update(block)
    got = sha256.hexdigest()

    def refuse(expected: str, actual: str, whose: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"{name} of {repo} at revision {str(profile.revision)[:12]} from {_shown(base)}: expected "
            f"{expected} ({whose}), got {actual}; refused, nothing was kept (a tampered mirror or a "
            f"corrupted transfer; or a hash of another revision under [profiles.{profile.name}.sha256])")

    checked = "size"
    expected = profile.sha256.get(name)
    if expected is not None:
        if got != expected:
            raise refuse(f"SHA-256 {expected}", got, "the catalogue")
        checked = "catalogue"
    if listed is not None:
        if listed.size is not None and listed.size != size:
            raise refuse(f"{listed.size} bytes", f"{size} bytes", "the Hub's listing")
        lfs = getattr(listed.lfs, "sha256", None) if listed.lfs else None
        if lfs and got != lfs:
            raise refuse(f"SHA-256 {lfs}", got, "the Hub's listing")
        if not lfs and listed.blob_id and blob.hexdigest() != listed.blob_id:
            raise refuse(f"git blob {listed.blob_id}", blob.hexdigest(), "the Hub's listing")
        if checked == "size" and (lfs or listed.blob_id):
            checked = "hub"
    return PulledFile(name, size, got, checked)


def _seal(tmp: Path, profile: Profile, repo: str, base: str, files: list[PulledFile]) -> None:
    """Flush every file and write the marker last: the folder is then complete."""
    for f in files:
        with (tmp / f.name).open("rb+") as fh:
            os.fsync(fh.fileno())
    marker = {
        "repo": repo,
        "revision": profile.revision,
        "endpoint": _shown(base),
        "pulled_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {f.name: {"bytes": f.bytes, "sha256": f.sha256, "checked": f.checked} for f in files},
    }
    with (tmp / PULL_MARKER).open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(marker, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sweep_abandoned(folder: Path) -> None:
    """Delete temporary folders of pulls whose process is gone (killed mid-download)."""
    for tmp in folder.glob(f"{_TMP_PREFIX}*"):
        try:
            pid = int(tmp.name.split("-")[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


@contextlib.contextmanager
def _disk_errors(folder: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        converted = _disk_error(exc, folder)
        if converted is None:
            raise
        raise converted from exc


def _disk_error(exc: BaseException, folder: Path) -> EmbedpipeError | None:
    code = getattr(exc, "errno", None)
    fix = "or set EMBEDPIPE_MODELS_DIR to another folder, and re-run `embedpipe models pull`"
    if code in _DISK_FULL:
        return DiskFull(f"{folder}: no space left for the weights; free some space {fix}")
    if code in _READ_ONLY:
        return DataDirReadOnly(f"{folder} cannot be written ({os.strerror(code)}); let this user "
                               f"write it {fix}")
    return None


@contextlib.contextmanager
def _converted(profile: Profile, repo: str, base: str, name: str | None, tmp: Path) -> Iterator[None]:
    """huggingface_hub's and httpx's errors, as one line of the exception tree."""
    try:
        yield
    except EmbedpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - converted at the boundary, cause kept
        raise _convert(exc, profile, repo, base, name, tmp) from exc


def _convert(exc: BaseException, profile: Profile, repo: str, base: str, name: str | None,
             tmp: Path) -> EmbedpipeError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown, rev, again = _shown(base), str(profile.revision), f"`embedpipe models pull {profile.name}`"
    cause = exc
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        cause = exc.__cause__  # the Hub's answer (or silence) behind "not in the local cache"
    if isinstance(cause, GatedRepoError):
        return WeightsNotFound(f"{repo} on {shown} is gated: accept its terms on the model page, "
                               f"set HF_TOKEN to a token of that account and re-run {again}")
    if isinstance(cause, RepositoryNotFoundError):
        return WeightsNotFound(f"repository {repo!r} not found on {shown} (a private one needs "
                               f"HF_TOKEN); check model (or repo) under [profiles.{profile.name}] and HF_ENDPOINT")
    if isinstance(cause, RevisionNotFoundError):
        return WeightsNotFound(f"revision {rev} not found in {repo} on {shown}; check revision under "
                               f"[profiles.{profile.name}] (a mirror may not hold that commit yet)")
    if isinstance(cause, EntryNotFoundError) and not isinstance(cause, LocalEntryNotFoundError):
        return WeightsNotFound(f"{name!r} is not in {repo} at revision {rev[:12]} on {shown}; fix "
                               f"files (or sha256) under [profiles.{profile.name}]")
    disk = _disk_error(cause, tmp.parent)
    if disk is not None:
        return disk
    what = f"{name} of {repo}" if name else repo
    return DownloadFailed(f"cannot download {what} at revision {rev[:12]} from {shown}: "
                          f"{_reason(cause, HfHubHTTPError)}; nothing was kept. Check the network (or "
                          f"set HF_ENDPOINT to a reachable mirror) and re-run {again}")


def _reason(exc: BaseException, http_error: type[BaseException]) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the connection closed mid-transfer"
    if isinstance(exc, http_error):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None:
            return f"HTTP {status}"
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return "the transfer was cut short"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
