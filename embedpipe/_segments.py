"""Append-only Parquet segment folders, shared by the corpus and the vector store.

Parquet files are immutable, so a store with upsert-by-key is a folder of numbered
segments read newest-wins. Every file is written under a temporary name and renamed
into place, so a crash never leaves a half-written file that looks valid. Writers
hold a lock file; readers need none (a rename is atomic). Files are created 0600.

A temporary name says which process writes it (``.tmp-<host>-<pid>-<random>.parquet``).
A killed run leaves its temporary files behind; the first writer of a folder in a later
process removes them, holding the folder's lock, and only those whose writer is known to
be gone: its process no longer runs on this host. A temporary file of another host (or
pid namespace), or one named before owners were recorded, goes once it is a week old.

Compaction (a store's own policy) writes its merged segment first and deletes the ones it
replaces after, so a reader holding a list of segments can find one gone: it sees a
``SegmentVanished`` (a ``StoreError``), re-reads the list and retries. Segment numbers
only grow, so a name never comes back with other rows in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from embedpipe._files import FILE_MODE, create_private, make_dir, writing
from embedpipe.errors import StoreError

__all__ = ["ROW_GROUP_ROWS", "STALE_AFTER_S", "SegmentFolder", "SegmentVanished", "read_batches"]

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^seg-(\d{8})\.parquet$")
_TEMPORARY = re.compile(r"^\.tmp-(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{32}\.parquet$")
# A temporary file whose writer cannot be checked (another host, or named before writers
# were recorded) is a leftover once it is this old: no staged file lives a week.
STALE_AFTER_S = 7 * 24 * 3600
# Rows per Parquet row group: readers decode one group at a time, so this bounds their
# memory (4096 vectors of 384 float32 are 6 MiB) however large a compacted segment grows.
ROW_GROUP_ROWS = 4096


class SegmentVanished(StoreError):
    """A segment was removed between listing and reading it: another process compacted the
    folder. Nothing is lost (its rows are in a newer segment); list again and retry."""


def _host() -> str:
    """This host and pid namespace, in 8 hex digits: pids are only comparable within it."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


