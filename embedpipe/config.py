"""Settings: one TOML file (``embedpipe.toml``) plus ``EMBEDPIPE_*`` environment overrides.

Where the file is found, in order: the explicit argument (``--config``), the
``EMBEDPIPE_CONFIG`` variable, ``./embedpipe.toml``. Without a file the defaults
apply and the data directory is ``./.embedpipe``.

Environment overrides (they win over the file):
    EMBEDPIPE_DATA_DIR, EMBEDPIPE_DEFAULT_PROFILE, EMBEDPIPE_DEVICE,
    EMBEDPIPE_QDRANT_URL, EMBEDPIPE_QDRANT_API_KEY, EMBEDPIPE_SOVEREIGN, EMBEDPIPE_RAY_ADDRESS
Secrets are never read from the file: the Qdrant key comes from the environment
(``EMBEDPIPE_QDRANT_API_KEY`` or the variable named by ``qdrant.api_key_env``), and
``embedpipe serve``'s API keys from the variable named by ``server.keys_env``
(``EMBEDPIPE_SERVER_KEYS``) or, as SHA-256 hashes only, from ``server.key_file``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from embedpipe.errors import ConfigError
from embedpipe.profiles import Profile, get_profile, load_catalogue, merge_profiles

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ChatBackendSettings", "ChatSettings", "ExecutionSettings", "IndexSettings",
           "MigrationSettings", "QdrantSettings", "RaySettings", "ServerSettings", "Settings",
           "find_config", "load_settings"]

CONFIG_NAME = "embedpipe.toml"
Device = Literal["auto", "cpu", "cuda", "mps"]


class QdrantSettings(BaseModel):
    """Where the vectors live: Qdrant Edge under the data directory, or a Qdrant server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    # Where releases before the engine layer kept qdrant-client local mode (converted to
    # Qdrant Edge on first use); defaults to <data_dir>/qdrant.
    path: Path | None = None
    api_key_env: str = "QDRANT_API_KEY"
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    # Send the key over plain http to a host other than this machine (a trusted network).
    allow_insecure_key: bool = False
    timeout_s: float = Field(default=10.0, gt=0)
    shard_number: int | None = Field(default=None, gt=0)
    replication_factor: int | None = Field(default=None, gt=0)
    write_consistency_factor: int | None = Field(default=None, gt=0)
    # How many candidates an HNSW search keeps (higher: better recall, slower); None:
    # the engine's default (ef_construct). Exact search below the index threshold.
    # The defaults here and below were chosen from bench/scale.py (README "Scale"): at
    # 100,000 topic-clustered documents, m 32 / ef_construct 256 / ef 256 with int8 find
    # 0.937 of the exact top 10 in 0.73 ms where Qdrant's 16 / 100 / 100 find 0.774 in 0.70.
    hnsw_ef: int | None = Field(default=256, gt=0)
    # The HNSW graph built at the end of a bulk write (Qdrant Edge; a server uses its
    # collection's config): edges per node and candidates while building.
    hnsw_m: int = Field(default=32, gt=0)
    hnsw_ef_construct: int = Field(default=256, gt=0)
    # Qdrant Edge keeps an int8 copy of each vector (a quarter of the float32 bytes, in
    # RAM) that the HNSW build and the graph walk compare, then rescores the best
    # candidates with the stored float32 vectors, so scores stay exact. Measured at
    # 100,000 documents: the build twice as fast, a search at the same hnsw_ef about
    # twice as fast, the same recall (bench/scale.py). "none": float32 throughout.
    # Set when a version's shard is created; existing shards keep theirs.
    quantization: Literal["int8", "none"] = "int8"


