"""The index locks shared by ingest, sync, migrations, rollback and retire.

``locks/<index>.lock`` admits one writer of an index at a time (an ingest or sync, a
migration's cutover, a rollback); ``locks/<index>.migrate.lock`` admits one migration,
rollback or retire while ingests go on. Lock files are 0600 in a 0700 folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from embedpipe._files import FILE_MODE, make_dir, writing
from embedpipe.errors import IndexBusy
from embedpipe.layout import Layout

if TYPE_CHECKING:
    from embedpipe.config import Settings

__all__ = ["index_lock", "migration_running"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def index_lock(settings: Settings, index: str, timeout: float = 0, what: str = "") -> Iterator[None]:
    """One writer per index at a time: ingest, and a migration's cutover or a rollback.

    ``what`` names a longer-held lock of its own (``"migrate"``: one migration per
    index, while ingests go on). Waits up to ``timeout`` seconds, then raises IndexBusy.
    A data directory that cannot be written fails here, before any work, as a
    DataDirError.
    """
    layout = Layout(settings.data_dir)
    path = layout.lock(index, what)  # checks the name before anything touches the disk
    make_dir(layout.locks)
    lock = FileLock(str(path), timeout=timeout, mode=FILE_MODE)
    try:
        with writing(layout.locks):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if not timeout:
                    raise
                log.warning("index %r is busy (an ingest is running); waiting up to %.0f s", index, timeout)
                lock.acquire(timeout=timeout)
    except Timeout:
        holder = "a migration or rollback" if what else "an ingest, migration cutover or rollback"
        raise IndexBusy(
            f"{holder} is already running on index {index!r}; wait for it to finish and re-run"
        ) from None
    try:
        yield
    finally:
        lock.release()


def migration_running(settings: Settings, index: str) -> bool:
    """Whether a migration, rollback or retire holds the index's migrate lock now."""
    try:
        with index_lock(settings, index, timeout=0, what="migrate"):
            return False
    except IndexBusy:
        return True
