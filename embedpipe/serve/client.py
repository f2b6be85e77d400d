"""Going through ``embedpipe serve``: the client the CLI and ``Index.open`` use when a
server owns the data directory, and :class:`RemoteIndex`, an index searched over HTTP.

Which server (``server_for``):

1. ``[server] url`` in embedpipe.toml (or ``$EMBEDPIPE_SERVER_URL``): a server on any
   machine; every command that reads or writes indexes goes through it;
2. else ``<data>/server.json`` naming a live process: the server that owns this data
   directory on this machine;
3. else none: the library opens the engine itself, as without a server.

The API key comes from ``$EMBEDPIPE_API_KEY`` (``[server] client_key_env`` names another
variable), never from a file embedpipe writes. Errors come back as the exception the
server raised (its ``error.type``), so a command fails with the same one line and exit
code with a server as without; a server that does not answer is
:class:`ServerUnavailable`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from embedpipe import errors
from embedpipe.errors import EmbedpipeError, InputError, ServerUnavailable

if TYPE_CHECKING:
    import httpx
    import numpy as np

    from embedpipe.config import Settings
    from embedpipe.index import Hit, Version
    from embedpipe.rag import Answer

__all__ = ["Client", "RemoteIndex", "server_for"]

URL_ENV = "EMBEDPIPE_SERVER_URL"
POLL_S = 0.5  # how often a followed job is asked for its progress


def server_for(settings: Settings) -> Client | None:
    """The client of the server this process should go through, or None (see the module
    docstring). The server's own process never goes through a server."""
    from embedpipe.serve.info import running_server, serving

    if serving():
        return None
    url = os.environ.get(URL_ENV) or settings.server.url
    if url:
        return Client(url, key_from_env(settings), via="[server] url")
    info = running_server(settings.data_dir)
    if info is None:
        return None
    return Client(info.url, key_from_env(settings), via=f"{settings.data_dir}/server.json (pid {info.pid})")


def key_from_env(settings: Settings) -> str | None:
    return os.environ.get(settings.server.client_key_env) or None