class IndexSettings(BaseModel):
    """Per-index options under ``[indexes.NAME]``: its model, its source, how its
    documents are chunked and when ``embedpipe sync`` runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str | None = None
    store_text: bool | None = None
    # Where `embedpipe sync` reads documents: a folder tree (.txt, .md, .html, .pdf and
    # record files), or one .jsonl, .csv or .parquet file. Relative to the config file.
    source: Path | None = None
    glob: str | None = None  # which files of a folder source, e.g. "**/*.md"
    id_field: str = "id"  # record files: the id column/key
    text_field: str = "text"  # record files: the text column/key
    metadata_fields: list[str] | None = None  # record files: kept as metadata (None: all others)
    # Split documents into chunks of this many tokens of the index's model (None: one
    # point per document, cut at the model's limit).
    chunk_tokens: int | None = Field(default=None, ge=8)
    chunk_overlap: int = Field(default=32, ge=0)
    schedule: str | None = None  # cron, for `embedpipe schedule`
    # A sync that would delete more than this fraction of the index stops and asks for
    # --allow-mass-delete (a source that came back empty is likely a failed mount).
    max_delete_fraction: float = Field(default=0.5, ge=0, le=1)
    # A folder source reads only what resolves under its own (resolved) root: symbolic
    # links leading outside it are skipped and reported, unless this is true.
    follow_symlinks: bool = False
    # An invalid record (empty text, a malformed line, non-finite metadata): "fail"
    # refuses its whole file; "skip" reports it (file, line, reason) and reads the rest.
    on_invalid: Literal["fail", "skip"] = "fail"
    # Payload indexes on metadata fields that filters name, so a filtered search does
    # not scan every point: {lang = "keyword", year = "integer"}.
    payload_indexes: dict[str, Literal["keyword", "integer", "float", "bool"]] = {}
    # How queries reach the live version's space: "model" embeds them with the live
    # model (through an accepted adapter only when that model cannot embed any more);
    # "adapter" always goes through the live version's accepted adapter (`embedpipe adapt`).
    query_via: Literal["model", "adapter"] = "model"


class MigrationSettings(BaseModel):
    """How ``embedpipe migrate`` validates a new version before the alias moves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The gate fails when a retrieval metric of the new version is below the old one's
    # by more than this (absolute, metrics are in [0, 1]).
    tolerance: float = Field(default=0.05, ge=0, le=1)
    # When the old model can no longer embed queries, the new version is judged on its
    # own: its self-retrieval must reach this.
    min_self_retrieval: float = Field(default=0.5, ge=0, le=1)
    sample_size: int = Field(default=100, gt=0)  # self-retrieval queries
    vector_sample: int = Field(default=32, gt=0)  # stored vectors re-embedded and compared
    min_cosine: float = Field(default=0.999, gt=0, le=1)
    probe_size: int = Field(default=32, gt=0)  # texts embedded to estimate throughput
    slice_size: int = Field(default=50_000, gt=0)  # documents per backfill task


