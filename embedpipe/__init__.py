"""embedpipe: own your embedding layer.

The public API is small on purpose::

    from embedpipe import Index
    hits = Index.open("docs").search("how do I rotate keys?", k=5)

Heavy libraries (torch, sentence-transformers, prefect) are imported lazily, so
``import embedpipe`` is cheap and has no side effects.
"""

from __future__ import annotations

from embedpipe.errors import (
    AccessDenied,
    AccessError,
    AdapterRefused,
    AuthenticationRequired,
    BatchError,
    ChatRequestRejected,
    ChecksumMismatch,
    ConfigError,
    DataDirError,
    DataDirReadOnly,
    DimensionMismatch,
    DiskFull,
    DocumentNotFound,
    DownloadFailed,
    EmbedpipeError,
    EngineError,
    ExecutionError,
    FingerprintMismatch,
    GatewayError,
    IndexBusy,
    IndexNotFound,
    InputError,
    JobCancelled,
    JobNotFound,
    KeyFileInvalid,
    KeyRefused,
    MassDeleteRefused,
    MigrationError,
    ModelDeprecated,
    ModelError,
    NoAdapter,
    NoBackendAvailable,
    NothingToMigrate,
    PrefectUnavailable,
    ProviderError,
    QdrantUnavailable,
    RateLimited,
    RequestTooLarge,
    ServerUnavailable,
    ShardUnreadable,
    SourceUnavailable,
    SovereigntyError,
    StoreError,
    StreamInterrupted,
    UnknownProfile,
    ValidationFailed,
    WeightsNotFound,
)
from embedpipe.index import Hit, Index

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AccessError",
    "AdapterRefused",
    "AuthenticationRequired",
    "BatchError",
    "ChatRequestRejected",
    "ChecksumMismatch",
    "ConfigError",
    "DataDirError",
    "DataDirReadOnly",
    "DimensionMismatch",
    "DiskFull",
    "DocumentNotFound",
    "DownloadFailed",
    "EmbedpipeError",
    "EngineError",
    "ExecutionError",
    "FingerprintMismatch",
    "GatewayError",
    "Hit",
    "Index",
    "IndexBusy",
    "IndexNotFound",
    "InputError",
    "JobCancelled",
    "JobNotFound",
    "KeyFileInvalid",
    "KeyRefused",
    "MassDeleteRefused",
    "MigrationError",
    "ModelDeprecated",
    "ModelError",
    "NoAdapter",
    "NoBackendAvailable",
    "NothingToMigrate",
    "PrefectUnavailable",
    "ProviderError",
    "QdrantUnavailable",
    "RateLimited",
    "RequestTooLarge",
    "RemoteIndex",
    "ServerUnavailable",
    "ShardUnreadable",
    "SourceUnavailable",
    "SovereigntyError",
    "StoreError",
    "StreamInterrupted",
    "UnknownProfile",
    "ValidationFailed",
    "WeightsNotFound",
    "__version__",
    "ingest",
    "load_settings",
    "sync",
]


def __getattr__(name: str):  # PEP 562: keep `import embedpipe` light
    if name == "ingest":
        from embedpipe.ingest import ingest

        return ingest
    if name == "sync":
        from embedpipe.sync import sync

        return sync
    if name == "RemoteIndex":
        from embedpipe.serve.client import RemoteIndex

        return RemoteIndex
    if name == "load_settings":
        from embedpipe.config import load_settings

        return load_settings
    raise AttributeError(f"module 'embedpipe' has no attribute {name!r}")
