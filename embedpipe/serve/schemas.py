"""Request and response bodies of ``embedpipe serve``, as pydantic models.

Requests refuse fields they do not know (``extra="forbid"``), so a misspelt option is
a 400 that names it rather than something silently ignored. What the library checks
anyway (a blank text, a duplicate id, a filter's shape) is left to the library, so the
server and the CLI say the same thing about the same mistake.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

__all__ = [
    "AnswerRequest", "ChatMessage", "ChatRequest", "DeleteResponse", "DocumentIn", "DocumentsRequest",
    "EmbeddingsRequest", "EmbeddingsResponse", "ErrorBody", "HitOut", "JOB_PARAMS", "JobOut",
    "JobRequest", "SearchRequest", "SearchResponse", "StreamOptions",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str  # the embedpipe error class (IndexNotFound, InputError, ...), or InvalidRequest
    message: str  # one line: what went wrong and what to do
    param: Optional[str] = None  # the request field at fault, when one is


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"type", "message", "param"}}``, never a stack trace."""

    error: ErrorDetail


# --- indexes ---------------------------------------------------------------------------


class SearchRequest(_Request):
    """A query text (embedded with the index's own model) or a vector made in its space."""

    query: Optional[str] = Field(default=None, description="Text to search for.")
    vector: Optional[list[float]] = Field(
        default=None, description="A query vector of the index's dimension, instead of `query`.")
    fingerprint: Optional[str] = Field(
        default=None, description="With `vector`: the space it was made in; checked against the index's.")
    k: int = Field(default=10, ge=1, description="How many hits (at most [server] max_k).")
    filter: Optional[dict[str, Any]] = Field(
        default=None, description='Metadata field -> value, e.g. {"lang": "en", "year": [2023, 2024]}.')
    group_by_doc: bool = Field(default=False, description="Chunked index: the best chunk of each document.")
    sensitive: bool = Field(default=False, description="Refuse if the index's model is hosted.")

    @model_validator(mode="after")
    def _query_or_vector(self) -> SearchRequest:
        if (self.query is None) == (self.vector is None):
            raise ValueError("send exactly one of query and vector")
        if self.fingerprint is not None and self.vector is None:
            raise ValueError("fingerprint goes with vector (a query is embedded by the index itself)")
        return self


class AnswerRequest(_Request):
    """A question answered from the index's best documents through the chat gateway."""

    question: str = Field(min_length=1)
    k: int = Field(default=5, ge=1, description="Documents retrieved (at most [server] max_k).")
    sensitive: bool = Field(default=False, description="Neither the query embedding nor the chat may be hosted.")
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)


class HitOut(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any]
    text: Optional[str] = None
    chunk_id: Optional[str] = None
    chunk: Optional[int] = None
    start: Optional[int] = None
    end: Optional[int] = None
    via: Optional[str] = None  # "adapter <id> (<profile>)": the query went through an adapter


class SearchResponse(BaseModel):
    index: str
    collection: str  # the version searched
    profile: str
    fingerprint: str  # the space the query was embedded in
    hits: list[HitOut]


class DocumentIn(_Request):
    id: Union[StrictStr, StrictInt]
    text: StrictStr
    metadata: dict[str, Any] = {}


class DocumentsRequest(_Request):
    """A batch written like ``embedpipe ingest``: all checked first, unchanged ones skipped."""

    documents: list[DocumentIn] = Field(min_length=1, description="At most [server] max_batch.")
    profile: Optional[str] = Field(
        default=None, description="A new index's model profile (default: the configured one).")
    dry_run: bool = Field(default=False, description="Validate and diff only; write nothing.")


class DeleteResponse(BaseModel):
    index: str
    id: str
    deleted: bool


# --- jobs ------------------------------------------------------------------------------

# The fields each kind of job takes (the CLI options of the command it runs).
JOB_PARAMS: dict[str, tuple[str, ...]] = {
    "ingest": ("path", "profile", "dry_run", "skip_invalid"),
    "sync": ("allow_mass_delete", "dry_run", "prefect"),
    "plan": ("to", "dry_run", "probe"),
    "migrate": ("to", "golden", "force", "tolerance", "plan"),
    "rollback": ("force",),
    "retire": ("keep", "abandon", "dry_run"),
    "watch": ("warn_days",),
    "adapt": ("to", "sample", "adapter_kind", "golden", "force"),
}
_NEEDED = {"ingest": ("path",), "plan": ("to",), "migrate": ("to",), "adapt": ("to",)}