_HOST = _host()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def read_batches(
    path: Path, columns: list[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows in batches, read one row group at a time.

    Why not ``ParquetFile.iter_batches``: its reader decodes ahead across row groups,
    and Arrow's memory pool keeps that high-water mark after the read (about 90 MiB
    on a 100k-document staged file), so a long build's RSS grows with the corpus. One
    row group at a time bounds it by the largest group (writers here write 4096-row
    groups), and the unused pool is handed back to the system once the file is read.
    """
    pf = pq.ParquetFile(path)
    try:
        for group in range(pf.num_row_groups):
            yield from pf.read_row_group(group, columns=columns).to_batches(batch_size)
    finally:
        pf.close()
        pa.default_memory_pool().release_unused()


class SegmentFolder:
    """A folder of ``seg-NNNNNNNN.parquet`` files with one schema."""

    def __init__(self, root: Path, schema: pa.Schema, use_dictionary: bool = True) -> None:
        """``use_dictionary``: Parquet dictionary encoding; worth turning off for columns of
        unique or noisy values (hashes, vectors), where it is tried, abandoned after a
        megabyte, and that megabyte kept in every row group."""
        self.root = root
        self.schema = schema
        self.use_dictionary = use_dictionary
        self._swept = False

    @property
    def lock(self) -> FileLock:
        """The folder's writer lock; one object per file in this process, so it is
        re-entrant (a compaction holding it opens a writer, which sweeps under it)."""
        make_dir(self.root)
        return FileLock(str(self.root / ".lock"), mode=FILE_MODE, is_singleton=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock; a disk that cannot be written fails as a DataDirError."""
        lock = self.lock
        with writing(self.root):
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def sweep(self) -> list[Path]:
        """Remove temporary files whose writer is gone (see the module docstring), under
        the folder's lock; skipped while another process holds it. Returns what went."""
        lock = self.lock
        with writing(self.root):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return []  # a writer is busy here: the next run tidies up
            try:
                stale = [p for p in self.root.iterdir() if _stale(p)]
                for path in stale:
                    path.unlink(missing_ok=True)
            finally:
                lock.release()
        if stale:
            log.info("removed %d temporary files a killed run left in %s", len(stale), self.root)
        return stale

    def segments(self) -> list[Path]:
        """Committed segments, oldest first. Leftover temporary files are ignored."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _SEGMENT.match(p.name))]
        return [p for _, p in sorted(found)]

    def _next_path(self) -> Path:
        existing = self.segments()
        last = int(_SEGMENT.match(existing[-1].name).group(1)) if existing else 0  # type: ignore[union-attr]
        return self.root / f"seg-{last + 1:08d}.parquet"

    def open_writer(self) -> SegmentWriter:
        """A streaming writer for one new segment; nothing is visible until ``commit()``.
        The first one of this folder object removes what killed runs left."""
        make_dir(self.root)
        if not self._swept:
            self.sweep()
            self._swept = True
        return SegmentWriter(self)

    def write(self, table: pa.Table) -> Path | None:
        """Write one table as a new segment (no-op for an empty table)."""
        if table.num_rows == 0:
            return None
        writer = self.open_writer()
        try:
            writer.write(table)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    @contextlib.contextmanager
    def _reading(self, path: Path) -> Iterator[None]:
        """Turn a vanished segment into ``SegmentVanished``, an unreadable one into a StoreError."""
        try:
            yield
        except FileNotFoundError:
            raise _vanished(path) from None
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(
                f"{path} is not a readable Parquet file ({exc}); move it out of {self.root} "
                "and re-ingest the affected documents"
            ) from exc

    def read_columns(self, path: Path, columns: list[str]) -> pa.Table:
        with self._reading(path):
            return pq.read_table(path, columns=columns)

    def iter_batches(
        self, path: Path, columns: list[str] | None = None, batch_size: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        with self._reading(path):
            yield from read_batches(path, columns, batch_size)

    def row_count(self, path: Path) -> int:
        """Rows in a segment, from its footer alone."""
        with self._reading(path):
            return pq.read_metadata(path).num_rows

    def take(self, path: Path, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The rows at ``rows`` (in that order), decoding only the row groups that hold
        them, one at a time: a lookup in a compacted segment of a million vectors never
        holds more than one group of them besides its answer."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return self.schema.empty_table().select(columns)
        with self._reading(path):
            pf = pq.ParquetFile(path)
            try:
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes)])
                group = np.searchsorted(starts, rows, side="right") - 1
                order = np.argsort(group, kind="stable")  # the order the parts come out in
                parts = [pf.read_row_group(int(g), columns=columns).take(rows[group == g] - starts[g])
                         for g in np.unique(group)]
            finally:
                pf.close()
                pa.default_memory_pool().release_unused()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return pa.concat_tables(parts).take(back)

    def replace_all(self, writer: SegmentWriter, old: list[Path]) -> Path | None:
        """Commit ``writer`` as the newest segment, then delete ``old`` (compaction).

        A crash between the two steps leaves duplicates that newest-wins reading
        already resolves, so the next compaction simply tidies up.
        """
        new = writer.commit()
        with writing(self.root):
            for path in old:
                if path != new:
                    path.unlink(missing_ok=True)
        return new


def _stale(path: Path) -> bool:
    """Whether ``path`` is a temporary file whose writer is known to be gone."""
    found = _TEMPORARY.match(path.name)
    if found is None:
        return False
    if found["host"] == _HOST:
        return not _alive(int(found["pid"]))
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _vanished(path: Path) -> SegmentVanished:
    return SegmentVanished(f"{path} was removed while being read (another process compacted "
                           "the store); nothing is wrong with the data: re-run the command")


class SegmentWriter:
    """Writes record batches to a temporary file; ``commit()`` renames it into place."""

    def __init__(self, folder: SegmentFolder) -> None:
        self.folder = folder
        self.tmp = folder.root / f".tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}.parquet"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if data.num_rows == 0:
            return
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        with writing(self.folder.root):
            if self._writer is None:
                # Made 0600 first: Arrow opens it again (truncating), and the mode stays.
                os.close(create_private(self.tmp))
                self._writer = pq.ParquetWriter(self.tmp, self.folder.schema, compression="zstd",
                                                use_dictionary=self.folder.use_dictionary)
            self._writer.write_table(table.cast(self.folder.schema), row_group_size=ROW_GROUP_ROWS)
        self.rows += data.num_rows

    def finish(self) -> Path | None:
        """Close the file without committing it (a staged file); None if nothing was written."""
        if self._writer is None:
            return self.tmp if self.tmp.exists() else None
        writer, self._writer = self._writer, None
        with writing(self.folder.root):
            writer.close()  # the last pages reach the disk here: it can be full
        return self.tmp

    def commit(self) -> Path | None:
        """Make the segment visible under the next sequence number (None if empty)."""
        if self.finish() is None:
            return None
        with writing(self.folder.root):
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            target = self.folder._next_path()
            os.replace(self.tmp, target)
        return target

    def abort(self) -> None:
        """Drop the temporary file; never raises (it runs while another error propagates)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):  # closing a file the disk had no room for
                writer.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)
