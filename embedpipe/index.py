"""Versioned indexes, and ``Index``, the query API for RAG applications.

Each (index, profile, version) is its own space named ``<index>__<profile>__v<N>``
(``layout.version_name``); applications query the alias ``<index>``. Each space has a
manifest (schema version, profile, fingerprint, dims, distance, state, created_at),
read through one upgrade path (``_manifest``). The alias moves in one atomic step
(``point_alias``) and only ever at a complete space. ``IndexVersions`` does all of it
on whichever engine the configuration picks (``embedpipe.engine``): it never learns
which.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from embedpipe.engine.filters import Typed, Where, where_from
from embedpipe.errors import EngineError, FingerprintMismatch, IndexNotFound, InputError, KeyRefused, ModelDeprecated
from embedpipe.points import HOLDING_FIELDS, Holding, holding, point_id, summary

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.adapters import Adapter
    from embedpipe.backends import Embedder
    from embedpipe.config import Settings
    from embedpipe.engine import Engine
    from embedpipe.profiles import Profile
    from embedpipe.serve.client import RemoteIndex

__all__ = ["Hit", "Holding", "Index", "IndexVersions", "Version", "Typed", "point_id"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Version:
    """One version of an index (a space of the engine), as its manifest describes it."""

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
    rebuilding: bool = False  # `embedpipe rebuild` emptied it and has not finished refilling it

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
            "rebuilding": self.rebuilding,
        }


def _manifest(collection: str, raw: Mapping[str, Any] | None) -> Version | None:
    """Read a manifest of any schema version; None for spaces embedpipe did not make."""
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
        rebuilding=bool(raw.get("rebuilding", False)),
    )



class IndexVersions:
    """The versions, manifests and alias of indexes in one engine."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    @classmethod
    def open(cls, settings: Settings) -> IndexVersions:
        """The versions of the configured engine (Qdrant Edge, or the server at qdrant.url)."""
        from embedpipe.engine import connect

        versions = cls(connect(settings), settings)
        versions._convert_earlier_release()
        return versions

    def _convert_earlier_release(self) -> None:
        """A data directory an earlier release made (qdrant-client local mode) is
        converted on first use, from the Parquet files; see ``rebuild.convert_local_mode``."""
        from embedpipe.rebuild import convert_local_mode, local_mode_left

        meta = local_mode_left(self.settings)
        if meta is None or getattr(self.engine, "read_only", False):
            return
        # The engine's lock keeps every other process out meanwhile, and this runs at
        # the first open of this process, before any of its writes.
        convert_local_mode(self.settings, self, meta)

    def versions(self, index: str | None = None) -> list[Version]:
        """Every embedpipe version (of one index when given), oldest version first."""
        out = []
        for space, raw in self.engine.manifests().items():
            found = _manifest(space, raw)
            if found and (index is None or found.index == index):
                out.append(found)
        return sorted(out, key=lambda v: (v.index, v.version))

    def aliases(self) -> dict[str, str]:
        """alias -> space."""
        return self.engine.aliases()

    def live(self, index: str) -> Version | None:
        """The version the alias points at, or None when the index has no live version."""
        target = self.aliases().get(index)
        if target is None:
            return None
        return _manifest(target, self.engine.manifests().get(target))

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
        """Create version N+1 in state ``building``, chunking documents as ``chunking``
        says (``ChunkSpec.to_dict()``; None: one point per document), with payload
        indexes on the document id and on the metadata fields the index names."""
        from embedpipe.layout import version_name

        number = max((v.version for v in self.versions(index)), default=0) + 1
        name = version_name(index, profile.name, number)
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
        self.engine.create(name, profile.dims, profile.distance, manifest)
        self.engine.index_fields(name, self._payload_indexes(index))
        return _manifest(name, manifest)  # type: ignore[return-value]

    def _payload_indexes(self, index: str) -> dict[str, str]:
        """The document id, and the metadata fields ``[indexes.NAME] payload_indexes`` names."""
        fields = {"id": "keyword"}
        for key, kind in self.settings.index_settings(index).payload_indexes.items():
            fields[f"metadata.{key}"] = kind
        return fields

    def drop(self, version: Version) -> None:
        """Delete a version and its points (never the live one)."""
        if self.aliases().get(version.index) == version.collection:
            raise IndexNotFound(f"refusing to drop {version.collection}: it is live")
        self.engine.drop(version.collection)

    def _raw(self, version: Version) -> dict[str, Any]:
        raw = self.engine.manifests().get(version.collection)
        if raw is None:
            raise IndexNotFound(f"version {version.collection} no longer exists")
        return raw

    def reset(self, version: Version) -> Version:
        """Empty a version in place for a rebuild; it says so (``rebuilding``) until
        ``rebuilt`` (a crash in between leaves that mark, and a search refuses it)."""
        marked = self.set_state(version, version.state, rebuilding=True)
        self.engine.reset(version.collection)
        self.engine.index_fields(version.collection, self._payload_indexes(version.index))
        return marked

    def rebuilt(self, version: Version) -> Version:
        self.engine.flush(version.collection)
        return self.set_state(version, self._raw(version)["state"], rebuilding=False)

    def set_state(self, version: Version, state: str, **fields: Any) -> Version:
        """Record a version's state (and other manifest fields) in its manifest."""
        manifest = dict(self._raw(version), state=state, **fields)
        self.engine.set_manifests({version.collection: manifest})
        return _manifest(version.collection, manifest)  # type: ignore[return-value]

    def point_alias(self, index: str, version: Version) -> None:
        """Point the alias ``index`` at ``version`` in one atomic step; it becomes ``live``.

        Callers must only pass a complete version. The version that was live before
        becomes ``standby`` (kept for rollback) and is remembered as ``previous``, so
        that rollback returns to exactly that version.
        """
        previous = self.live(index)
        manifests = {version.collection: dict(self._raw(version), state="live")}
        if previous is not None and previous.collection != version.collection:
            manifests[version.collection]["previous"] = previous.collection
            manifests[previous.collection] = dict(self._raw(previous), state="standby")
        self.engine.move_alias(index, version.collection, manifests)

    def repair_states(self, index: str) -> list[str]:
        """Make the recorded states agree with the alias, the one source of truth.

        On a Qdrant server ``point_alias`` moves the alias in one call and records the
        states in the next; a crash in between leaves, e.g., two versions marked
        ``live``. Writers call this first. Returns the versions whose state changed.
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
        self.engine.flush(version.collection)
        self.point_alias(index, version)

    def count(self, collection: str) -> int:
        return self.engine.count(collection)

    def point_ids(self, collection: str, page: int = 10_000) -> set[str]:
        """Every point id in a version (ids only, no vectors or payloads)."""
        return {pid for points in self.engine.scroll(collection, False, page=page) for pid, _ in points}

    def holdings(
        self, collection: str, doc_ids: Sequence[str] | None = None, page: int = 4096
    ) -> dict[str, Holding]:
        """What a version holds per document (of ``doc_ids``, or all): its points and its
        record hash, from the version alone (no vectors read)."""
        from embedpipe.engine.filters import MatchAny

        wheres: list[Where | None] = [None]
        if doc_ids is not None:
            ids = list(doc_ids)
            wheres = [Where(must=(MatchAny("id", tuple(ids[i:i + 1000])),))
                      for i in range(0, len(ids), 1000)]
        # Each point is cut down to what a holding needs as soon as its page arrives: a
        # version's payloads (texts, metadata) are far larger than this and the whole
        # version is listed at cutover.
        seen: dict[str, Any] = {}
        for where in wheres:
            for points in self.engine.scroll(collection, HOLDING_FIELDS, where, page=page):
                for pid, payload in points:
                    seen.setdefault(str(payload.get("id")), []).append(summary(pid, payload))
        for doc in seen:  # in place, so the summaries go as the holdings are made
            seen[doc] = holding(seen[doc])
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
        by_point = {point_id(d): d for d in doc_ids}
        found = self.engine.vectors(collection, list(by_point))
        return {by_point[pid]: vector for pid, vector in found.items()}

    def delete_points(self, collection: str, ids: Sequence[str], batch: int = 1024) -> None:
        """Delete points by point id (not document id); durable when it returns."""
        ids = list(ids)
        for start in range(0, len(ids), batch):
            self.engine.delete(collection, ids[start:start + batch])
        if ids:
            self.engine.flush(collection)

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict[str, Any]],
        batch: int = 512,
    ) -> None:
        """Write points (ids are point keys; point ids derive from them). Durable when it
        returns: the migration and catch-up count a batch done at that moment."""
        for start in range(0, len(ids), batch):
            end = start + batch
            self.engine.upsert(collection, [point_id(i) for i in ids[start:end]],
                               vectors[start:end], payloads[start:end])
        self.engine.flush(collection)

    def build_index(self, collection: str) -> None:
        """Build the approximate-search index once a bulk write ended (first build,
        migration backfill, rebuild), not per batch."""
        self.engine.build_index(collection)

    def refresh_index(self, collection: str, min_points: int = 20_000, fraction: float = 0.1) -> None:
        """After a small write (a sync, an ingest of changes): rebuild the search index
        only once the points searched exactly (not yet in it) pass ``min_points`` and
        ``fraction`` of the version, since Edge rebuilds whole segments."""
        if self.engine.kind != "edge":
            return  # a Qdrant server indexes as points arrive
        info = self.engine.info(collection)
        outside = info.points - info.indexed
        if outside > max(min_points, fraction * info.points):
            self.engine.build_index(collection)

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
        points = self.engine.query(collection, vector, k, where_from(filter), with_text=with_text,
                                   group_by="id" if group_by_doc else None)
        return [Hit.from_payload(p.score, p.payload) for p in points]


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
    # "adapter <id> (<profile>)" when the query went through a query adapter (the live
    # model could not embed it); None when the live model embedded it.
    via: str | None = None

    @classmethod
    def from_payload(cls, score: float, p: Mapping[str, Any]) -> Hit:
        return cls(
            id=str(p.get("id")),
            score=float(score),
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
        if self.via is not None:
            out["via"] = self.via
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

        self.name = check_index_name(name)
        self.settings = settings
        self.refresh_s = refresh_s
        self.versions = IndexVersions.open(settings)
        self._pinned: tuple[Version, Embedder] | None = None
        self._pinned_at = 0.0
        self._adapter: Adapter | None = None  # the adapter the pinned embedder goes through

    @classmethod
    def open(cls, name: str, config: str | None = None, url: str | None = None,
             api_key: str | None = None) -> Index | RemoteIndex:
        """Open an index; the config is found like the CLI finds it.

        When ``embedpipe serve`` owns the data directory (its ``server.json``), or
        ``[server] url`` names a server, the index is searched through that server: a
        :class:`~embedpipe.serve.client.RemoteIndex`, with the same ``search``,
        ``search_vector``, ``answer`` and ``live``. ``url`` names a server directly (no
        config is read), from any machine; ``api_key`` defaults to ``$EMBEDPIPE_API_KEY``.
        """
        from embedpipe.config import load_settings
        from embedpipe.serve.client import Client, RemoteIndex, server_for

        if url is not None:
            remote = RemoteIndex(name, Client(url, api_key or os.environ.get("EMBEDPIPE_API_KEY")))
            remote.live()  # an unknown index, a missing key or a dead server fails here
            return remote
        settings = load_settings(config)
        client = server_for(settings)
        if client is not None:
            if api_key is not None:
                client = Client(client.url, api_key, via=client.via)
            remote = RemoteIndex(name, client)
            remote.live()
            return remote
        index = cls(name, settings)
        index.live()
        return index

    def live(self) -> Version:
        """The live version (re-read from the alias when the pin is older than refresh_s)."""
        return self._pin()[0]

    def embedder(self) -> Embedder:
        """The embedder for the live version, verified to produce the recorded fingerprint
        (or, when the live model cannot embed any more, its accepted query adapter)."""
        return self._pin()[1]

    def adapter(self) -> Adapter | None:
        """The query adapter searches go through now, or None (the live model embeds)."""
        self._pin()
        return self._adapter

    def _pin(self) -> tuple[Version, Embedder]:
        now = time.monotonic()
        if self._pinned is not None and now - self._pinned_at < self.refresh_s:
            return self._pinned
        live = self.versions.require_live(self.name)
        if live.rebuilding:
            from embedpipe.errors import ShardUnreadable

            raise ShardUnreadable(
                f"version {live.collection} is being rebuilt, or its rebuild was interrupted; "
                f"finish it with `embedpipe rebuild --index {self.name}`"
            )
        if self._pinned is None or self._pinned[0].collection != live.collection or self._adapter_changed(live):
            from embedpipe.adapters import query_embedder

            embedder, self._adapter = query_embedder(self.settings, live)
            self._pinned = (live, embedder)
        self._pinned_at = now
        return self._pinned

    def _adapter_changed(self, live: Version) -> bool:
        """An adapter was accepted, replaced or retired since the pin (a small file read,
        at most every ``refresh_s``)."""
        from embedpipe.adapters import active_adapter

        current = active_adapter(self.settings, live)
        if self._adapter is None:
            # The live model embeds: an adapter changes nothing unless the index asks for it.
            return current is not None and self.settings.index_settings(self.name).query_via == "adapter"
        return current is None or current.id != self._adapter.id

    def _through_adapter(self) -> bool:
        """The live model just said it is gone: pin its adapter instead, if it has one."""
        from embedpipe.adapters import active_adapter, adapted

        version = self._pin()[0]
        adapter = active_adapter(self.settings, version)
        if adapter is None or self._adapter is not None:
            return False
        self._pinned, self._adapter = (version, adapted(self.settings, adapter)), adapter
        return True

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

        def run(version: Version, embedder: Embedder) -> list[Hit]:
            if sensitive:
                check_private(embedder.profile, "the request is sensitive")
            try:
                vector = embedder.embed_query(text)
            except (ModelDeprecated, KeyRefused):
                # Retired (404/410) or the key withdrawn (401/403) between two queries: an
                # accepted adapter takes over.
                if not self._through_adapter():
                    raise
                return run(*self._pin())
            hits = self.versions.search(version.collection, vector, k, filter, group_by_doc=group_by_doc)
            adapter = getattr(embedder, "adapter", None)  # an AdaptedEmbedder's
            if adapter is not None:
                hits = [replace(h, via=f"adapter {adapter.id} ({adapter.profile})") for h in hits]
            return hits

        return self._pinned_search(run)

    def _pinned_search(self, run: Callable[[Version, Embedder], list[Hit]]) -> list[Hit]:
        """``run`` on the pinned version; if the engine fails there because the alias has
        moved on since the pin (a cutover, a rollback, then ``retire`` dropped the pinned
        version), once more on the live one, with its own embedder."""
        version, embedder = self._pin()
        try:
            return run(version, embedder)
        except EngineError:
            self._pinned_at = 0.0  # re-read the alias now
            fresh = self._pin()
            if fresh[0].collection == version.collection:
                raise
            return run(*fresh)

    def search_vector(
        self,
        vector: Sequence[float] | np.ndarray,
        k: int = 10,
        filter: Mapping[str, Any] | Any | None = None,
        group_by_doc: bool = False,
        fingerprint: str | None = None,
    ) -> list[Hit]:
        """The ``k`` nearest points to a vector the caller embedded itself.

        Nothing can tell which space a bare vector came from, so it must at least have
        the live version's dimension and finite values; pass the ``fingerprint`` it was
        made with (what ``/v1/embeddings`` and ``status`` report) to have that checked too.
        """
        import numpy as np

        def run(version: Version, _: Embedder) -> list[Hit]:
            query = self._checked_vector(version, vector, fingerprint)
            return self.versions.search(version.collection, query, k, filter, group_by_doc=group_by_doc)

        return self._pinned_search(run)

    def _checked_vector(self, version: Version, vector: Sequence[float] | np.ndarray,
                        fingerprint: str | None) -> np.ndarray:
        import numpy as np

        if fingerprint is not None and fingerprint != version.fingerprint:
            raise FingerprintMismatch(
                f"the vector was made in space {fingerprint[:12]} but index {self.name!r} lives in "
                f"{version.fingerprint[:12]} ({version.profile}); embed it with the index's own "
                f"model (model \"index:{self.name}\" on /v1/embeddings)")
        query = np.asarray(vector, dtype=np.float32)
        if query.ndim != 1 or query.shape[0] != version.dims:
            raise InputError(f"the vector has {query.size} values but index {self.name!r} holds "
                             f"{version.dims}-dimensional vectors ({version.profile})")
        if not np.isfinite(query).all():
            raise InputError("the vector holds NaN or infinite values")
        return query

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

