"""Where embedpipe keeps its files under the data directory, built in one place::

    <data>/                              0700, like every folder embedpipe makes
      corpus/<index>/seg-*.parquet         the corpus, the source of truth (corpus.py)
      vectors/<fingerprint[:16]>/          computed vectors, by embedding space (vectors.py)
      engine/                              Qdrant Edge: catalogue.json, a shard per version
        <index>__<profile>__v<N>/          (engine/edge.py); unused with qdrant.url
      qdrant/                              qdrant-client local mode of earlier releases
                                           (converted to engine/ on first use)
      locks/<index>[.<what>].lock          one writer per index (locks.py)
      migrations/<index>/                  migration progress and reports (migration.py)
      adapters/<index>/<version>/<id>/     query adapters into a version's space:
                                           adapter.json, weights.npy (adapters.py)
      runs/<index>.jsonl                   the sync run log (sync.py)
      pending/<index>.json                 documents an ingest is writing (ingest.py)
      usage/ledger.jsonl                   hosted usage and cost (usage.py)
      gateway/audit.jsonl                  chat requests, no content (gateway.py)
      server.json                          the running `embedpipe serve`: url, pid (serve/)
      server.lock                          flock'ed by that server while it runs
      jobs/<id>.json                       that server's jobs: ingest, sync, migrate... (serve/jobs.py)
      watch/last.json                      the last deprecation watch, a row per live index (watch.py)
      batches/<index>/<fp[:16]>.json      Batch API state: file and batch ids per index and space (batch.py)

Every path that holds an index name is built by :class:`Layout`, and every one of its
methods passes the name through :func:`check_index_name` first: the one check, so a name
such as ``../../x`` never reaches the file system, whichever command or library call
brought it. No other module joins an index name onto the data directory.

A data directory that group or others can write is logged as a warning, once per
process (:func:`mode_warning`); ``embedpipe status`` prints it too.
"""

from __future__ import annotations

import logging
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from embedpipe.errors import ConfigError

__all__ = ["Layout", "check_index_name", "mode_warning", "parse_version_name", "version_name"]

log = logging.getLogger(__name__)

MAX_NAME = 64  # room for a collection name, a lock suffix and any file system's 255 bytes
_FINGERPRINT = re.compile(r"[0-9a-f]{16,}")

_checked: set[str] = set()
_checked_lock = threading.Lock()


def check_index_name(index: str) -> str:
    """Refuse any index name but letters, digits, '-' and single '_' (at most 64): it names
    folders, files, a Qdrant alias and collections. Returns the name."""
    if (not isinstance(index, str) or not index or len(index) > MAX_NAME or "__" in index
            or not all(c.isalnum() or c in "-_" for c in index)):
        raise ConfigError(
            f"invalid index name {index!r}; use letters, digits, '-' and single '_' "
            f"(at most {MAX_NAME})"
        )
    return index


def version_name(index: str, profile: str, number: int) -> str:
    """The name of version ``number`` of an index: its collection or shard folder."""
    return f"{check_index_name(index)}__{profile}__v{int(number)}"


def parse_version_name(name: str) -> tuple[str, str, int] | None:
    """(index, profile, number) of a version name; None for any other name."""
    parts = name.split("__")
    if len(parts) != 3 or not parts[2].startswith("v") or not parts[2][1:].isdigit():
        return None
    return parts[0], parts[1], int(parts[2][1:])


def mode_warning(root: Path, log_it: bool = True) -> str | None:
    """The warning for a data directory others can write, the first time it is asked in
    this process (None after that, or when the folder is private or absent). ``log_it``
    also logs it; ``embedpipe status`` prints it itself instead."""
    key = str(root)
    with _checked_lock:
        if key in _checked:
            return None
        _checked.add(key)
    try:
        mode = stat.S_IMODE(Path(root).stat().st_mode)
    except OSError:
        return None
    who = [name for bit, name in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    if not who:
        return None
    warning = (
        f"the data directory {root} is writable by {' and '.join(who)} (mode {mode:04o}): they "
        f"can change the corpus, the vectors and the indexes; run `chmod go-rwx {root}` "
        "(embedpipe creates it 0700)"
    )
    if log_it:
        log.warning(warning)
    return warning


@dataclass(frozen=True)
class Layout:
    """The paths under one data directory; see the module docstring."""

    root: Path

    def __post_init__(self) -> None:
        mode_warning(self.root)

    @property
    def engine(self) -> Path:
        """Qdrant Edge's folder: the catalogue and a shard per version."""
        return self.root / "engine"

    def corpus(self, index: str) -> Path:
        return self.root / "corpus" / check_index_name(index)

    def migrations(self, index: str) -> Path:
        return self.root / "migrations" / check_index_name(index)

    def adapters(self, index: str) -> Path:
        """Query adapters of an index's versions: ``adapters/<index>/<version>/<id>/``."""
        return self.root / "adapters" / check_index_name(index)

    def batch_state(self, index: str, fingerprint: str) -> Path:
        """The Batch API state (batch and file ids, what each holds) of an index's texts
        in one embedding space: a killed ``--batch`` run resumes polling from it."""
        return self.root / "batches" / check_index_name(index) / f"{fingerprint[:16]}.json"

    def runs(self, index: str) -> Path:
        return self.root / "runs" / f"{check_index_name(index)}.jsonl"

    def pending(self, index: str) -> Path:
        return self.root / "pending" / f"{check_index_name(index)}.json"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def lock(self, index: str, what: str = "") -> Path:
        """``locks/<index>.lock``, or ``locks/<index>.<what>.lock`` for a lock of its own
        (index names hold no '.', so the two never meet)."""
        check_index_name(index)
        if what and not what.isalnum():
            raise ConfigError(f"invalid lock name {what!r}")
        return self.locks / (f"{index}.{what}.lock" if what else f"{index}.lock")

    def vectors(self, fingerprint: str) -> Path:
        """The vector store of one embedding space, by the first 16 hex digits of its fingerprint."""
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise ConfigError(f"invalid fingerprint {fingerprint!r}; expected hex digits")
        return self.root / "vectors" / fingerprint[:16]

    @property
    def usage_ledger(self) -> Path:
        return self.root / "usage" / "ledger.jsonl"

    @property
    def audit_log(self) -> Path:
        return self.root / "gateway" / "audit.jsonl"

    @property
    def server_info(self) -> Path:
        """``server.json``: where the server that owns this data directory listens."""
        return self.root / "server.json"

    @property
    def jobs(self) -> Path:
        """The server's job records, one ``<id>.json`` each."""
        return self.root / "jobs"

    @property
    def watch_report(self) -> Path:
        """``watch/last.json``: the last deprecation watch (``embedpipe watch``)."""
        return self.root / "watch" / "last.json"

    @property
    def server_lock(self) -> Path:
        """Held (flock) by that server for as long as it runs: one per data directory."""
        return self.root / "server.lock"