class Client:
    """A small JSON client of one embedpipe server; raises embedpipe's own errors."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, via: str = "") -> None:
        import httpx

        self.url = url.rstrip("/")
        self.via = via or self.url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  trust_env=False)  # a proxy must not see our key or data

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, json: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        """One request; the JSON answer, or the embedpipe error the server answered."""
        import httpx

        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise ServerUnavailable(
                f"embedpipe serve at {self.url} does not answer ({type(exc).__name__}: {exc}); found "
                f"through {self.via}: start it (`embedpipe serve`), or unset [server] url") from None
        if response.status_code >= 400:
            raise error_from(response)
        return response.json()

    # -- indexes ----------------------------------------------------------------------
    def indexes(self, name: str | None = None) -> list[dict[str, Any]]:
        """What ``status --json`` prints, from the server."""
        if name is None:
            return list(self.call("GET", "/v1/indexes"))
        return [self.call("GET", f"/v1/indexes/{name}")]

    def search(self, index: str, query: str | None = None, vector: Sequence[float] | None = None,
               k: int = 10, filter: Mapping[str, Any] | None = None, group_by_doc: bool = False,
               sensitive: bool = False, fingerprint: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"k": k, "group_by_doc": group_by_doc}
        if query is not None:
            body.update(query=query, sensitive=sensitive)
        else:
            body.update(vector=[float(v) for v in vector], fingerprint=fingerprint)  # type: ignore[union-attr]
        if filter is not None:
            body["filter"] = wire_filter(filter)
        return dict(self.call("POST", f"/v1/indexes/{index}/search", json=body))

    # -- jobs ---------------------------------------------------------------------------
    def start_job(self, kind: str, index: str, **params: Any) -> dict[str, Any]:
        body = {"kind": kind, "index": index, **{k: v for k, v in params.items() if v is not None}}
        return dict(self.call("POST", "/v1/jobs", json=body))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, index: str | None = None) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/jobs", params={"index": index} if index else None))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/v1/jobs/{job_id}/cancel"))

    def follow(self, job: dict[str, Any], on_update: Callable[[dict[str, Any]], None] | None = None,
               poll_s: float = POLL_S) -> dict[str, Any]:
        """Poll a job until it ends; ``on_update`` sees every answer. Returns the last."""
        from embedpipe.serve.jobs import FINISHED

        while True:
            if on_update is not None:
                on_update(job)
            if job["state"] in FINISHED:
                return job
            time.sleep(poll_s)
            job = self.job(job["id"])

    def run_job(self, kind: str, index: str, **params: Any) -> dict[str, Any]:
        """Start a job, wait for it, and return its result (or raise its error)."""
        return job_result(self.follow(self.start_job(kind, index, **params)))


def job_result(job: dict[str, Any]) -> dict[str, Any]:
    """A finished job's result, or the embedpipe error it ended with (a failed migration's
    report rides on the error as ``report``, as it does in-process)."""
    if job["state"] == "succeeded":
        return dict(job["result"] or {})
    error = job.get("error") or {}
    exc = make_error(str(error.get("type", "EmbedpipeError")), str(error.get("message", job["state"])))
    if job.get("result") is not None:
        exc.report = job["result"]  # type: ignore[attr-defined]
    return _raise(exc)


def _raise(exc: EmbedpipeError) -> Any:
    raise exc


def make_error(type_name: str, message: str) -> EmbedpipeError:
    """The embedpipe error of that class name (a name the client does not know: the base
    class, so an older client still gets the message and a non-zero exit)."""
    cls = getattr(errors, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, EmbedpipeError)):
        cls = EmbedpipeError
    # Built from the message alone: a class whose constructor takes more (UnknownProfile's
    # names, RateLimited's wait) gets the server's finished message as it is.
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if isinstance(exc, errors.RateLimited):
        exc.retry_after_s = 0.0
    return exc


def error_from(response: httpx.Response) -> EmbedpipeError:
    try:
        detail = response.json()["error"]
        type_name, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        return EmbedpipeError(f"the server answered HTTP {response.status_code} to "
                              f"{response.request.method} {response.request.url.path}")
    if type_name == "InvalidRequest":  # the body did not fit the schema: a client bug, or versions apart
        return InputError(f"the server refused the request: {message}")
    exc = make_error(type_name, message)
    if isinstance(exc, errors.RateLimited):
        exc.retry_after_s = float(response.headers.get("Retry-After", 1))
    return exc


def wire_filter(filter: Mapping[str, Any]) -> dict[str, Any]:
    """A filter as JSON: a command line's :class:`Typed` value becomes ``{"typed": "..."}``
    (the server matches it as typed or as text, as the CLI does in-process)."""
    from embedpipe.engine.filters import Typed

    if not isinstance(filter, Mapping):
        raise InputError(f"a filter through embedpipe serve is a mapping of metadata fields to "
                         f"values, not {type(filter).__name__}")
    return {k: {"typed": str(v)} if isinstance(v, Typed) else v for k, v in filter.items()}


class RemoteIndex:
    """An index searched through ``embedpipe serve``: what ``Index.open`` returns when a
    server owns the data directory, or for ``Index.open(name, url=...)``. The server
    embeds each query with the index's own model, so the query and the index share one
    space whatever this process has installed."""

    def __init__(self, name: str, client: Client) -> None:
        from embedpipe.layout import check_index_name

        self.name = check_index_name(name)
        self.client = client

    @property
    def url(self) -> str:
        return self.client.url

    def status(self) -> dict[str, Any]:
        """What ``embedpipe status --json`` says about this index."""
        return self.client.indexes(self.name)[0]

    def live(self) -> Version:
        """The live version, as the server reads it now."""
        from embedpipe.index import Version

        entry = self.status()
        for raw in entry.get("versions") or []:
            if raw.get("collection") == entry.get("alias"):
                return Version(collection=raw["collection"], index=self.name, version=raw["version"],
                               profile=raw["profile"], fingerprint=raw["fingerprint"], dims=raw["dims"],
                               distance=raw["distance"], state=raw["state"], created_at=raw["created_at"],
                               profile_data={}, chunking=raw.get("chunking"),
                               rebuilding=bool(raw.get("rebuilding")))
        raise errors.IndexNotFound(f"index {self.name!r} has no live version on {self.url}")

    def search(self, text: str, k: int = 10, filter: Mapping[str, Any] | None = None,
               group_by_doc: bool = False, sensitive: bool = False) -> list[Hit]:
        """As :meth:`embedpipe.index.Index.search`, answered by the server."""
        if not text or not text.strip():
            raise InputError("the query is empty; pass some text to search for")
        found = self.client.search(self.name, query=text, k=k, filter=filter, group_by_doc=group_by_doc,
                                   sensitive=sensitive)
        return _hits(found)

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10,
                      filter: Mapping[str, Any] | None = None, group_by_doc: bool = False,
                      fingerprint: str | None = None) -> list[Hit]:
        """As :meth:`embedpipe.index.Index.search_vector`, answered by the server."""
        found = self.client.search(self.name, vector=list(vector), k=k, filter=filter,
                                   group_by_doc=group_by_doc, fingerprint=fingerprint)
        return _hits(found)

    def answer(self, question: str, k: int = 5, sensitive: bool = False, **params: Any) -> Answer:
        """As :meth:`embedpipe.index.Index.answer`: retrieved and answered by the server
        (its chat gateway, breakers, policy and audit log)."""
        from embedpipe.rag import Answer

        body = {"question": question, "k": k, "sensitive": sensitive, **params}
        raw = self.client.call("POST", f"/v1/indexes/{self.name}/answer", json=body)
        return Answer(question=raw["question"], text=raw["answer"], citations=raw["citations"],
                      sources=raw["sources"], backend=raw["backend"], latency_s=raw["latency_s"],
                      chat=raw.get("chat") or {})

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteIndex({self.name!r}, url={self.url!r})"


def _hits(found: Mapping[str, Any]) -> list[Hit]:
    from embedpipe.index import Hit

    return [Hit(id=h["id"], score=h["score"], metadata=h.get("metadata") or {}, text=h.get("text"),
                chunk_id=h.get("chunk_id"), chunk=h.get("chunk"), start=h.get("start"), end=h.get("end"),
                via=h.get("via"))
            for h in found["hits"]]
