"""The FastAPI application of ``embedpipe serve``: ``create_app(settings)``.

Routes are thin: each calls the library and shapes its answer. Every route that
touches the engine or a model is a plain ``def``, so FastAPI runs it in its
threadpool: Qdrant Edge's binding holds the interpreter while it searches, and a
model encodes on the CPU, so ``async`` would only block the event loop. Writes take
the server's one write turn (``state.ServerState.write_turn``); searches do not wait
for it. With API keys, each route first asks the request's grant for the scope and index
it needs (``auth``): read for searches and index listings, write for documents and
deletes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any, Optional

from fastapi import APIRouter, Depends, FastAPI, Request

from embedpipe.serve import errors
from embedpipe.serve.auth import Authenticate, GrantDep
from embedpipe.serve.schemas import (
    AnswerRequest,
    DeleteResponse,
    DocumentsRequest,
    ErrorBody,
    JobOut,
    JobRequest,
    SearchRequest,
    SearchResponse,
)
from embedpipe.serve.state import ServerState

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.serve.keys import KeyRing

__all__ = ["create_app"]

DESCRIPTION = """\
One server owns a data directory's vector engine; applications in any language and any
number of processes search and write through it.

Every query is embedded in the space of the index it searches: `search` embeds with
the index's own model, `/v1/embeddings` with `model = "index:<name>"` returns vectors of
that index's space and its fingerprint. `/v1/chat/completions` goes through the chat
gateway (its route, fallback, breakers, sovereignty policy and audit log).

Long work runs as jobs (`/v1/jobs`): ingest a file or folder, sync, plan and run a
migration, roll back, retire old versions, each as the `embedpipe` command of that name
runs it (that is what the CLI does when a server owns the data directory). Searches keep
answering while jobs run; a cancelled job stops at a batch boundary, keeping what it wrote.

Once the server has API keys every route but `/healthz`, `/docs` and `/openapi.json` needs
one: `Authorization: Bearer <key>` (the openai SDK's `api_key`; "Authorize" above). A key
is scoped to indexes and to `read` (search, index listings, embeddings), `write`
(documents, deletes, jobs) and `chat`; `/v1/models` takes any valid key.

Errors answer `{"error": {"type", "message", "param"}}`: 400 a bad request (`param`
names the field), 401 no or an unknown API key, 403 the key lacks the scope or index (or
policy refused a hosted model), 404 unknown index, document or model, 409 busy or
another embedding space, 413 over a `[server]` limit, 429 over the key's requests per
minute (`Retry-After`), 503 no chat backend can answer.
"""


async def state_of(request: Request) -> ServerState:
    """The server's shared state (async: no threadpool hop for a lookup)."""
    return request.app.state.embedpipe  # type: ignore[no-any-return]


State = Annotated[ServerState, Depends(state_of)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 429, 500, 503)}

router = APIRouter()


@router.get("/healthz", tags=["server"])
async def healthz(state: State, grant: GrantDep) -> dict[str, Any]:
    """The server answers; which embedpipe, which process, whether a write is running.
    Needs no key; once the server has keys, only a valid key sees more than the status."""
    from embedpipe import __version__

    if grant.anonymous:
        return {"status": "ok"}
    return {"status": "ok", "version": __version__, "pid": os.getpid(),
            "data_dir": str(state.settings.data_dir), "writing": state.writing}


@router.get("/v1/indexes", tags=["indexes"], responses=ERRORS)
def list_indexes(state: State, grant: GrantDep) -> list[dict[str, Any]]:
    """Every index the key may read: what `embedpipe status --json` prints."""
    from embedpipe.status import index_status

    grant.require("read", what="listing indexes")
    return [e for e in index_status(state.settings) if grant.may("read", e["index"])]


@router.get("/v1/indexes/{name}", tags=["indexes"], responses=ERRORS)
def get_index(name: str, state: State, grant: GrantDep) -> dict[str, Any]:
    """One index: its alias, corpus size, versions (profile, fingerprint, state, points)."""
    from embedpipe.status import index_status

    grant.require("read", name)
    return index_status(state.settings, name)[0]


@router.post("/v1/indexes/{name}/search", tags=["indexes"], response_model=SearchResponse,
             responses=ERRORS)
def search(name: str, body: SearchRequest, state: State, grant: GrantDep) -> dict[str, Any]:
    """Hits as `Index.search` returns them; the query is embedded with the index's model."""
    from embedpipe.errors import RequestTooLarge

    grant.require("read", name, what="search")
    limit = state.settings.server.max_k
    if body.k > limit:
        raise RequestTooLarge(f"k = {body.k} is over [server] max_k = {limit}")
    index = state.index(name)
    version = index.live()
    if body.query is not None:
        hits = index.search(body.query, k=body.k, filter=body.filter, group_by_doc=body.group_by_doc,
                            sensitive=body.sensitive)
    else:
        hits = index.search_vector(body.vector, k=body.k, filter=body.filter,  # type: ignore[arg-type]
                                   group_by_doc=body.group_by_doc, fingerprint=body.fingerprint)
    return {"index": name, "collection": version.collection, "profile": version.profile,
            "fingerprint": version.fingerprint, "hits": [h.to_dict() for h in hits]}


