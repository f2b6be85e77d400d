"""What the server shares between requests: its settings, its API keys, one write turn,
open indexes, embedders and the chat gateway.

* **Writes take turns.** Documents and deletes go through one lock: a write waits up
  to ``[server] write_wait_s`` for the one before it, then is refused with IndexBusy
  (409). Searches take no lock; they go on while a batch is embedded and written.
* **Models load once.** An index (``Index``: its live version pinned with its verified
  embedder) and a profile's embedder are made on first use and kept; a local model is
  loaded under a lock, so concurrent first requests do not load it twice.
* **The gateway is one**, so its breakers and latency window see every request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from embedpipe.errors import ConfigError, IndexBusy, NoBackendAvailable
from embedpipe.layout import check_index_name
from embedpipe.serve.jobs import Jobs

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.config import Settings
    from embedpipe.gateway import Gateway
    from embedpipe.index import Index
    from embedpipe.serve.keys import KeyRing

__all__ = ["INDEX_MODEL", "ServerState"]

INDEX_MODEL = "index:"  # /v1/embeddings model "index:<name>": that index's own model


class ServerState:
    """One per application; see the module docstring."""

    def __init__(self, settings: Settings, keys: KeyRing) -> None:
        self.settings = settings
        self.keys = keys  # the API keys it accepts (keys.required: whether it asks for one)
        self.started = time.time()
        self._writes = threading.Lock()
        self._lock = threading.Lock()  # the caches below
        self._loading = threading.Lock()  # model loads
        self._indexes: dict[str, Index] = {}
        self._embedders: dict[str, Embedder] = {}
        self._checked: dict[int, Embedder] = {}  # id -> embedder whose model is loaded
        self._gateway: Gateway | None = None
        self.jobs = Jobs(settings)  # ingest, sync, migrate... run in threads of the server

    # -- writes ---------------------------------------------------------------------
    @property
    def writing(self) -> bool:
        """Whether a write holds the turn now."""
        return self._writes.locked()

    @contextlib.contextmanager
    def write_turn(self) -> Iterator[None]:
        """The one write turn, or IndexBusy after ``write_wait_s``."""
        wait = self.settings.server.write_wait_s
        if not self._writes.acquire(timeout=wait):
            raise IndexBusy(f"another write (documents or a delete) is running in this server; it "
                            f"was waited for {wait:g} s ([server] write_wait_s): retry later")
        try:
            yield
        finally:
            self._writes.release()

    # -- indexes and models ---------------------------------------------------------
    def index(self, name: str) -> Index:
        """The index, its live version pinned with its verified embedder (loaded), or
        IndexNotFound. Only indexes that exist are kept."""
        from embedpipe.index import Index

        check_index_name(name)
        with self._lock:
            found = self._indexes.get(name)
        if found is None:
            found = Index(name, self.settings)
        self.ready(found.embedder())  # IndexNotFound when it has no live version
        with self._lock:
            return self._indexes.setdefault(name, found)

    def embedder(self, model: str) -> tuple[Embedder, str]:
        """(embedder, fingerprint) for ``/v1/embeddings``: ``index:<name>`` is that index's
        pinned model, checked against the fingerprint its version records; anything else
        is a profile name (UnknownProfile lists the known ones)."""
        if model.startswith(INDEX_MODEL):
            index = self.index(model[len(INDEX_MODEL):])
            return index.embedder(), index.live().fingerprint
        from embedpipe.backends import build_embedder

        profile = self.settings.profile(model)
        with self._lock:
            found = self._embedders.get(profile.name)
        if found is None:
            found = build_embedder(profile, self.settings)
        self.ready(found)
        with self._lock:
            found = self._embedders.setdefault(profile.name, found)
        return found, found.fingerprint

    def ready(self, embedder: Embedder) -> Embedder:
        """Load a local model once (a hosted one needs no loading: its check costs a request)."""
        if id(embedder) in self._checked or not embedder.profile.is_local:
            return embedder
        with self._loading:
            if id(embedder) not in self._checked:
                embedder.check()
                self._checked[id(embedder)] = embedder
        return embedder

    def gateway(self) -> Gateway:
        """The chat gateway (NoBackendAvailable when ``[chat]`` names no backend)."""
        from embedpipe.gateway import Gateway

        with self._lock:
            if self._gateway is None:
                try:
                    self._gateway = Gateway.from_settings(self.settings)
                except ConfigError as exc:
                    raise NoBackendAvailable(str(exc)) from None
            return self._gateway
