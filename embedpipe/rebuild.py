"""The engine is a cache of the Parquet files: rebuild a version from them, embedding nothing.

``rebuild`` empties a version in place (its manifest and the alias stay) and writes the
corpus into it again with the vectors the Parquet vector store holds for the version's
fingerprint: for a damaged or deleted Qdrant Edge shard, a new engine release, or a
new server. A document whose vector is not stored is reported as failed with the
reason, never embedded: the model may be gone, and a rebuild must cost nothing.

``convert_local_mode`` does the same for data directories made before the engine layer
(qdrant-client local mode under ``<data>/qdrant``): it reads that folder's
``meta.json`` (manifests and aliases; no point is loaded), recreates each version on
the engine and fills it from the Parquet files. The old folder stays until
``embedpipe retire`` removes it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.backends.base import EmbedBatch
from embedpipe.catchup import ProgressFactory, SyncStats, sync_version
from embedpipe.corpus import CorpusStore
from embedpipe.index import IndexVersions, Version, _manifest
from embedpipe.migration import LazyEmbedder
from embedpipe.vectors import VectorStore

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.profiles import Profile

__all__ = ["RebuildReport", "convert_local_mode", "local_mode_left", "rebuild"]

log = logging.getLogger(__name__)

CONVERTED = "converted-from-local-mode.json"  # under <data>/engine: the conversion is done


class StoredVectorsOnly(LazyEmbedder):
    """An embedder that embeds nothing: the pipeline takes every vector from the vector
    store, and a text it lacks comes back failed with the reason. Chunked versions still
    cut chunks with the model's own tokenizer (loaded locally; no request is sent)."""

    def check(self) -> None:
        """Nothing to check: no model runs."""

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        reason = (f"no vector stored for this text in the space of {self.recorded.collection}, "
                  "and a rebuild embeds nothing: restore the vector store from a backup, or "
                  "migrate the index to embed its corpus again")
        return EmbedBatch(np.zeros((len(texts), self.recorded.dims), dtype=np.float32),
                          failed={i: reason for i in range(len(texts))})

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self._tokenizer().token_spans(text)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokenizer().count_tokens(texts)

    @property
    def max_tokens(self) -> int | None:
        return self._tokenizer().max_tokens

    def _tokenizer(self) -> Any:
        if self._real is None:
            from embedpipe.backends import build_embedder

            self._real = build_embedder(self.profile, self.settings)  # loads; sends nothing
        return self._real


@dataclass
class RebuildReport:
    """What a rebuild did, per version and in all."""

    index: str
    versions: list[str] = field(default_factory=list)
    points: int = 0
    embedded: int = 0
    reused: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild(settings: Settings, index: str, all_versions: bool = False,
            progress: ProgressFactory | None = None) -> RebuildReport:
    """Recreate the live version of ``index`` (every version with ``all_versions``) from
    the Parquet corpus and vector store, under the index's locks."""
    from embedpipe.layout import check_index_name
    from embedpipe.locks import index_lock

    check_index_name(index)
    # No migration may write the version meanwhile, and no ingest.
    with index_lock(settings, index, what="migrate"), index_lock(settings, index):
        versions = IndexVersions.open(settings)
        versions.repair_states(index)
        targets = versions.versions(index) if all_versions else [versions.require_live(index)]
        report = RebuildReport(index)
        started = time.perf_counter()
        for version in targets:
            stats = rebuild_version(settings, versions, version, progress)
            report.versions.append(version.collection)
            report.points += versions.count(version.collection)
            report.embedded += stats.embedded
            report.reused += stats.reused
            report.failures.update(stats.failures)
        report.failed = len(report.failures)
        report.seconds = round(time.perf_counter() - started, 3)
        return report


def rebuild_version(settings: Settings, versions: IndexVersions, version: Version,
                    progress: ProgressFactory | None = None) -> SyncStats:
    """Empty ``version`` and fill it from the Parquet files; builds its search index."""
    profile = _profile(settings, version)
    store = VectorStore(settings.data_dir, version.fingerprint, version.dims, profile.name)
    corpus = CorpusStore.for_index(settings.data_dir, version.index)
    version = versions.reset(version)
    stats = sync_version(versions, corpus, version, StoredVectorsOnly(profile, settings, version),
                         store, settings, progress)
    versions.build_index(version.collection)
    versions.rebuilt(version)
    log.info("rebuilt %s: %d points from stored vectors, %d failed", version.collection,
             stats.reused, len(stats.failures))
    return stats


def _profile(settings: Settings, version: Version) -> Profile:
    """The version's profile: the configured one, or the manifest's record of it when
    the configuration no longer names it (a rebuild needs no model to run)."""
    from embedpipe.errors import UnknownProfile
    from embedpipe.profiles import Profile

    try:
        return settings.profile(version.profile)
    except UnknownProfile:
        return Profile.model_validate({**version.profile_data, "name": version.profile})


# --- data directories made by earlier releases -----------------------------------------


def local_mode_left(settings: Settings) -> dict[str, Any] | None:
    """The meta.json of a qdrant-client local-mode folder of an earlier release, unless
    it was converted already or a Qdrant server is configured."""
    from embedpipe.layout import Layout

    if settings.qdrant.url or (Layout(settings.data_dir).engine / CONVERTED).is_file():
        return None
    meta = settings.qdrant_path / "meta.json"
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def convert_local_mode(settings: Settings, versions: IndexVersions, meta: dict[str, Any]) -> list[str]:
    """Recreate every embedpipe version of an earlier release's local-mode folder on the
    engine, from the Parquet files (0 embeddings); returns the versions converted."""
    from embedpipe._files import write_json
    from embedpipe.layout import Layout

    known = set(versions.engine.manifests())
    converted = []
    for name, config in sorted((meta.get("collections") or {}).items()):
        version = _manifest(name, ((config or {}).get("metadata") or {}).get("embedpipe"))
        if version is None or name in known:
            continue
        raw = config["metadata"]["embedpipe"]
        versions.engine.create(name, version.dims, version.distance, dict(raw, rebuilding=True))
        stats = rebuild_version(settings, versions, version)
        converted.append(name)
        log.warning("converted %s from qdrant-client local mode to %s: %d points from stored "
                    "vectors, 0 embedded, %d failed", name, versions.engine.describe(),
                    stats.reused, len(stats.failures))
    for alias, target in (meta.get("aliases") or {}).items():
        if target in versions.engine.manifests() and alias not in versions.aliases():
            versions.engine.move_alias(alias, target, {})
    write_json(Layout(settings.data_dir).engine / CONVERTED, {
        "from": str(settings.qdrant_path), "versions": converted,
        "note": "the old folder stays until `embedpipe retire` removes it",
    }, durable=True)
    return converted
