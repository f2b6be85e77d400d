"""The one exception tree of embedpipe.

Every error a user can cause or fix derives from :class:`EmbedpipeError`; its message
is one line that says what went wrong and what to do about it. Errors from
third-party libraries (qdrant-client, pyarrow, sentence-transformers) are converted
at the boundary with ``raise ... from exc`` so callers only ever catch this tree.

    EmbedpipeError
    ├── ConfigError                 bad or missing configuration
    │   ├── UnknownProfile          a profile name that is not in the catalogue
    │   ├── SovereigntyError        sovereign mode or a sensitive request refuses a hosted profile
    │   └── KeyFileInvalid          the server's API key file (or key variable) is unreadable or
    │                               malformed (a running server answers 503 until it is fixed)
    ├── ModelError                  a model cannot be used
    │   ├── WeightsNotFound         local weights missing (says where it looked and names
    │   │                           `embedpipe models pull`)
    │   ├── DownloadFailed          `models pull` could not reach the Hub or mirror, or a
    │   │                           transfer broke; nothing was kept, re-run (exit 69)
    │   ├── ChecksumMismatch        a pulled file is not the one the catalogue (or the Hub's
    │   │                           listing) names: refused, nothing kept (exit 65)
    │   ├── DimensionMismatch       model output width differs from the profile
    │   ├── ModelDeprecated         a hosted model was retired (says what to migrate to)
    │   └── ProviderError           a hosted endpoint refused or failed (key, reach, protocol)
    │       └── KeyRefused          the endpoint refused the API key (HTTP 401/403)
    ├── FingerprintMismatch         query embedder and index were made by different spaces
    ├── InputError                  bad documents; nothing was written
    │   ├── SourceUnavailable       an index's source is missing (unmounted?); nothing changed
    │   ├── MassDeleteRefused       a sync would delete too much of an index; nothing changed
    │   └── RequestTooLarge         a server request over a [server] limit (HTTP 413)
    ├── IndexNotFound               no such index (alias) exists
    ├── DocumentNotFound            no document of that id in the index
    ├── JobNotFound                 the server holds no job of that id
    ├── StoreError                  the corpus or vector Parquet files are unusable
    ├── DataDirError                the data directory cannot be written; nothing more was
    │   │                           written, and a re-run resumes once it can be
    │   ├── DataDirReadOnly         a read-only file system, or no permission (exit 73)
    │   └── DiskFull                no space left on its device, or over quota (exit 74)
    ├── EngineError                 the vector engine failed
    │   ├── ShardUnreadable         a version's Qdrant Edge shard is missing or damaged (exit 66;
    │   │                           `embedpipe rebuild` recreates it from the Parquet files)
    │   └── QdrantUnavailable       the Qdrant server cannot be reached
    ├── IndexBusy                   another ingest or migration holds the index
    ├── PrefectUnavailable          the Prefect server in PREFECT_API_URL cannot be reached
    ├── ExecutionError              a distributed run (--executor ray) cannot go on: Ray missing
    │                               or unreachable, or a worker refused (names its host)
    ├── BatchError                  a Batch API run cannot go on (its state file belongs to another
    │                               space, a batch cannot be created or polled); what was stored
    │                               is kept, and the same call resumes the same batches
    ├── ServerUnavailable           the embedpipe server to go through does not answer
    ├── JobCancelled                a server job was cancelled (or stopped with the server);
    │                               what it wrote is kept, and re-running it resumes
    ├── AccessError                 embedpipe serve refused the request's API key; nothing was done
    │   ├── AuthenticationRequired  no key, or one the server does not know (HTTP 401)
    │   ├── AccessDenied            the key lacks the scope or the index asked for (HTTP 403)
    │   └── RateLimited             the key is over its requests per minute (HTTP 429)
    ├── GatewayError                a chat request could not be served
    │   ├── NoBackendAvailable      every allowed backend failed, or policy left none
    │   ├── ChatRequestRejected     a backend refused the request itself (400): not retried elsewhere
    │   └── StreamInterrupted       a stream failed after its first token (no fallback then)
    └── MigrationError              a migration, rollback or retire cannot go on
        ├── NothingToMigrate        the index already lives in the target's space
        ├── ValidationFailed        the new version failed the validation gate
        │   └── AdapterRefused      a query adapter kept too little of the old model's
        │                           retrieval: a full re-index is needed (--force overrides)
        └── NoAdapter               queries need an adapter (query_via, a retired model)
                                    and the live version has none accepted
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AdapterRefused",
    "AccessError",
    "AuthenticationRequired",
    "BatchError",
    "ConfigError",
    "DataDirError",
    "DataDirReadOnly",
    "DimensionMismatch",
    "DiskFull",
    "DocumentNotFound",
    "DownloadFailed",
    "EmbedpipeError",
    "EngineError",
    "ExecutionError",
    "ChatRequestRejected",
    "ChecksumMismatch",
    "FingerprintMismatch",
    "GatewayError",
    "IndexBusy",
    "IndexNotFound",
    "JobCancelled",
    "JobNotFound",
    "InputError",
    "KeyRefused",
    "KeyFileInvalid",
    "MassDeleteRefused",
    "MigrationError",
    "ModelDeprecated",
    "ModelError",
    "NoAdapter",
    "NoBackendAvailable",
    "NothingToMigrate",
    "PrefectUnavailable",
    "ProviderError",
    "QdrantUnavailable",
    "RateLimited",
    "RequestTooLarge",
    "ServerUnavailable",
    "ShardUnreadable",
    "SourceUnavailable",
    "SovereigntyError",
    "StoreError",
    "StreamInterrupted",
    "UnknownProfile",
    "ValidationFailed",
    "WeightsNotFound",
]


class EmbedpipeError(Exception):
    """Base of every error embedpipe raises on purpose."""

    exit_code = 1


class ConfigError(EmbedpipeError):
    """The configuration is invalid or incomplete."""

    exit_code = 2


class UnknownProfile(ConfigError):
    """A profile name that neither the catalogue nor the user's config defines."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(
            f"unknown profile {name!r}; known profiles: {', '.join(self.known)} "
            "(add your own under [profiles.NAME] in embedpipe.toml)"
        )