class RaySettings(BaseModel):
    """``[execution.ray]``: the Ray cluster that embeds when ``engine = "ray"`` (or
    ``--executor ray``). ``address`` (or ``EMBEDPIPE_RAY_ADDRESS``): ``"auto"`` joins the
    cluster this machine belongs to, ``"ray://host:10001"`` or ``"host:6379"`` a given one;
    unset, a local Ray is started for the run and stopped after it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str | None = None
    workers: int = Field(default=1, gt=0)  # actors, each holding one copy of the model
    gpus_per_worker: float = Field(default=0.0, ge=0)  # 1 on a GPU cluster: one model per GPU
    cpus_per_worker: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=1024, gt=0)  # texts per partition (one commit each)


class ExecutionSettings(BaseModel):
    """``[execution]``: where a migration's backfill (and a first ingest) is embedded:
    ``"local"`` in this process, ``"ray"`` on a Ray cluster (``pip install 'embedpipe[ray]'``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Literal["local", "ray"] = "local"
    ray: RaySettings = RaySettings()


class AdapterSettings(BaseModel):
    """``[adapter]``: how ``embedpipe adapt`` fits and judges a query adapter.

    The defaults come from bench/adapters.py on Cranfield (README "Deprecation day").
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sample: int = Field(default=2000, ge=16)  # pairs the map is fitted on (the rest held out)
    holdout: int = Field(default=500, ge=8)  # held-out pairs the pair cosine is measured on
    # "auto" fits every kind and keeps the one that retrieves best: on Cranfield the best
    # kind depends on the direction (procrustes into the weaker space, ridge into the
    # stronger one).
    kind: Literal["auto", "procrustes", "ridge", "lowrank"] = "auto"
    # Refused below this fraction of the old model's own retrieval (nDCG@10 and
    # recall@100 with --golden, else self-retrieval@10).
    min_retention: float = Field(default=0.90, gt=0, le=1.5)
    # When the old model cannot embed queries any more, the adapter is judged on its own:
    # its self-retrieval@10 must reach this.
    min_self_retrieval: float = Field(default=0.5, ge=0, le=1)
    sample_queries: int = Field(default=100, gt=0)  # self-retrieval queries (held-out documents)


class ChatBackendSettings(BaseModel):
    """One chat endpoint speaking the OpenAI protocol (``[chat.backends.NAME]``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    base_url: str | None = None  # None: OpenAI itself
    # Whether prompts leave your network: hosted backends are refused in sovereign mode
    # and for sensitive requests. Say false only for a server of your own.
    hosted: bool = True
    # The variable holding the key; unset: $OPENAI_API_KEY for OpenAI itself (no
    # base_url), no key for any other server; "" for none.
    api_key_env: str | None = None
    # Send the key over plain http to a host other than this machine (a trusted network).
    allow_insecure_key: bool = False
    timeout_s: float = Field(default=30.0, gt=0)  # the whole request (a stream: to its end)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    first_token_timeout_s: float | None = Field(default=None, gt=0)  # streams; default timeout_s
    retries: int = Field(default=0, ge=0, le=10)  # on this backend before the next one
    price_input_per_million: float | None = Field(default=None, ge=0)
    price_output_per_million: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _own_server_needs_a_url(self) -> ChatBackendSettings:
        if self.base_url is None and not self.hosted:
            raise ValueError("hosted = false needs base_url (your own server)")
        return self


class ChatSettings(BaseModel):
    """``[chat]``: which backends answer chat requests, in which order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    route: list[str] = []
    backends: dict[str, ChatBackendSettings] = {}
    breaker_failures: int = Field(default=3, ge=1)  # consecutive failures that open the breaker
    breaker_cooldown_s: float = Field(default=30.0, gt=0)  # then one probe is let through
    stats_window: int = Field(default=500, ge=1)  # requests per backend in the rolling stats

    @model_validator(mode="after")
    def _route_names_backends(self) -> ChatSettings:
        unknown = [name for name in self.route if name not in self.backends]
        if unknown:
            raise ValueError(f"route names {', '.join(unknown)}, not under [chat.backends] "
                             f"(known: {', '.join(self.backends) or 'none'})")
        if len(set(self.route)) != len(self.route):
            raise ValueError("route lists a backend twice")
        return self


class WatchSettings(BaseModel):
    """``[watch]``: the deprecation watch (``embedpipe watch``, the ``deprecation-watch`` flow)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A deprecated model whose shutdown is this many days away or fewer needs doing (exit 6).
    warn_days: int = Field(default=90, ge=0, le=3650)
    # Cron (five fields, UTC) on which `embedpipe schedule` serves the watch; unset: not served.
    schedule: str | None = None


KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # an API key's name (never the key)
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ServerSettings(BaseModel):
    """``[server]``: where ``embedpipe serve`` listens, what one request may ask, and
    who may ask it.

    A request over a limit is refused with 413 before any work: a body over
    ``max_body_bytes``, more than ``max_batch`` documents or embedding inputs, a ``k``
    over ``max_k``. Writes (documents, deletes) take turns: one waits up to
    ``write_wait_s`` for the one before it, then gets 409. On SIGTERM the requests in
    flight are finished, for up to ``shutdown_wait_s``.

    API keys (``embedpipe.serve.keys``): once any key is configured, in the key file or
    in the environment, every request but ``/healthz``, ``/docs`` and ``/openapi.json``
    needs one, on any address; an address other than loopback is refused without keys.
    The config file never holds a key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"  # anything but loopback needs API keys
    port: int = Field(default=8765, ge=0, le=65535)  # 0: any free port (server.json says which)
    max_body_bytes: int = Field(default=32 * 2**20, gt=0)
    max_batch: int = Field(default=2048, gt=0)  # OpenAI's own limit of inputs per embeddings call
    max_k: int = Field(default=1000, gt=0)
    write_wait_s: float = Field(default=30.0, ge=0)
    # SIGTERM or Ctrl-C: how long the requests in flight (a documents batch) are waited for
    # before the server leaves without them; a batch cut short is then settled, whole or
    # absent, when the server starts again. Keep it under your service manager's own kill
    # timeout (systemd: 90 s; Kubernetes: terminationGracePeriodSeconds, 30 s).
    shutdown_wait_s: float = Field(default=25.0, gt=0)
    # SHA-256 hashes of API keys with their scopes (`embedpipe keys add` appends to it);
    # relative to the config file. None: <data_dir>/keys.toml, if it exists.
    key_file: Path | None = None
    # The environment variable holding keys themselves: "NAME:SCOPES:INDEXES:KEY", entries
    # separated by ";" or newlines (README "Access: API keys").
    keys_env: str = Field(default="EMBEDPIPE_SERVER_KEYS", pattern=ENV_NAME_PATTERN)
    env_keys: SecretStr | None = Field(default=None, exclude=True, repr=False)  # its value
    # Requests per minute per key, a token bucket holding one minute's worth (so a burst
    # of this many, then one every 60/N s); 0: no limit. `rate_limits` overrides it for
    # keys by name (0: no limit for that key).
    rate_limit_per_minute: int = Field(default=0, ge=0)
    rate_limits: dict[str, Annotated[int, Field(ge=0)]] = {}
    # Clients: the server the CLI and Index.open go through (any machine); unset, they go
    # through the server <data>/server.json names, if one runs. $EMBEDPIPE_SERVER_URL
    # overrides it. The client's key is read from the variable client_key_env names.
    url: Optional[str] = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    client_key_env: str = Field(default="EMBEDPIPE_API_KEY", pattern=ENV_NAME_PATTERN)

    @model_validator(mode="after")
    def _rate_limits_name_keys(self) -> ServerSettings:
        bad = [name for name in self.rate_limits if not re.match(KEY_NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"rate_limits: {bad[0]!r} is not a key name (letters, digits, '_', '.', '-')")
        return self

    def rate_limit_of(self, key_name: str) -> int:
        """Requests per minute for the key of that name (0: no limit)."""
        return self.rate_limits.get(key_name, self.rate_limit_per_minute)


class Settings(BaseModel):
    """Everything embedpipe needs to know, resolved to absolute paths."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    config_path: Path | None = None
    data_dir: Path
    default_profile: str = "local-minilm"
    device: Device = "auto"
    store_text: bool = True
    # No text leaves the network: hosted profiles (embeddings and chat) are refused.
    sovereign: bool = False
    window: int = Field(default=2048, gt=0, le=1_000_000)
    qdrant: QdrantSettings = QdrantSettings()
    migration: MigrationSettings = MigrationSettings()
    execution: ExecutionSettings = ExecutionSettings()
    adapter: AdapterSettings = AdapterSettings()
    chat: ChatSettings = ChatSettings()
    server: ServerSettings = ServerSettings()
    watch: WatchSettings = WatchSettings()
    profiles: dict[str, Profile]
    indexes: dict[str, IndexSettings] = {}

    @property
    def qdrant_path(self) -> Path:
        return self.qdrant.path or self.data_dir / "qdrant"

    @property
    def key_file(self) -> Path:
        """Where ``embedpipe serve`` reads API key hashes (``[server] key_file``, else
        ``<data_dir>/keys.toml``)."""
        return self.server.key_file or self.data_dir / "keys.toml"

    def profile(self, name: str | None = None) -> Profile:
        """A profile by name (the default profile when None); unknown names list the known."""
        return get_profile(self.profiles, name or self.default_profile)

    def index_profile(self, index: str) -> str:
        """The profile configured for an index, else the default one."""
        configured = self.indexes.get(index)
        return (configured.profile if configured else None) or self.default_profile

    def index_settings(self, index: str) -> IndexSettings:
        """``[indexes.NAME]``, or the defaults for an index the config does not name."""
        return self.indexes.get(index) or IndexSettings()

    def index_chunking(self, index: str) -> dict[str, int] | None:
        """The chunking new versions of an index get (``ChunkSpec.to_dict()``), or None."""
        cfg = self.index_settings(index)
        if cfg.chunk_tokens is None:
            return None
        from embedpipe.chunking import ChunkSpec

        return ChunkSpec(cfg.chunk_tokens, cfg.chunk_overlap).to_dict()

    def index_store_text(self, index: str) -> bool:
        configured = self.indexes.get(index)
        if configured is not None and configured.store_text is not None:
            return configured.store_text
        return self.store_text


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use, or None when there is none (defaults apply)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; create it or drop --config")
        return path.resolve()
    env = os.environ.get("EMBEDPIPE_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"EMBEDPIPE_CONFIG points at {path}, which does not exist")
        return path.resolve()
    local = Path.cwd() / CONFIG_NAME
    return local.resolve() if local.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    simple = {
        "EMBEDPIPE_DATA_DIR": "data_dir",
        "EMBEDPIPE_DEFAULT_PROFILE": "default_profile",
        "EMBEDPIPE_DEVICE": "device",
        "EMBEDPIPE_SOVEREIGN": "sovereign",
    }
    for var, key in simple.items():
        if env.get(var):
            raw[key] = env[var]
    if env.get("EMBEDPIPE_RAY_ADDRESS"):
        execution = raw.setdefault("execution", {})
        if isinstance(execution, dict) and isinstance(execution.setdefault("ray", {}), dict):
            execution["ray"]["address"] = env["EMBEDPIPE_RAY_ADDRESS"]
    qdrant = raw.setdefault("qdrant", {})
    if env.get("EMBEDPIPE_QDRANT_URL"):
        qdrant["url"] = env["EMBEDPIPE_QDRANT_URL"]
    key_var = qdrant.get("api_key_env", "QDRANT_API_KEY")
    secret = env.get("EMBEDPIPE_QDRANT_API_KEY") or env.get(key_var)
    if secret:
        qdrant["api_key"] = secret
    server = raw.setdefault("server", {})
    keys_var = server.get("keys_env", "EMBEDPIPE_SERVER_KEYS")
    if isinstance(keys_var, str) and env.get(keys_var, "").strip():
        server["env_keys"] = env[keys_var]


_TABLES = ("qdrant", "migration", "chat", "server", "watch", "execution")
_TABLES_OF_TABLES = ("profiles", "indexes")


def _check_shape(raw: Mapping[str, Any], path: Path | None) -> None:
    """Tables where tables belong, before anything indexes into them."""
    where = path or "settings"
    for key in _TABLES:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{where}: {key} must be a table ([{key}])")
    for key in _TABLES_OF_TABLES:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table of tables ([{key}.NAME])")
        for name, table in value.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: {key}.{name} must be a table ([{key}.{name}])")
    for key in ("data_dir",):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{where}: {key} must be a string (a folder path)")
    if "path" in raw.get("qdrant", {}) and not isinstance(raw["qdrant"]["path"], str):
        raise ConfigError(f"{where}: qdrant.path must be a string (a folder path)")
    key_file = raw.get("server", {}).get("key_file")
    if key_file is not None and not (isinstance(key_file, str) and key_file.strip()):
        raise ConfigError(f"{where}: server.key_file must be a file path (a non-empty string)")
    if "rate_limits" in raw.get("server", {}) and not isinstance(raw["server"]["rate_limits"], dict):
        raise ConfigError(f"{where}: server.rate_limits must be a table ([server.rate_limits], "
                          "key name = requests per minute)")


def load_settings(
    config: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings from the config file (see :func:`find_config`) and the environment."""
    env = os.environ if env is None else env
    path = find_config(config)
    raw: dict[str, Any] = _read_toml(path) if path else {}
    if "api_key" in raw.get("qdrant", {}):
        raise ConfigError(
            "do not put qdrant.api_key in the config file; set EMBEDPIPE_QDRANT_API_KEY "
            "(or the variable named by qdrant.api_key_env) instead"
        )
    _check_shape(raw, path)
    in_file = sorted({"keys", "api_keys", "api_key", "env_keys"} & set(raw.get("server", {})))
    if in_file:
        raise ConfigError(
            f"do not put server.{in_file[0]} in the config file: API keys go in the key file as "
            "SHA-256 hashes (`embedpipe keys add NAME`) or in $EMBEDPIPE_SERVER_KEYS (or the "
            "variable named by server.keys_env)")
    base_dir = path.parent if path else Path.cwd()
    _apply_env(raw, env)
    profiles = merge_profiles(load_catalogue(), raw.pop("profiles", {}) or {}, base_dir)
    data_dir = base_dir / Path(raw.pop("data_dir", ".embedpipe")).expanduser()
    for table in raw.get("indexes", {}).values():
        if isinstance(table.get("source"), str):
            table["source"] = (base_dir / Path(table["source"]).expanduser()).resolve()
    qdrant = raw.get("qdrant", {})
    if qdrant.get("path"):
        qdrant["path"] = (base_dir / Path(qdrant["path"]).expanduser()).resolve()
    server = raw.get("server", {})
    if server.get("key_file"):
        server["key_file"] = (base_dir / Path(server["key_file"]).expanduser()).resolve()
    try:
        settings = Settings.model_validate(
            {**raw, "config_path": path, "data_dir": data_dir.resolve(), "profiles": profiles}
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path or 'settings'}: {where}: {first['msg']}") from exc
    settings.profile(settings.default_profile)  # fail early on an unknown default
    for name in settings.indexes:
        settings.profile(settings.index_profile(name))
        settings.index_chunking(name)  # chunk_overlap must fit chunk_tokens
    return settings
