"""A Qdrant server (or cluster, or managed Qdrant) through qdrant-client.

Spaces are collections, manifests live in the collections' metadata, aliases are the
server's own (moved in one ``update_collection_aliases`` call), so any number of
processes and machines can share the indexes. No Qdrant server installs from the
package registries this project's CI can use: its tests run this class against
qdrant-client's local mode, which speaks the same client API.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from embedpipe.engine.base import Scored, SpaceInfo
from embedpipe.engine.filters import Match, MatchAny, Range, Where
from embedpipe.errors import QdrantUnavailable

if TYPE_CHECKING:
    import numpy as np
    from qdrant_client import QdrantClient

    from embedpipe.config import Settings

__all__ = ["ServerEngine", "to_qdrant_filter"]

MANIFEST_KEY = "embedpipe"
_DISTANCES = {"cosine": "Cosine", "dot": "Dot", "euclid": "Euclid"}
_FIELD_TYPES = {"keyword": "keyword", "integer": "integer", "float": "float", "bool": "bool"}


class ServerEngine:
    """The :class:`~embedpipe.engine.base.Engine` on qdrant-client."""

    kind = "server"

    def __init__(self, client: QdrantClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def describe(self) -> str:
        return f"Qdrant at {self.settings.qdrant.url}" if self.settings.qdrant.url else (
            f"Qdrant local mode at {self.settings.qdrant_path}")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Every client call goes through here, so every Qdrant failure reads the same.

        In local mode (tests, and converting old data directories) a read-only or full
        disk surfaces as an OSError or a SQLite error: a DataDirError, not "unreachable"."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        from embedpipe._files import storage_error

        try:
            return fn(*args, **kwargs)
        except (OSError, sqlite3.Error) as exc:  # ConnectionError and TimeoutError too
            local = None if self.settings.qdrant.url else storage_error(exc, self.settings.qdrant_path)
            if local is not None:
                raise local from exc
            if isinstance(exc, sqlite3.Error):
                raise
            raise QdrantUnavailable(f"Qdrant failed while {what} ({type(exc).__name__}); "
                                    "check that the server is up") from None
        except UnexpectedResponse as exc:
            raise QdrantUnavailable(
                f"Qdrant answered HTTP {exc.status_code} while {what}: {_first_line(exc.content)}"
            ) from None
        except ResponseHandlingException as exc:
            raise QdrantUnavailable(f"Qdrant failed while {what} ({type(exc).__name__}); "
                                    "check that the server is up") from None

    # -- the catalogue -------------------------------------------------------
    def manifests(self) -> dict[str, dict[str, Any]]:
        out = {}
        for desc in self._call("listing collections", self.client.get_collections).collections:
            info = self._call(f"reading collection {desc.name}", self.client.get_collection, desc.name)
            raw = (info.config.metadata or {}).get(MANIFEST_KEY)
            if isinstance(raw, Mapping):
                out[desc.name] = dict(raw)
        return out

    def manifest(self, space: str) -> dict[str, Any] | None:
        info = self._call(f"reading collection {space}", self.client.get_collection, space)
        raw = (info.config.metadata or {}).get(MANIFEST_KEY)
        return dict(raw) if isinstance(raw, Mapping) else None

    def aliases(self) -> dict[str, str]:
        resp = self._call("listing aliases", self.client.get_aliases)
        return {a.alias_name: a.collection_name for a in resp.aliases}

    def create(self, space: str, dims: int, distance: str, manifest: Mapping[str, Any]) -> None:
        from qdrant_client import models

        from embedpipe.qdrant import prefer_wal

        q = self.settings.qdrant
        self._call(
            "creating a collection", self.client.create_collection, space,
            vectors_config=models.VectorParams(size=dims, distance=models.Distance(_DISTANCES[distance])),
            shard_number=q.shard_number, replication_factor=q.replication_factor,
            write_consistency_factor=q.write_consistency_factor,
            metadata={MANIFEST_KEY: dict(manifest)},
        )
        prefer_wal(self.settings, space)

    def set_manifests(self, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        for space, manifest in manifests.items():
            self._call("recording a version state", self.client.update_collection,
                       space, metadata={MANIFEST_KEY: dict(manifest)})

    def move_alias(self, alias: str, space: str, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        from qdrant_client import models

        ops: list[Any] = []
        if alias in self.aliases():
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=space, alias_name=alias)))
        self._call("moving the alias", self.client.update_collection_aliases,
                   change_aliases_operations=ops)
        self.set_manifests(manifests)  # after the move: repair_states fixes a crash between

    def reset(self, space: str) -> None:
        """Recreate a collection empty, with its manifest and the aliases naming it."""
        from qdrant_client import models

        info = self._call(f"reading collection {space}", self.client.get_collection, space)
        params = info.config.params.vectors
        manifest = self.manifest(space) or {}
        aliases = [a for a, s in self.aliases().items() if s == space]
        distance = {v: k for k, v in _DISTANCES.items()}[params.distance.value]
        self.drop(space)
        self.create(space, params.size, distance, manifest)
        for alias in aliases:
            self._call("moving the alias", self.client.update_collection_aliases,
                       change_aliases_operations=[models.CreateAliasOperation(
                           create_alias=models.CreateAlias(collection_name=space, alias_name=alias))])

    def drop(self, space: str) -> None:
        self._call("dropping a collection", self.client.delete_collection, space)

    # -- points --------------------------------------------------------------
    def upsert(self, space: str, ids: Sequence[str], vectors: np.ndarray,
               payloads: Sequence[Mapping[str, Any]]) -> None:
        from qdrant_client import models

        batch = models.Batch(ids=list(ids), vectors=vectors.tolist(), payloads=[dict(p) for p in payloads])
        self._call("writing points", self.client.upsert, space, points=batch, wait=True)

    def delete(self, space: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        self._call("deleting points", self.client.delete, space,
                   points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def scroll(self, space: str, fields: Sequence[str] | bool, where: Where | None = None,
               page: int = 4096) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        offset = None
        flt = to_qdrant_filter(where)
        while True:
            points, offset = self._call(
                "listing points", self.client.scroll, space, limit=page, offset=offset,
                scroll_filter=flt, with_payload=fields if isinstance(fields, bool) else list(fields),
                with_vectors=False,
            )
            yield [(str(p.id), p.payload or {}) for p in points]
            if offset is None:
                return

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        import numpy as np

        records = self._call("reading vectors", self.client.retrieve, space,
                             ids=list(ids), with_vectors=True, with_payload=False)
        return {str(r.id): np.asarray(r.vector, dtype=np.float32) for r in records}

    def count(self, space: str) -> int:
        return int(self._call("counting points", self.client.count, space, exact=True).count)

    def query(self, space: str, vector: np.ndarray, k: int, where: Where | None = None,
              with_text: bool = True, group_by: str | None = None) -> list[Scored]:
        from qdrant_client import models

        payload: Any = True if with_text else models.PayloadSelectorExclude(exclude=["text"])
        ef = self.settings.qdrant.hnsw_ef
        common = {"query": vector.tolist(), "limit": k, "query_filter": to_qdrant_filter(where),
                  "with_payload": payload,
                  "search_params": models.SearchParams(hnsw_ef=ef) if ef else None}
        if group_by:
            resp = self._call("searching", self.client.query_points_groups, space,
                              group_by=group_by, group_size=1, **common)
            points = [g.hits[0] for g in resp.groups if g.hits]
        else:
            points = self._call("searching", self.client.query_points, space, **common).points
        return [Scored(str(p.id), float(p.score), p.payload or {}) for p in points]

    def flush(self, space: str) -> None:
        """Upserts are made with ``wait=True``: the server has them on its write-ahead log."""

    def build_index(self, space: str) -> None:
        """The server builds its HNSW index in the background as points arrive."""

    def index_fields(self, space: str, fields: Mapping[str, str]) -> None:
        if not self.settings.qdrant.url:
            return  # local mode has no payload indexes (it warns and ignores them)
        from qdrant_client import models

        for field, kind in fields.items():
            self._call("creating a payload index", self.client.create_payload_index, space,
                       field_name=field, field_schema=models.PayloadSchemaType(_FIELD_TYPES[kind]),
                       wait=True)

    def info(self, space: str) -> SpaceInfo:
        info = self._call(f"reading collection {space}", self.client.get_collection, space)
        return SpaceInfo(points=self.count(space), segments=info.segments_count,
                         indexed=info.indexed_vectors_count, location=self.describe())

    def close(self) -> None:
        """The client is shared and closed by ``embedpipe.engine.close_all``."""


def to_qdrant_filter(where: Where | None) -> Any:
    """A :class:`Where` as a qdrant_client ``models.Filter``."""
    if where is None:
        return None
    from qdrant_client import models

    def cond(c: Any) -> Any:
        if isinstance(c, Where):
            return to_qdrant_filter(c)
        if isinstance(c, Match):
            return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
        if isinstance(c, MatchAny):
            return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
        if isinstance(c, Range):
            return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, lte=c.lte, gt=c.gt, lt=c.lt))
        raise TypeError(f"not a filter condition: {c!r}")

    def many(items: tuple[Any, ...]) -> list[Any] | None:
        return [cond(c) for c in items] or None

    return models.Filter(must=many(where.must), should=many(where.should), must_not=many(where.must_not))


def _first_line(content: Any) -> str:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    return (text.strip().splitlines() or ["(no details)"])[0][:300]
