"""The storage boundary: what embedpipe needs from a vector engine, and nothing more.

A *space* is the points of one index version (``<index>__<profile>__v<N>``, see
``layout.version_name``) with its manifest; an *alias* names the space an index serves
from. Everything above this boundary (ingest, sync, migrations, validation, status,
``Index``) talks to an :class:`Engine` through ``IndexVersions`` and never learns which
one it has: Qdrant Edge in-process (``edge.py``, the default) or a Qdrant server
through qdrant-client (``server.py``, when ``qdrant.url`` is set).

Point ids are strings (``points.point_id``); payloads are JSON-like dicts
(``points.payload``); filters are :class:`~embedpipe.engine.filters.Where`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.engine.filters import Where

__all__ = ["Engine", "Scored", "SpaceInfo"]


@dataclass(frozen=True)
class Scored:
    """One point a query found."""

    id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class SpaceInfo:
    """What ``status`` shows of a space's storage."""

    points: int
    segments: int | None = None
    indexed: int | None = None  # vectors in an HNSW index (the rest are searched exactly)
    disk_bytes: int | None = None
    location: str | None = None


class Engine(Protocol):
    """A vector engine holding embedpipe's spaces, their manifests and the aliases."""

    kind: str  # "edge" | "server"

    def describe(self) -> str:
        """Where the engine keeps its data, for messages (never a key)."""

    # -- the catalogue -------------------------------------------------------
    def manifests(self) -> dict[str, dict[str, Any]]:
        """space -> its manifest, for every space embedpipe made."""

    def aliases(self) -> dict[str, str]:
        """alias -> space."""

    def create(self, space: str, dims: int, distance: str, manifest: Mapping[str, Any]) -> None:
        """Create an empty space (``distance``: cosine, dot or euclid) with its manifest."""

    def set_manifests(self, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the manifests of existing spaces."""

    def move_alias(self, alias: str, space: str, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        """Point ``alias`` at ``space`` in one atomic step, then record ``manifests``
        (the Edge catalogue does both in the same step)."""

    def reset(self, space: str) -> None:
        """Empty a space, keeping its manifest and the aliases naming it (a rebuild)."""

    def drop(self, space: str) -> None:
        """Delete a space and its points."""

    # -- points --------------------------------------------------------------
    def upsert(self, space: str, ids: Sequence[str], vectors: np.ndarray,
               payloads: Sequence[Mapping[str, Any]]) -> None:
        """Write points (replacing any with the same id); returns once acknowledged."""

    def delete(self, space: str, ids: Sequence[str]) -> None:
        """Delete points by id (absent ids are ignored)."""

    def scroll(self, space: str, fields: Sequence[str] | bool, where: Where | None = None,
               page: int = 4096) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        """Pages of (point id, payload cut to ``fields``; True: all of it, False: none)."""

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """point id -> stored vector (absent ids left out)."""

    def count(self, space: str) -> int:
        """The exact number of points."""

    def query(self, space: str, vector: np.ndarray, k: int, where: Where | None = None,
              with_text: bool = True, group_by: str | None = None) -> list[Scored]:
        """The ``k`` nearest points, best first; with ``group_by``, the best point of each
        of the ``k`` best distinct values of that payload field."""

    def flush(self, space: str) -> None:
        """Make every acknowledged write durable against power loss."""

    def build_index(self, space: str) -> None:
        """Build the approximate-search index after a bulk write (may take minutes)."""

    def index_fields(self, space: str, fields: Mapping[str, str]) -> None:
        """Payload indexes: field path -> keyword | integer | float | bool."""

    def info(self, space: str) -> SpaceInfo:
        """Storage figures of a space."""

    def close(self) -> None:
        """Release the engine (files, locks, connections)."""