@router.post("/v1/indexes/{name}/answer", tags=["indexes"], responses=ERRORS)
def answer(name: str, body: AnswerRequest, state: State, grant: GrantDep) -> dict[str, Any]:
    """A grounded answer (`Index.answer`, `embedpipe ask`): the `k` best documents, the
    question embedded with the index's model, answered through the chat gateway, citing
    document ids. Needs `read` on the index and `chat`."""
    from embedpipe.errors import RequestTooLarge
    from embedpipe.rag import answer as grounded

    grant.require("read", name, what="search")
    grant.require("chat", what="chat")
    if body.k > state.settings.server.max_k:
        raise RequestTooLarge(f"k = {body.k} is over [server] max_k = {state.settings.server.max_k}")
    params = {n: v for n in ("max_tokens", "temperature") if (v := getattr(body, n)) is not None}
    return grounded(state.index(name), body.question, k=body.k, gateway=state.gateway(),
                    sensitive=body.sensitive, **params).to_dict()


@router.post("/v1/indexes/{name}/documents", tags=["indexes"], responses=ERRORS)
def add_documents(name: str, body: DocumentsRequest, state: State, grant: GrantDep) -> dict[str, Any]:
    """Add or update documents as `embedpipe ingest` does: the whole batch is checked
    first (a bad one changes nothing), unchanged documents are not re-embedded, and a new
    index goes live only once it holds them all. The report is `ingest --json`'s."""
    from embedpipe.errors import RequestTooLarge
    from embedpipe.ingest import ingest_documents
    from embedpipe.layout import check_index_name
    from embedpipe.sources import documents_from_records

    grant.require("write", name, what="documents")
    check_index_name(name)
    limit = state.settings.server.max_batch
    if len(body.documents) > limit:
        raise RequestTooLarge(f"documents: {len(body.documents)} in one request, over [server] "
                              f"max_batch = {limit}; send smaller batches")
    documents = documents_from_records(d.model_dump() for d in body.documents)
    if body.dry_run:  # writes nothing, so it needs no turn
        return ingest_documents(state.settings, name, documents, profile=body.profile,
                                dry_run=True).to_dict()
    with state.write_turn():
        report = ingest_documents(state.settings, name, documents, profile=body.profile)
    return report.to_dict()


@router.delete("/v1/indexes/{name}/documents/{doc_id:path}", tags=["indexes"],
               response_model=DeleteResponse, responses=ERRORS)
def delete_document(name: str, doc_id: str, state: State, grant: GrantDep) -> dict[str, Any]:
    """Remove a document from every version of the index and from its corpus."""
    from embedpipe.errors import DocumentNotFound
    from embedpipe.ingest import delete

    grant.require("write", name, what="deleting documents")
    with state.write_turn():
        held = delete(state.settings, name, [doc_id])
    if not held:
        raise DocumentNotFound(f"index {name!r} holds no document {doc_id!r}")
    return {"index": name, "id": doc_id, "deleted": True}


@router.post("/v1/jobs", tags=["jobs"], status_code=202, response_model=JobOut, responses=ERRORS)
def start_job(body: JobRequest, state: State, grant: GrantDep) -> dict[str, Any]:
    """Start an ingest, sync, plan, migrate, rollback or retire in the server, as the CLI
    command of that name would run it; answers at once (202) with the job to follow.
    The command's own refusals (a busy index, an unknown profile) land in the job's
    `error`, with the exit code the command would have."""
    from embedpipe.layout import check_index_name

    grant.require("write", body.index, what=f"{body.kind} jobs")
    check_index_name(body.index)
    return state.jobs.start(body.kind, body.index, body.params()).to_dict()


@router.get("/v1/jobs", tags=["jobs"], response_model=list[JobOut], responses=ERRORS)
def list_jobs(state: State, grant: GrantDep, index: Optional[str] = None) -> list[dict[str, Any]]:
    """The server's jobs, oldest first (running ones and the last finished ones), of the
    indexes the key may read or write."""
    if not grant.may("write", index):
        grant.require("read", index, what="listing jobs")
    return [j.to_dict() for j in state.jobs.list()
            if (index is None or j.index == index) and _may_see(grant, j.index)]


def _may_see(grant: Any, index: str) -> bool:
    """A job is seen by a key that may read its index, or write it (who started it)."""
    return bool(grant.may("read", index) or grant.may("write", index))


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=ERRORS)
def get_job(job_id: str, state: State, grant: GrantDep) -> dict[str, Any]:
    """One job: its state, progress (`done` of `total` in bar `step`), result or error."""
    job = state.jobs.get(job_id)
    if not _may_see(grant, job.index):
        grant.require("read", job.index, what="jobs")
    return job.to_dict()


@router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], status_code=202, response_model=JobOut,
             responses=ERRORS)
def cancel_job(job_id: str, state: State, grant: GrantDep) -> dict[str, Any]:
    """Ask a job to stop at its next batch boundary. What it wrote is kept; the command
    run again resumes it. A finished job is answered as it ended."""
    job = state.jobs.get(job_id)
    grant.require("write", job.index, what="cancelling jobs")
    return state.jobs.cancel(job_id).to_dict()


def create_app(settings: Settings, keys: KeyRing | None = None) -> FastAPI:
    """The application for one data directory (``settings.data_dir``); ``keys``: the API
    keys it accepts (default: those ``settings`` configure)."""
    from embedpipe import __version__
    from embedpipe.serve.keys import KeyRing
    from embedpipe.serve.openai_api import router as openai_router

    keys = KeyRing(settings) if keys is None else keys
    app = FastAPI(title="embedpipe", version=__version__, description=DESCRIPTION,
                  docs_url="/docs", redoc_url=None)
    app.state.embedpipe = ServerState(settings, keys)
    errors.install(app)
    # The last one added is outermost: keys are checked first, before any body is read.
    app.add_middleware(errors.Unexpected)
    app.add_middleware(errors.BodyLimit, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(Authenticate, keys=keys, server=settings.server)
    app.include_router(router)
    app.include_router(openai_router)
    return app
