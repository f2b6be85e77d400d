"""Versioned indexes in Qdrant, and ``Index``, the query API for RAG applications.

Each (index, profile, version) is its own collection named ``<index>__<profile>__v<N>``;
applications query the alias ``<index>``. The collection's metadata carries a
manifest (schema version, profile, fingerprint, dims, distance, state, created_at),
read through one upgrade path (``_manifest``). The alias moves in one atomic call
(``point_alias``) and only ever at a complete collection.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedpipe.errors import FingerprintMismatch, IndexNotFound, InputError, QdrantUnavailable
from embedpipe.qdrant import prefer_wal

if TYPE_CHECKING:
    import numpy as np
    from qdrant_client import QdrantClient

    from embedpipe.backends import Embedder
    from embedpipe.config import Settings
    from embedpipe.profiles import Profile

__all__ = ["Hit", "Holding", "Index", "IndexVersions", "Version", "Typed", "point_id"]

MANIFEST_KEY = "embedpipe"
SCHEMA_VERSION = 1
_POINT_NAMESPACE = uuid.UUID("6f1c4a8e-2b7d-5e39-9c0a-1d2e3f4a5b6c")
_DISTANCES = {"cosine": "Cosine", "dot": "Dot", "euclid": "Euclid"}


def point_id(doc_id: str) -> str:
    """Deterministic Qdrant point id of a document: re-runs overwrite, never duplicate."""
    return str(uuid.uuid5(_POINT_NAMESPACE, doc_id))


@dataclass(frozen=True)
class Version:
    """One collection of an index, as its manifest describes it."""

    collection: str
    index: str
    version: int
    profile: str
    fingerprint: str
    dims: int
    distance: str
    state: str  # building | validating | live | standby
    created_at: str
    profile_data: dict[str, Any]
    previous: str | None = None  # the collection that was live before this one went live
    chunking: dict[str, int] | None = None  # ChunkSpec.to_dict(); None: a point per document

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "version": self.version,
            "profile": self.profile,
            "fingerprint": self.fingerprint,
            "dims": self.dims,
            "distance": self.distance,
            "state": self.state,
            "created_at": self.created_at,
            "chunking": self.chunking,
        }


def _manifest(collection: str, metadata: Mapping[str, Any] | None) -> Version | None:
    """Read a manifest of any schema version; None for collections embedpipe did not make."""
    raw = (metadata or {}).get(MANIFEST_KEY)
    if not isinstance(raw, Mapping):
        return None
    schema = int(raw.get("schema", 1))
    if schema > SCHEMA_VERSION:
        raise IndexNotFound(
            f"collection {collection} was written by a newer embedpipe (manifest schema "
            f"{schema}); upgrade embedpipe"
        )
    # Schema 1 is current; older schemas would be upgraded here, one step at a time.
    return Version(
        collection=collection,
        index=str(raw["index"]),
        version=int(raw["version"]),
        profile=str(raw["profile"]),
        fingerprint=str(raw["fingerprint"]),
        dims=int(raw["dims"]),
        distance=str(raw["distance"]),
        state=str(raw["state"]),
        created_at=str(raw["created_at"]),
        profile_data=dict(raw.get("profile_data", {})),
        previous=raw.get("previous"),
        chunking=raw.get("chunking"),
    )


class IndexVersions:
    """Collections, manifests and the alias of indexes in one Qdrant."""

    def __init__(self, client: QdrantClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Every client call goes through here, so every Qdrant failure reads the same.

        In local mode a read-only or full disk surfaces as an OSError or a SQLite error
        of the storage folder: a DataDirError, not "Qdrant unreachable"."""
        import sqlite3

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
                f"Qdrant answered HTTP {exc.status_code} while {what}: "
                f"{_first_line(exc.content)}"
            ) from None
        except ResponseHandlingException as exc:
            raise QdrantUnavailable(f"Qdrant failed while {what} ({type(exc).__name__}); "
                                    "check that the server is up") from None

    def _info(self, collection: str) -> Any:
        return self._call(f"reading collection {collection}", self.client.get_collection, collection)

    def versions(self, index: str | None = None) -> list[Version]:
        """Every embedpipe collection (of one index when given), oldest version first."""
        out = []
        for desc in self._call("listing collections", self.client.get_collections).collections:
            info = self._info(desc.name)
            found = _manifest(desc.name, info.config.metadata)
            if found and (index is None or found.index == index):
                out.append(found)
        return sorted(out, key=lambda v: (v.index, v.version))

    def aliases(self) -> dict[str, str]:
        """alias -> collection."""
        resp = self._call("listing aliases", self.client.get_aliases)
        return {a.alias_name: a.collection_name for a in resp.aliases}

    def live(self, index: str) -> Version | None:
        """The version the alias points at, or None when the index has no live version."""
        target = self.aliases().get(index)
        if target is None:
            return None
        info = self._info(target)
        return _manifest(target, info.config.metadata)

    def require_live(self, index: str) -> Version:
        found = self.live(index)
        if found is None:
            known = sorted({v.index for v in self.versions()})
            hint = f"known indexes: {', '.join(known)}" if known else "no index exists yet"
            raise IndexNotFound(
                f"index {index!r} has no live version ({hint}); create it with "
                f"`embedpipe ingest PATH --index {index}`"
            )
        return found

    def create_version(
        self, index: str, profile: Profile, fingerprint: str, chunking: Mapping[str, int] | None = None
    ) -> Version:
        """Create collection version N+1 in state ``building``, chunking documents as
        ``chunking`` says (``ChunkSpec.to_dict()``; None: one point per document)."""
        from qdrant_client import models

        number = max((v.version for v in self.versions(index)), default=0) + 1
        name = f"{index}__{profile.name}__v{number}"
        manifest = {
            "schema": SCHEMA_VERSION,
            "index": index,
            "version": number,
            "profile": profile.name,
            "profile_data": profile.model_dump(mode="json", exclude={"path"}),
            "fingerprint": fingerprint,
            "dims": profile.dims,
            "distance": profile.distance,
            "state": "building",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "chunking": dict(chunking) if chunking else None,
        }
        q = self.settings.qdrant
        self._call(
            "creating a collection",
            self.client.create_collection,
            name,
            vectors_config=models.VectorParams(
                size=profile.dims, distance=models.Distance(_DISTANCES[profile.distance])
            ),
            shard_number=q.shard_number,
            replication_factor=q.replication_factor,
            write_consistency_factor=q.write_consistency_factor,
            metadata={MANIFEST_KEY: manifest},
        )
        prefer_wal(self.settings, name)
        return _manifest(name, {MANIFEST_KEY: manifest})  # type: ignore[return-value]

    def drop(self, version: Version) -> None:
        """Delete a version's collection (never the live one)."""
        if self.aliases().get(version.index) == version.collection:
            raise IndexNotFound(f"refusing to drop {version.collection}: it is live")
        self._call("dropping a collection", self.client.delete_collection, version.collection)

    def set_state(self, version: Version, state: str, **fields: Any) -> Version:
        """Record a version's state (and other manifest fields) in its collection metadata."""
        info = self._info(version.collection)
        manifest = dict(info.config.metadata[MANIFEST_KEY], state=state, **fields)
        self._call("recording a version state", self.client.update_collection,
                   version.collection, metadata={MANIFEST_KEY: manifest})
        return _manifest(version.collection, {MANIFEST_KEY: manifest})  # type: ignore[return-value]

    def point_alias(self, index: str, version: Version) -> None:
        """Point the alias ``index`` at ``version`` in one atomic call; it becomes ``live``.

        Callers must only pass a complete collection. The version that was live
        before becomes ``standby`` (kept for rollback).
        """
        from qdrant_client import models

        previous = self.live(index)
        ops: list[Any] = []
        if previous is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=index)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=version.collection, alias_name=index)
            )
        )
        self._call("moving the alias", self.client.update_collection_aliases,
                   change_aliases_operations=ops)
        if previous is not None and previous.collection != version.collection:
            # Remembered so that rollback returns to exactly this version.
            self.set_state(version, "live", previous=previous.collection)
            self.set_state(previous, "standby")
        else:
            self.set_state(version, "live")

    def repair_states(self, index: str) -> list[str]:
        """Make the recorded states agree with the alias, the one source of truth.

        ``point_alias`` moves the alias in one atomic call and then records states in
        two more calls; a crash in between leaves, e.g., two versions marked ``live``.
        Writers call this first. Returns the collections whose state changed.
        """
        target = self.aliases().get(index)
        fixed = []
        for version in self.versions(index):
            if version.collection == target and version.state != "live":
                self.set_state(version, "live")
            elif version.collection != target and version.state == "live":
                self.set_state(version, "standby")
            else:
                continue
            fixed.append(version.collection)
        return fixed

    def go_live(self, index: str, version: Version, corpus_ids: set[str]) -> None:
        """Point the alias at ``version`` once it holds exactly the corpus: the one cutover.

        Points of documents that are not in the corpus (left by an interrupted build whose
        input changed, or by documents deleted meanwhile) are deleted first; a missing or
        half-written document stops the cutover with the alias untouched.
        """
        from embedpipe.errors import EmbedpipeError

        held = self.holdings(version.collection)
        extra = [p for doc, h in held.items() if doc not in corpus_ids for p in h.points]
        if extra:
            self.delete_points(version.collection, extra)
        missing = sum(1 for doc in corpus_ids if doc not in held or held[doc].record_hash is None)
        if missing:
            raise EmbedpipeError(
                f"version {version.collection} lacks {missing} of the corpus's {len(corpus_ids)} "
                "documents; the alias was not moved. Re-run the same command to complete it"
            )
        self.point_alias(index, version)

    def count(self, collection: str) -> int:
        return int(self._call("counting points", self.client.count, collection, exact=True).count)

    def point_ids(self, collection: str, page: int = 10_000) -> set[str]:
        """Every point id in a collection (ids only, no vectors or payloads)."""
        ids: set[str] = set()
        offset = None
        while True:
            points, offset = self._call(
                "listing points", self.client.scroll, collection, limit=page, offset=offset,
                with_payload=False, with_vectors=False,
            )
            ids.update(str(p.id) for p in points)
            if offset is None:
                return ids

    def holdings(
        self, collection: str, doc_ids: Sequence[str] | None = None, page: int = 4096
    ) -> dict[str, Holding]:
        """What a version holds per document (of ``doc_ids``, or all): its points and its
        record hash, from the collection alone (no vectors read)."""
        from qdrant_client import models

        fields = ["id", "record_hash", "content_hash", "metadata", "chunk", "chunks"]
        filters: list[Any] = [None]
        if doc_ids is not None:
            ids = list(doc_ids)
            filters = [
                models.Filter(must=[models.FieldCondition(
                    key="id", match=models.MatchAny(any=ids[i:i + 1000]))])
                for i in range(0, len(ids), 1000)
            ]
        # Each point is cut down to what a holding needs as soon as its page arrives: a
        # version's payloads (texts, metadata) are far larger than this and the whole
        # collection is listed at cutover.
        seen: dict[str, Any] = {}
        for flt in filters:
            offset = None
            while True:
                points, offset = self._call(
                    "listing points", self.client.scroll, collection, limit=page, offset=offset,
                    scroll_filter=flt, with_payload=fields, with_vectors=False,
                )
                for p in points:
                    payload = p.payload or {}
                    seen.setdefault(str(payload.get("id")), []).append(_summary(str(p.id), payload))
                del points
                if offset is None:
                    break
        for doc in seen:  # in place, so the summaries go as the holdings are made
            seen[doc] = _holding(seen[doc])
        return seen

    def contents(self, collection: str) -> dict[str, str | None]:
        """document id -> record hash of every document a version holds (None: half-written)."""
        return {doc: h.record_hash for doc, h in self.holdings(collection).items()}

    def delete_documents(self, collection: str, doc_ids: Sequence[str]) -> int:
        """Delete every point (chunk) of these documents; returns how many were held."""
        held = self.holdings(collection, doc_ids)
        self.delete_points(collection, [p for h in held.values() for p in h.points])
        return len(held)

    def stored_vectors(self, collection: str, doc_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """document id -> the vector stored in ``collection`` (absent ids are left out)."""
        import numpy as np

        by_point = {point_id(d): d for d in doc_ids}
        records = self._call("reading vectors", self.client.retrieve, collection,
                             ids=list(by_point), with_vectors=True, with_payload=False)
        return {by_point[str(r.id)]: np.asarray(r.vector, dtype=np.float32) for r in records}

    def delete_points(self, collection: str, ids: Sequence[str], batch: int = 1024) -> None:
        """Delete points by point id (not document id)."""
        from qdrant_client import models

        ids = list(ids)
        for start in range(0, len(ids), batch):
            selector = models.PointIdsList(points=ids[start:start + batch])
            self._call("deleting points", self.client.delete, collection,
                       points_selector=selector, wait=True)

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch: int = 512,
    ) -> None:
        """Write points (ids are document ids; point ids derive from them)."""
        from qdrant_client import models

        for start in range(0, len(ids), batch):
            end = start + batch
            points = models.Batch(
                ids=[point_id(i) for i in ids[start:end]],
                vectors=vectors[start:end].tolist(),
                payloads=list(payloads[start:end]),
            )
            self._call("writing points", self.client.upsert, collection, points=points, wait=True)

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        k: int,
        filter: Mapping[str, Any] | Any | None = None,
        with_text: bool = True,
        group_by_doc: bool = False,
    ) -> list[Hit]:
        """The ``k`` nearest points; with ``group_by_doc``, the best chunk of each of the
        ``k`` nearest documents (a document's chunks share its ``id`` payload)."""
        from qdrant_client import models

        payload: Any = True if with_text else models.PayloadSelectorExclude(exclude=["text"])
        common = {"query": vector.tolist(), "limit": k, "query_filter": _to_filter(filter),
                  "with_payload": payload}
        if group_by_doc:
            resp = self._call("searching", self.client.query_points_groups, collection,
                              group_by="id", group_size=1, **common)
            points = [g.hits[0] for g in resp.groups if g.hits]
        else:
            points = self._call("searching", self.client.query_points, collection, **common).points
        return [Hit.from_point(p) for p in points]


