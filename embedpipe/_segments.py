"""Append-only Parquet segment folders, shared by the corpus and the vector store.

Parquet files are immutable, so a store with upsert-by-key is a folder of numbered
segments read newest-wins. Every file is written under a temporary name and renamed
into place, so a crash never leaves a half-written file that looks valid. Writers
hold a lock file; readers need none (a rename is atomic).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from embedpipe.errors import StoreError

__all__ = ["SegmentFolder", "read_batches"]

_SEGMENT = re.compile(r"^seg-(\d{8})\.parquet$")


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

    def __init__(self, root: Path, schema: pa.Schema) -> None:
        self.root = root
        self.schema = schema

    @property
    def lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

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
        """A streaming writer for one new segment; nothing is visible until ``commit()``."""
        self.root.mkdir(parents=True, exist_ok=True)
        return SegmentWriter(self)

    def write(self, table: pa.Table) -> Path | None:
        """Write one table as a new segment (no-op for an empty table)."""
        if table.num_rows == 0:
            return None
        writer = self.open_writer()
        writer.write(table)
        return writer.commit()

    def read_columns(self, path: Path, columns: list[str]) -> pa.Table:
        try:
            return pq.read_table(path, columns=columns)
        except FileNotFoundError:
            raise _vanished(path) from None
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(
                f"{path} is not a readable Parquet file ({exc}); move it out of {self.root} "
                "and re-ingest the affected documents"
            ) from exc

    def iter_batches(
        self, path: Path, columns: list[str] | None = None, batch_size: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        try:
            yield from read_batches(path, columns, batch_size)
        except FileNotFoundError:
            raise _vanished(path) from None
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(
                f"{path} is not a readable Parquet file ({exc}); move it out of {self.root} "
                "and re-ingest the affected documents"
            ) from exc

    def replace_all(self, writer: SegmentWriter, old: list[Path]) -> Path | None:
        """Commit ``writer`` as the newest segment, then delete ``old`` (compaction).

        A crash between the two steps leaves duplicates that newest-wins reading
        already resolves, so the next compaction simply tidies up.
        """
        new = writer.commit()
        for path in old:
            if path != new:
                path.unlink(missing_ok=True)
        return new


def _vanished(path: Path) -> StoreError:
    return StoreError(f"{path} was removed while being read (another process compacted the "
                      "store); nothing is wrong with the data: re-run the command")


class SegmentWriter:
    """Writes record batches to a temporary file; ``commit()`` renames it into place."""

    def __init__(self, folder: SegmentFolder) -> None:
        self.folder = folder
        self.tmp = folder.root / f".tmp-{uuid.uuid4().hex}.parquet"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if data.num_rows == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.folder.schema, compression="zstd")
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        self._writer.write_table(table.cast(self.folder.schema))
        self.rows += data.num_rows

    def finish(self) -> Path | None:
        """Close the file without committing it (a staged file); None if nothing was written."""
        if self._writer is None:
            return self.tmp if self.tmp.exists() else None
        self._writer.close()
        self._writer = None
        return self.tmp

    def commit(self) -> Path | None:
        """Make the segment visible under the next sequence number (None if empty)."""
        if self.finish() is None:
            return None
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        target = self.folder._next_path()
        os.replace(self.tmp, target)
        return target

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.tmp.unlink(missing_ok=True)
