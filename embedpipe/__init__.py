"""embedpipe: own your embedding layer.

The public API is small on purpose::

    from embedpipe import Index
    hits = Index.open("docs").search("how do I rotate keys?", k=5)

Heavy libraries (torch, sentence-transformers, prefect) are imported lazily, so
``import embedpipe`` is cheap and has no side effects.
"""

from __future__ import annotations

from embedpipe.errors import (
    ConfigError,
    DimensionMismatch,
    EmbedpipeError,
    FingerprintMismatch,
    IndexNotFound,
    InputError,
    MassDeleteRefused,
    ModelDeprecated,
    ModelError,
    ProviderError,
    QdrantUnavailable,
    SourceUnavailable,
    SovereigntyError,
    StoreError,
    UnknownProfile,
    WeightsNotFound,
)
from embedpipe.index import Hit, Index

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DimensionMismatch",
    "EmbedpipeError",
    "FingerprintMismatch",
    "Hit",
    "Index",
    "IndexNotFound",
    "InputError",
    "MassDeleteRefused",
    "ModelDeprecated",
    "ModelError",
    "ProviderError",
    "QdrantUnavailable",
    "SourceUnavailable",
    "SovereigntyError",
    "StoreError",
    "UnknownProfile",
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
    if name == "load_settings":
        from embedpipe.config import load_settings

        return load_settings
    raise AttributeError(f"module 'embedpipe' has no attribute {name!r}")