class JobRequest(_Request):
    """A long job run by the server as the CLI command of that name runs it. Paths are
    read by the server: absolute, on its machine (or a file system it shares)."""

    kind: Literal["ingest", "sync", "plan", "migrate", "rollback", "retire", "adapt", "watch"] = Field(
        description="ingest, sync, plan (what `migrate --dry-run` prints), migrate, rollback, retire, "
                    "adapt (fit a query adapter), watch (the deprecation watch of one index).")
    index: str
    path: Optional[str] = Field(default=None, description="ingest: a .jsonl/.parquet file or a folder.")
    profile: Optional[str] = Field(default=None, description="ingest: a new index's model profile.")
    dry_run: bool = False
    skip_invalid: Optional[bool] = None
    allow_mass_delete: bool = False
    prefect: bool = Field(default=False, description="sync: run as a Prefect flow.")
    to: Optional[str] = Field(default=None, description="plan, migrate: the target profile.")
    probe: bool = False
    golden: Optional[str] = Field(default=None, description="migrate, adapt: a golden-queries JSONL file.")
    force: bool = False
    tolerance: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    plan: Optional[dict[str, Any]] = Field(default=None, description="migrate: the plan a `plan` job returned.")
    keep: int = Field(default=1, ge=0)
    abandon: bool = False
    warn_days: Optional[int] = Field(default=None, ge=0, le=3650,
                                     description="watch: the horizon in days (default [watch] warn_days).")
    sample: Optional[int] = Field(default=None, ge=16, description="adapt: pairs to fit on.")
    adapter_kind: Optional[Literal["auto", "procrustes", "ridge", "lowrank"]] = Field(
        default=None, description="adapt: the map's kind (default [adapter] kind).")

    @model_validator(mode="after")
    def _fits_kind(self) -> JobRequest:
        takes = JOB_PARAMS[self.kind]
        extra = sorted(self.model_fields_set - set(takes) - {"kind", "index"})
        if extra:
            raise ValueError(f"{', '.join(extra)} do{'es' if len(extra) == 1 else ''} not apply to "
                             f"{self.kind} jobs (they take {', '.join(takes)})")
        for name in _NEEDED.get(self.kind, ()):
            if getattr(self, name) is None:
                raise ValueError(f"{self.kind} jobs need {name}")
        for name in ("path", "golden"):
            value = getattr(self, name)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{name} {value!r} is relative; send an absolute path on the server's machine")
        return self

    def params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in JOB_PARAMS[self.kind]}


class JobProgress(BaseModel):
    step: int  # which bar: a migration's backfill is 1, its catch-up 2
    done: int
    total: Optional[int] = None


class JobOut(BaseModel):
    id: str
    kind: str
    index: str
    params: dict[str, Any]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    created: float  # Unix seconds
    started: Optional[float] = None
    finished: Optional[float] = None
    progress: JobProgress
    result: Optional[dict[str, Any]] = None  # the command's --json report
    error: Optional[dict[str, Any]] = None  # {type, message, exit_code}
    cancel_requested: bool = False


# --- OpenAI protocol ---------------------------------------------------------------------


class EmbeddingsRequest(_Request):
    """OpenAI's embeddings request; ``model`` is a profile name or ``index:<name>``."""

    model: str = Field(description='A profile (see /v1/models) or "index:<name>": that index\'s own model.')
    input: Union[str, list[str]] = Field(description="A text or a list of texts (token arrays are not accepted).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, description="Must equal the model's own, if given.")
    user: Optional[str] = None
    input_type: Literal["document", "query"] = Field(
        default="document", description="Which of the profile's prompts to apply (an embedpipe extension).")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not isinstance(v, str) for v in value):
            raise ValueError("send a string or a list of strings; token arrays are not accepted")
        return value


class EmbeddingOut(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # base64: little-endian float32


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str
    usage: Usage
    fingerprint: str  # also in the X-Embedpipe-Fingerprint header
    profile: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id: passed on as they are

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatRequest(_Request):
    """OpenAI's chat request, answered through the gateway's route (``[chat]``): the route,
    not ``model``, decides which backend answers; the reply names it."""

    model: str = Field(description="Accepted for compatibility; the gateway's route picks the backend.")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    n: Optional[int] = Field(default=None, ge=1, le=1, description="Only 1.")
    user: Optional[str] = Field(default=None, description="Accepted; not passed on to backends.")
    sensitive: bool = Field(default=False, description="Never send this to a hosted backend (an embedpipe extension).")

    def params(self) -> dict[str, Any]:
        """What the gateway passes to the backend."""
        names = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                 "presence_penalty", "frequency_penalty")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