class SovereigntyError(ConfigError):
    """Sovereign mode is on, or the request is sensitive, and a profile would send text
    to a hosted API; nothing was sent."""


class KeyFileInvalid(ConfigError):
    """``embedpipe serve``'s API keys cannot be used: the key file is unreadable, not TOML,
    or has an invalid entry, or the key variable is malformed. At start the server
    refuses to run; a running server whose key file turns invalid refuses the keys it
    held (503) until the file is fixed, rather than keep a key that was meant to go."""


class ModelError(EmbedpipeError):
    """A model cannot be loaded or does not behave as its profile says."""


class WeightsNotFound(ModelError):
    """Local model weights are not where the profile says they are."""

    exit_code = 2


class DownloadFailed(ModelError):
    """``embedpipe models pull`` could not finish: the Hub (or the mirror in
    ``HF_ENDPOINT``) did not answer, answered an error, or broke a transfer off. Nothing
    was kept, so nothing half-downloaded is ever used; running the pull again starts over."""

    exit_code = 69  # EX_UNAVAILABLE: try again, or another endpoint


class ChecksumMismatch(ModelError):
    """A pulled file's SHA-256 differs from the one the catalogue records for that
    revision (or from the Hub's own listing): it was refused and nothing was kept. A
    tampered mirror, a corrupted transfer, or a catalogue hash of another revision."""

    exit_code = 65  # EX_DATAERR


class DimensionMismatch(ModelError):
    """The model's output dimension differs from the profile's ``dims``."""

    exit_code = 2


class ModelDeprecated(ModelError):
    """The provider retired the model; the index must migrate to another profile."""

    exit_code = 2


class ProviderError(ModelError):
    """A hosted or OpenAI-compatible endpoint refused the key, could not be reached,
    or answered outside the protocol (wrong dimension, wrong number of vectors)."""


class KeyRefused(ProviderError):
    """The endpoint refused the API key (HTTP 401 or 403): revoked, expired or wrong."""


class FingerprintMismatch(EmbedpipeError):
    """A query would be embedded in a different space than the index it searches."""

    exit_code = 2


class InputError(EmbedpipeError):
    """Input documents were rejected; the corpus and index were left unchanged."""

    exit_code = 2


class SourceUnavailable(InputError):
    """An index's source folder or file is missing; a sync changes nothing."""


class MassDeleteRefused(InputError):
    """A sync would delete more of an index than ``max_delete_fraction`` allows."""

    exit_code = 5


class RequestTooLarge(InputError):
    """A request to ``embedpipe serve`` is over one of the ``[server]`` limits (body bytes,
    batch size, ``k``); nothing was done. Send less, or raise the limit."""


class IndexNotFound(EmbedpipeError):
    """No index (alias) of that name exists."""

    exit_code = 2


class DocumentNotFound(EmbedpipeError):
    """The index's corpus holds no document of that id."""

    exit_code = 2


class JobNotFound(EmbedpipeError):
    """``embedpipe serve`` holds no job of that id (``embedpipe jobs`` lists them)."""

    exit_code = 2