@dataclass(frozen=True, slots=True)
class Holding:
    """A document's points in one version."""

    record_hash: str | None  # None when its points disagree (a rewrite was interrupted)
    points: tuple[str, ...]


def _summary(point: str, payload: dict[str, Any]) -> tuple[str, str, int, int]:
    """(point id, record hash, chunk, chunks) of one point's payload."""
    rh = payload.get("record_hash")
    if rh is None:  # points written before record_hash joined the payload
        from embedpipe.corpus import record_hash

        meta = json.dumps(payload.get("metadata") or {}, sort_keys=True,
                          ensure_ascii=False, default=str)
        rh = record_hash(str(payload.get("content_hash")), meta)
    return point, rh, payload.get("chunk", 0), payload.get("chunks", 1)


def _holding(points: list[tuple[str, str, int, int]]) -> Holding:
    """Whole (one record hash, chunks 0..n-1 of n) or half-written (record hash None)."""
    hashes = {rh for _, rh, _, _ in points}
    counts = {n for _, _, _, n in points}
    chunks = sorted(c for _, _, c, _ in points)
    whole = len(hashes) == 1 and len(counts) == 1 and chunks == list(range(counts.pop()))
    return Holding(hashes.pop() if whole else None, tuple(p for p, _, _, _ in points))


