"""``embedpipe serve``: one HTTP server owns a data directory's engine.

An embedded engine (Qdrant Edge) belongs to one process. The server is that process:
applications, other languages and several workers reach the indexes through it, and
every query it embeds is embedded in the space of the index it searches.

* ``app``: ``create_app(settings)``, the FastAPI application (routes stay thin: each
  calls the library, ``ingest``, ``Index``, ``status``, the chat gateway);
* ``openai_api``: ``/v1/embeddings``, ``/v1/chat/completions``, ``/v1/models`` in the
  OpenAI protocol;
* ``schemas``: request and response models; ``errors``: embedpipe errors as HTTP
  statuses and one JSON error body; ``state``: what the server shares between requests;
* ``keys``: API keys (the hashed key file, ``$EMBEDPIPE_SERVER_KEYS``, scopes, the
  checks) and what ``embedpipe keys`` writes; imports nothing heavy;
* ``auth``: the key check in front of every route (401, 429) and the grant each route
  asks for its scope and index (403);
* ``runner``: ownership (``server.lock``, ``server.json``), who may be served (an
  address other than loopback needs keys), uvicorn start and stop;
* ``jobs``: long work the server runs for its clients (ingest, sync, migrate, rollback,
  retire), cancelled at batch boundaries, recorded under ``<data>/jobs``;
* ``info``: reading ``server.json``, for clients; imports nothing heavy;
* ``client``: the other side: which server to go through (``[server] url``, or the
  live ``server.json``), ``Client`` (errors come back as embedpipe's own) and
  ``RemoteIndex``, what ``Index.open`` returns when a server owns the data directory.

Importing this package imports neither FastAPI nor uvicorn (nor httpx).
"""

from __future__ import annotations

from embedpipe.serve.info import ServerInfo, read_info, running_server

__all__ = ["ServerInfo", "read_info", "running_server"]