class StoreError(EmbedpipeError):
    """A Parquet store under the data directory is corrupt or unreadable."""


class DataDirError(EmbedpipeError):
    """A file under the data directory (or Qdrant's local storage) could not be written.

    Raised in place of the ``OSError`` or ``sqlite3.OperationalError`` behind it, so a
    read-only or full disk is one line that names the folder and the fix, never a
    traceback."""

    exit_code = 74  # EX_IOERR


class DataDirReadOnly(DataDirError):
    """The data directory is on a read-only file system, or this user may not write it.
    Reads (``search``, ``status``, ``--dry-run``) still work."""

    exit_code = 73  # EX_CANTCREAT


class DiskFull(DataDirError):
    """No space is left on the data directory's device (or the user's quota is spent)."""

    exit_code = 74  # EX_IOERR


class EngineError(EmbedpipeError):
    """The vector engine failed; the message says which space and what to do."""


class ShardUnreadable(EngineError):
    """A version's Qdrant Edge shard is missing or cannot be loaded; ``embedpipe rebuild``
    recreates it from the Parquet files without embedding anything."""

    exit_code = 66  # EX_NOINPUT


class QdrantUnavailable(EngineError):
    """The Qdrant server (or local-mode folder) cannot be reached or opened."""


class IndexBusy(EmbedpipeError):
    """Another ingest, migration or rollback is writing the index, or another process has
    the data directory's embedded engine open; wait and re-run (or use a Qdrant server)."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class ExecutionError(EmbedpipeError):
    """A distributed run (``--executor ray``) cannot go on: Ray is not installed or its
    cluster does not answer, or a worker cannot load the model or its weights are not the
    driver's (the message names the worker's host). Committed partitions are kept: the
    same command resumes."""


class BatchError(EmbedpipeError):
    """A Batch API run cannot go on: its state file is unreadable or belongs to another
    embedding space, or the provider would not take or report a batch. Vectors already
    stored are kept and the batches already submitted are in the state file: the same
    call with the same state file resumes them without submitting anything twice."""


class PrefectUnavailable(EmbedpipeError):
    """The Prefect server named by ``PREFECT_API_URL`` does not answer."""


class ServerUnavailable(EmbedpipeError):
    """The embedpipe server named by ``[server] url`` or ``<data>/server.json`` does not
    answer; nothing was sent."""

    exit_code = 69  # EX_UNAVAILABLE


class JobCancelled(EmbedpipeError):
    """A job of ``embedpipe serve`` was cancelled, or the server stopped, at a batch
    boundary: every batch acknowledged before is kept, and running the command again
    resumes (a migration from its checkpoint, an ingest or sync re-diffs)."""

    exit_code = 130  # as a shell reports an interrupted command


class AccessError(EmbedpipeError):
    """``embedpipe serve`` refused a request because of its API key; nothing was done.
    Messages name the key (by its name, never the key itself), the scope or index it
    lacks and how to get one that has it."""

    exit_code = 77  # EX_NOPERM


class AuthenticationRequired(AccessError):
    """No API key, a malformed ``Authorization`` header, or a key the server does not
    know (HTTP 401 with ``WWW-Authenticate: Bearer``)."""


class AccessDenied(AccessError):
    """The key is valid but not for this scope (read, write, chat) or this index (HTTP 403)."""


class RateLimited(AccessError):
    """The key is over its requests per minute (HTTP 429, ``Retry-After`` seconds)."""

    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GatewayError(EmbedpipeError):
    """A chat request could not be served; the audit log says what each backend did."""


class NoBackendAvailable(GatewayError):
    """Every backend the route and the policy allow failed, or none is allowed."""

    exit_code = 69  # EX_UNAVAILABLE


class ChatRequestRejected(GatewayError):
    """A backend refused the request itself (HTTP 400/413/422); another would too."""

    exit_code = 2


class StreamInterrupted(GatewayError):
    """A stream failed after its first token reached the caller: it is not replayed."""


class MigrationError(EmbedpipeError):
    """A migration, rollback or retire cannot go on; the alias was not moved."""


class NothingToMigrate(MigrationError):
    """The index is already live in the target's embedding space (the CLI exits 0)."""


class ValidationFailed(MigrationError):
    """The new version scored worse than the old beyond the tolerance; ``--force`` overrides."""

    exit_code = 4


class AdapterRefused(ValidationFailed):
    """A fitted query adapter retained less than ``[adapter] min_retention`` of the old
    model's retrieval; it was not put in use (``--force`` does, and it is recorded)."""


class NoAdapter(MigrationError):
    """Queries must go through an adapter and the live version has none accepted."""

    exit_code = 2