def _first_line(content: Any) -> str:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
    return (text.strip().splitlines() or ["(no details)"])[0][:300]


class Typed(str):
    """A filter value as typed on a command line, where ``2024`` could mean the number
    (JSONL, Parquet) or the text (every CSV cell is text): it matches metadata stored
    either way. ``true``/``false`` match the booleans and the words, a number matches the
    number and its spelling; anything else matches the text only."""


def _typed_condition(key: str, value: Typed) -> Any:
    from qdrant_client import models

    text = models.FieldCondition(key=f"metadata.{key}", match=models.MatchValue(value=str(value)))
    try:
        parsed = json.loads(value)
    except ValueError:
        return text
    if isinstance(parsed, (bool, int, float)) and not (isinstance(parsed, float) and parsed != parsed):
        return models.Filter(should=[text, _to_filter({key: parsed}).must[0]])
    return text


def _to_filter(filter: Mapping[str, Any] | Any | None) -> Any:
    """A ``{"key": value}`` mapping becomes a match on ``metadata.key``.

    Strings, integers and booleans match exactly, a list matches any of its strings or
    integers, a float matches that number (a range of one point, since Qdrant has no
    float equality), a :class:`Typed` value matches the text or what it spells.
    Anything else is refused with an ``InputError``.
    """
    if filter is None or not isinstance(filter, Mapping):
        return filter
    from qdrant_client import models

    must = []
    for key, value in filter.items():
        cond: Any
        if isinstance(value, Typed):
            cond = _typed_condition(key, value)
        elif isinstance(value, (str, bool, int)):
            cond = models.FieldCondition(key=f"metadata.{key}", match=models.MatchValue(value=value))
        elif isinstance(value, float) and value == value:  # not NaN
            cond = models.FieldCondition(key=f"metadata.{key}", range=models.Range(gte=value, lte=value))
        elif isinstance(value, (list, tuple, set)) and value and (
            all(isinstance(v, str) for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            cond = models.FieldCondition(key=f"metadata.{key}", match=models.MatchAny(any=list(value)))
        else:
            raise InputError(
                f"filter {key}={value!r}: match a string, integer, boolean, number or a "
                "non-empty list of strings or of integers"
            )
        must.append(cond)
    return models.Filter(must=must)


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str  # the document's id (for a chunk, its parent document's)
    score: float
    metadata: dict[str, Any]
    text: str | None = None  # the chunk's text for a chunked index
    chunk_id: str | None = None  # ``<id>#<n>`` for a chunk
    chunk: int | None = None  # the chunk's position in its document
    start: int | None = None  # the chunk's character offsets in the document text
    end: int | None = None

    @classmethod
    def from_point(cls, point: Any) -> Hit:
        p = point.payload or {}
        return cls(
            id=str(p.get("id")),
            score=float(point.score),
            metadata=dict(p.get("metadata") or {}),
            text=p.get("text"),
            chunk_id=p.get("chunk_id"),
            chunk=p.get("chunk"),
            start=p.get("start"),
            end=p.get("end"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "score": self.score, "metadata": self.metadata, "text": self.text}
        if self.chunk_id is not None:
            out.update(chunk_id=self.chunk_id, chunk=self.chunk, start=self.start, end=self.end)
        return out


class Index:
    """Search one index, always embedding the query in the index's own space.

    >>> idx = Index.open("docs")
    >>> for hit in idx.search("how do aliases work?", k=5):
    ...     print(hit.id, hit.score)

    The live collection and its verified embedder are pinned together and searched
    together; the alias is re-read at most every ``refresh_s`` seconds, so a cutover is
    picked up quickly without two extra round trips on every query. Searching the pinned
    collection (not the alias) is what keeps query and index in one space during a swap.
    """

    def __init__(self, name: str, settings: Settings, refresh_s: float = 5.0) -> None:
        from embedpipe.layout import check_index_name
        from embedpipe.qdrant import connect

        self.name = check_index_name(name)
        self.settings = settings
        self.refresh_s = refresh_s
        self.versions = IndexVersions(connect(settings), settings)
        self._pinned: tuple[Version, Embedder] | None = None
        self._pinned_at = 0.0

    @classmethod
    def open(cls, name: str, config: str | None = None) -> Index:
        """Open an index; the config is found like the CLI finds it."""
        from embedpipe.config import load_settings

        settings = load_settings(config)
        index = cls(name, settings)
        index.live()
        return index

    def live(self) -> Version:
        """The live version (re-read from the alias when the pin is older than refresh_s)."""
        return self._pin()[0]

    def embedder(self) -> Embedder:
        """The embedder for the live version, verified to produce the recorded fingerprint."""
        return self._pin()[1]

    def _pin(self) -> tuple[Version, Embedder]:
        now = time.monotonic()
        if self._pinned is not None and now - self._pinned_at < self.refresh_s:
            return self._pinned
        live = self.versions.require_live(self.name)
        if self._pinned is None or self._pinned[0].collection != live.collection:
            from embedpipe.backends import build_embedder

            profile = self.settings.profile(live.profile)
            embedder = build_embedder(profile, self.settings)
            check_fingerprint(live, embedder.fingerprint, profile.name)
            self._pinned = (live, embedder)
        self._pinned_at = now
        return self._pinned

    def search(
        self,
        text: str,
        k: int = 10,
        filter: Mapping[str, Any] | Any | None = None,
        group_by_doc: bool = False,
        sensitive: bool = False,
    ) -> list[Hit]:
        """The ``k`` nearest points to ``text``; ``filter`` matches metadata fields.

        In a chunked index a hit is a chunk (``Hit.chunk_id``); ``group_by_doc`` returns
        the best chunk of each of the ``k`` nearest documents instead. A ``sensitive``
        query is refused, before anything is sent, when the index's model is hosted:
        embedding it would send its text to that API.
        """
        if not text or not text.strip():
            raise InputError("the query is empty; pass some text to search for")
        version, embedder = self._pin()
        if sensitive:
            check_private(embedder.profile, "the request is sensitive")
        vector = embedder.embed_query(text)
        return self.versions.search(version.collection, vector, k, filter, group_by_doc=group_by_doc)

    def answer(self, question: str, k: int = 5, sensitive: bool = False, **params: Any) -> Any:
        """A grounded answer from the ``k`` best documents through the chat gateway
        (``[chat]`` in embedpipe.toml), citing their ids; see ``embedpipe.rag``."""
        from embedpipe.rag import answer

        return answer(self, question, k=k, sensitive=sensitive, **params)


def check_private(profile: Profile, why: str) -> None:
    """Refuse to embed with a hosted profile when the text must stay on your network."""
    if profile.is_hosted:
        from embedpipe.errors import SovereigntyError

        where = profile.base_url or "https://api.openai.com/v1"
        raise SovereigntyError(
            f"{why}, but the index's model {profile.name!r} is hosted: embedding the text would "
            f"send it to {where}; nothing was sent. Migrate the index to a local or self-hosted "
            "profile (`embedpipe migrate --to PROFILE`) or drop the sensitive flag"
        )


def check_fingerprint(version: Version, fingerprint: str, profile: str) -> None:
    """Refuse to mix embedding spaces: the embedder must match the collection's record."""
    if fingerprint != version.fingerprint:
        raise FingerprintMismatch(
            f"collection {version.collection} was built with fingerprint "
            f"{version.fingerprint[:12]} but profile {profile!r} now produces "
            f"{fingerprint[:12]} (weights, prompts or settings changed); restore the original "
            f"model or migrate the index with `embedpipe migrate --to {profile}`"
        )
