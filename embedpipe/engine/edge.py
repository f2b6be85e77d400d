"""Qdrant Edge, in-process: the default engine when no ``qdrant.url`` is set.

Layout under the data directory::

    engine/
      catalogue.json             versions' manifests and the aliases (replaced atomically)
      engine.lock                flock'ed by the one process that has the engine open
      <index>__<profile>__v<N>/  one Edge shard per version (its own WAL and segments)

Edge has shards, not collections: no aliases, no metadata, no group-by. embedpipe keeps
the catalogue itself, as one JSON file written to a temporary name, synced and renamed,
so moving an alias together with the states it implies is one atomic step. A shard
directory is created before its catalogue entry and removed after it, so a crash
leaves at worst a folder no entry names, swept at the next open.

One process owns an engine directory at a time (Edge locks each shard's WAL; the
``engine.lock`` flock covers the catalogue too and names its holder): a second process
fails at once with IndexBusy (exit 75). Concurrent access from many processes is what a
Qdrant server (``qdrant.url``) is for. Threads of the owning process share it.

Edge's ``update`` writes its WAL without syncing; the WAL is replayed on load, so a
killed process loses nothing it acknowledged, and ``flush`` (called after every
acknowledged upsert by ``IndexVersions``) makes that survive power loss too.
Edge's ``optimize`` (the HNSW build) holds the interpreter while it runs. A process that
serves searches (``embedpipe serve`` calls :func:`build_in_child`) builds a version no
alias points to in a child process instead (``_build.py``): the shard is closed here,
built there, and loaded again on next use; a call that needs that shard meanwhile waits
for the build. A live version's refresh stays in-process: closing a shard under its
own searches would fail them.

Known quirks handled here: ids come back as ``uuid.UUID``; ``retrieve`` needs all three
arguments; a batch with a bad vector is half-applied (dimensions are checked first);
``MatchValue(True)`` never matches a stored boolean, so booleans in metadata are
mirrored as 0/1 under ``_bool`` and filters on them are pointed there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe._files import DIR_MODE, FILE_MODE, make_dir, storage_error, write_json, writing
from embedpipe.engine.base import Scored, SpaceInfo
from embedpipe.engine.filters import Match, MatchAny, Range, Where
from embedpipe.errors import EngineError, IndexBusy, ShardUnreadable

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.config import Settings

__all__ = ["EdgeEngine", "EDGE_VERSION", "build_in_child"]

log = logging.getLogger(__name__)

EDGE_VERSION = "0.9.0"  # the qdrant-edge-py the shards are written with (pinned: Edge is beta)
CATALOGUE = "catalogue.json"
LOCK = "engine.lock"
SCHEMA = 1
BOOL_SHADOW = "_bool"
_DISTANCES = {"cosine": "Cosine", "dot": "Dot", "euclid": "Euclid"}
_FIELD_TYPES = {"keyword": "Keyword", "integer": "Integer", "float": "Float", "bool": "Bool"}
_CHILD_BUILDS = {"on": False}


def build_in_child(on: bool = True) -> None:
    """Build HNSW indexes of versions that are not live in a child process, so that
    searches in this one go on meanwhile (``embedpipe serve`` turns it on)."""
    _CHILD_BUILDS["on"] = on


class EdgeEngine:
    """The :class:`~embedpipe.engine.base.Engine` on Qdrant Edge shards."""

    kind = "edge"

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = Path(root)
        self.settings = settings
        self._lock = threading.RLock()
        self._shards: dict[str, Any] = {}
        self._building: dict[str, threading.Event] = {}  # spaces a child process is building
        self.last_build_pid: int | None = None  # the process that ran the last build
        self._lock_fd: int | None = None
        self._copy: Path | None = None  # read-only data directory: shards are loaded from copies
        self.read_only = not _writable(self.root)
        if not self.read_only:
            make_dir(self.root)
            self._take_lock()
        self._cat = self._read_catalogue()
        if not self.read_only:
            self._sweep()

    def describe(self) -> str:
        return f"Qdrant Edge at {self.root}"

    # -- ownership -----------------------------------------------------------
    def _take_lock(self) -> None:
        path = self.root / LOCK
        with writing(self.root):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise IndexBusy(
                    f"the vector engine in {self.root} is open in another process ({holder}); "
                    "wait for it to finish, or set qdrant.url to a Qdrant server for concurrent "
                    "access from many processes"
                ) from None
            try:  # who holds it, for the message another process gets
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
            except BaseException:
                os.close(fd)
                raise
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            for space in list(self._shards):
                self._close_shard(space)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            if self._copy is not None:
                shutil.rmtree(self._copy, ignore_errors=True)
                self._copy = None

    # -- the catalogue -------------------------------------------------------
    def _read_catalogue(self) -> dict[str, Any]:
        path = self.root / CATALOGUE
        if not path.is_file():
            return {"schema": SCHEMA, "engine": f"qdrant-edge-py {EDGE_VERSION}", "spaces": {}, "aliases": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EngineError(f"the engine catalogue {path} is unreadable ({exc}); restore it from "
                              "a backup (the shards and the Parquet files are intact)") from None
        if int(data.get("schema", 1)) > SCHEMA:
            raise EngineError(f"the engine catalogue {path} was written by a newer embedpipe; upgrade embedpipe")
        return data

    def _write_catalogue(self, change: Any) -> None:
        """Apply ``change`` to a copy of the catalogue and replace the file in one step."""
        self._writable()
        with self._lock:
            data = json.loads(json.dumps(self._cat))
            change(data)
            write_json(self.root / CATALOGUE, data, durable=True)
            self._cat = data

    def manifests(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._cat["spaces"].items()}

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._cat["aliases"])

    def create(self, space: str, dims: int, distance: str, manifest: Mapping[str, Any]) -> None:
        self._writable()
        with self._lock:
            if space in self._cat["spaces"]:
                raise EngineError(f"version {space} already exists in {self.root}")
            self._new_shard(space, dims, distance)
            self._write_catalogue(lambda d: d["spaces"].__setitem__(space, dict(manifest)))

    def reset(self, space: str) -> None:
        """Replace a space's shard with an empty one, keeping its catalogue entry (and so
        the alias): what ``embedpipe rebuild`` fills again from the Parquet files."""
        self._writable()
        with self._lock:
            manifest = self._cat["spaces"].get(space)
            if manifest is None:
                raise EngineError(f"version {space} is not in the engine catalogue of {self.root}")
            self._close_shard(space)
            self._new_shard(space, int(manifest["dims"]), str(manifest["distance"]))

    def _new_shard(self, space: str, dims: int, distance: str) -> None:
        from qdrant_edge import (Distance, EdgeConfig, EdgeShard, EdgeVectorParams,
                                 HnswIndexConfig, ScalarQuantizationConfig, ScalarType)

        q = self.settings.qdrant
        quantized = None
        if q.quantization == "int8":  # 0.99: a few outlying components do not set the scale
            quantized = ScalarQuantizationConfig(type=ScalarType.Int8, quantile=0.99, always_ram=True)
        config = EdgeConfig(
            vectors=EdgeVectorParams(size=dims, distance=getattr(Distance, _DISTANCES[distance])),
            hnsw_config=HnswIndexConfig(m=q.hnsw_m, ef_construct=q.hnsw_ef_construct,
                                        full_scan_threshold=10_000),
            quantization_config=quantized,
        )
        path = self.root / space
        _check_room(self.root, 4 * 2**20)  # a new shard's files (its WAL is sparse)
        with writing(self.root):
            if path.exists():  # a damaged shard, or one a crash left before its entry
                trash = self.root / f".{space}.old-{os.getpid()}-{time.monotonic_ns()}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            shard = self._edge(f"creating {space}", space, EdgeShard.create, str(path), config)
            _private(path)
        self._shards[space] = shard

    def set_manifests(self, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        def change(data: dict[str, Any]) -> None:
            for space, manifest in manifests.items():
                if space not in data["spaces"]:
                    raise EngineError(f"version {space} is not in the engine catalogue")
                data["spaces"][space] = dict(manifest)

        self._write_catalogue(change)

    def move_alias(self, alias: str, space: str, manifests: Mapping[str, Mapping[str, Any]]) -> None:
        def change(data: dict[str, Any]) -> None:
            data["aliases"][alias] = space
            for name, manifest in manifests.items():
                data["spaces"][name] = dict(manifest)

        self._write_catalogue(change)

    def drop(self, space: str) -> None:
        self._writable()
        with self._lock:
            self._close_shard(space)

            def change(data: dict[str, Any]) -> None:
                data["spaces"].pop(space, None)
                for alias in [a for a, s in data["aliases"].items() if s == space]:
                    del data["aliases"][alias]

            self._write_catalogue(change)
            with writing(self.root):
                shutil.rmtree(self.root / space, ignore_errors=True)

    # -- shards --------------------------------------------------------------
    def _shard(self, space: str) -> Any:
        shard = self._shards.get(space)
        if shard is not None:
            return shard
        while True:
            with self._lock:
                building = self._building.get(space)
                if building is None:
                    shard = self._shards.get(space)
                    if shard is None:
                        shard = self._load(space)
                        self._shards[space] = shard
                    return shard
            building.wait()  # a child process has the shard: wait for it, then load

    def _load(self, space: str) -> Any:
        from qdrant_edge import EdgeShard

        if space not in self._cat["spaces"]:
            raise EngineError(f"version {space} is not in the engine catalogue of {self.root}")
        path = self.root / space
        index = self._cat["spaces"][space].get("index", space.split("__")[0])
        fix = f"recreate it from the Parquet files with `embedpipe rebuild --index {index}`"
        # Edge's load of a missing folder would make an empty shard: check first.
        if not (path / "segments").is_dir():
            raise ShardUnreadable(f"the shard of version {space} is missing ({path}); {fix}")
        if self.read_only:
            path = self._copy_of(space)
        started = time.perf_counter()
        try:
            shard = EdgeShard.load(str(path))
        except Exception as exc:  # noqa: BLE001 - Edge raises bare Exception; classified here
            converted = _convert(exc, f"loading {space}", path)
            if converted is not None:
                raise converted from None
            raise ShardUnreadable(
                f"the shard of version {space} cannot be loaded ({_first_line(exc)}); {fix}"
            ) from None
        log.debug("loaded %s in %.2f s", space, time.perf_counter() - started)
        return shard

    def _copy_of(self, space: str) -> Path:
        """A private copy of a shard on a read-only data directory (Edge's load writes)."""
        if self._copy is None:
            self._copy = Path(tempfile.mkdtemp(prefix="embedpipe-engine-read-only-"))
            log.info("%s is read-only: searching copies of its shards in %s", self.root, self._copy)
        target = self._copy / space
        with writing(self._copy):
            shutil.copytree(self.root / space, target)
        return target

    def _close_shard(self, space: str) -> None:
        shard = self._shards.pop(space, None)
        if shard is not None:
            with contextlib.suppress(Exception):  # closing is best effort; the WAL has it all
                shard.close()
            if not self.read_only:
                _private(self.root / space)

    def _edge(self, what: str, space: str, fn: Any, *args: Any) -> Any:
        """Call Edge; its bare Exceptions become embedpipe errors naming ``space``."""
        try:
            return fn(*args)
        except (TypeError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - classified by message
            converted = _convert(exc, what, self.root / space)
            if converted is not None:
                raise converted from None
            raise EngineError(f"Qdrant Edge failed while {what}: {_first_line(exc)}") from None

    def _writable(self) -> None:
        if self.read_only:
            refused = OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.root))
            raise storage_error(refused, self.root) from None  # type: ignore[misc]

    def _sweep(self) -> None:
        """Remove what a crash left: catalogue temporaries and shard folders no entry names."""
        known = set(self._cat["spaces"])
        for entry in self.root.iterdir():
            if entry.name.startswith(f".{CATALOGUE}.") and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
            elif entry.name.startswith(".") and ".old-" in entry.name and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)  # a shard a reset replaced
            elif entry.is_dir() and "__" in entry.name and entry.name not in known:
                log.info("removing %s: no catalogue entry names it (a crash during its creation "
                         "or drop)", entry)
                shutil.rmtree(entry, ignore_errors=True)

    # -- points --------------------------------------------------------------
    def upsert(self, space: str, ids: Sequence[str], vectors: np.ndarray,
               payloads: Sequence[Mapping[str, Any]]) -> None:
        from qdrant_edge import Point, UpdateOperation

        self._writable()
        dims = int(self._cat["spaces"][space]["dims"])
        if vectors.ndim != 2 or vectors.shape[1] != dims or len(vectors) != len(ids):
            # Edge applies a batch up to its first bad point: refuse it whole, first.
            raise EngineError(f"{space}: {len(ids)} points with vectors of shape "
                              f"{tuple(vectors.shape)}; expected ({len(ids)}, {dims})")
        rows = vectors.tolist()
        points = [Point(i, v, _with_shadow(p)) for i, v, p in zip(ids, rows, payloads)]
        payload_bytes = sum(len(json.dumps(p, default=str)) for p in payloads[:8]) * len(ids) // max(1, min(8, len(ids)))
        _check_room(self.root, 2 * (vectors.nbytes + payload_bytes))
        self._edge(f"writing points to {space}", space, self._shard(space).update,
                   UpdateOperation.upsert_points(points))

    def delete(self, space: str, ids: Sequence[str]) -> None:
        from qdrant_edge import UpdateOperation

        self._writable()
        _check_room(self.root, 1024 * len(ids))
        self._edge(f"deleting points of {space}", space, self._shard(space).update,
                   UpdateOperation.delete_points(list(ids)))

    def scroll(self, space: str, fields: Sequence[str] | bool, where: Where | None = None,
               page: int = 4096) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        from qdrant_edge import ScrollRequest

        shard, flt, offset = self._shard(space), to_edge_filter(where), None
        with_payload: Any = fields if isinstance(fields, bool) else list(fields)
        while True:
            request = ScrollRequest(offset=offset, limit=page, filter=flt,
                                    with_payload=with_payload, with_vector=False)
            records, offset = self._edge(f"listing points of {space}", space, shard.scroll, request)
            yield [(str(r.id), r.payload or {}) for r in records]
            if offset is None:
                return

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        import numpy as np

        records = self._edge(f"reading vectors of {space}", space, self._shard(space).retrieve,
                             list(ids), False, True)
        return {str(r.id): np.asarray(r.vector, dtype=np.float32) for r in records}

    def count(self, space: str) -> int:
        from qdrant_edge import CountRequest

        return int(self._edge(f"counting points of {space}", space, self._shard(space).count,
                              CountRequest(exact=True)))

    def query(self, space: str, vector: np.ndarray, k: int, where: Where | None = None,
              with_text: bool = True, group_by: str | None = None) -> list[Scored]:
        if group_by is None:
            return self._query(space, vector, k, where, with_text)
        # Edge has no group-by: fetch more points than groups, keep each group's best,
        # and fetch again (twice as many) while short of k groups and more points exist.
        # The points come best first, so the first k groups found are the k best.
        limit = max(4 * k, 32)
        while True:
            points = self._query(space, vector, limit, where, with_text)
            best: dict[Any, Scored] = {}
            for p in points:
                best.setdefault(p.payload.get(group_by), p)
                if len(best) == k:
                    return list(best.values())
            if len(points) < limit:
                return list(best.values())
            limit *= 2

    def _query(self, space: str, vector: np.ndarray, limit: int, where: Where | None,
               with_text: bool) -> list[Scored]:
        from qdrant_edge import (PayloadSelector, QuantizationSearchParams, Query, QueryRequest,
                                 SearchParams)

        # Rescored: the candidates found on the int8 copies are ranked by their float32
        # vectors (twice k of them), so a score is the same with or without quantization.
        # A shard made without quantization ignores this.
        request = QueryRequest(
            limit=limit, query=Query.Nearest(vector.tolist()), filter=to_edge_filter(where),
            with_payload=True if with_text else PayloadSelector.Exclude(["text", BOOL_SHADOW]),
            params=SearchParams(hnsw_ef=self.settings.qdrant.hnsw_ef,
                                quantization=QuantizationSearchParams(rescore=True, oversampling=2.0)),
        )
        hits = self._edge(f"searching {space}", space, self._shard(space).query, request)
        return [Scored(str(h.id), float(h.score), h.payload or {}) for h in hits]

    def flush(self, space: str) -> None:
        if self.read_only:
            return
        self._edge(f"flushing {space}", space, self._shard(space).flush)

    def build_index(self, space: str) -> None:
        """Build HNSW over the segments large enough for it (Edge's ``optimize``). It holds
        the interpreter while it runs: minutes at a million points."""
        self._writable()
        _check_room(self.root, _disk_bytes(self.root / space))  # optimize writes new segments
        started = time.perf_counter()
        if _CHILD_BUILDS["on"] and space not in self.aliases().values():
            changed = self._build_in_child(space)
        else:
            changed = self._edge(f"building the index of {space}", space, self._shard(space).optimize)
            self.flush(space)
            self.last_build_pid = os.getpid()
        _private(self.root / space)  # the new segments
        if changed:
            log.info("built the vector index of %s in %.1f s", space, time.perf_counter() - started)

    def _build_in_child(self, space: str) -> bool:
        """``optimize`` in ``python -m embedpipe.engine._build``; calls needing the shard
        meanwhile wait (see the module docstring)."""
        import subprocess

        done = threading.Event()
        with self._lock:
            if space in self._shards:
                self._edge(f"flushing {space}", space, self._shards[space].flush)
            self._close_shard(space)
            self._building[space] = done
        try:
            child = subprocess.Popen([sys.executable, "-m", "embedpipe.engine._build", str(self.root / space)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.last_build_pid = child.pid
            out, err = child.communicate()
        finally:
            with self._lock:
                self._building.pop(space, None)
            done.set()
        if child.returncode != 0:
            reason = Exception(err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}")
            converted = _convert(reason, f"building the index of {space}", self.root / space)
            raise converted or EngineError(f"building the index of {space} failed in a child process: "
                                           f"{_first_line(reason)}")
        return bool(json.loads(out.strip().splitlines()[-1])["changed"])

    def index_fields(self, space: str, fields: Mapping[str, str]) -> None:
        from qdrant_edge import PayloadSchemaType, UpdateOperation

        self._writable()
        shard = self._shard(space)
        for field, kind in fields.items():
            key = _shadow_key(field) if kind == "bool" else field
            schema = PayloadSchemaType.Integer if kind == "bool" else getattr(PayloadSchemaType, _FIELD_TYPES[kind])
            self._edge(f"indexing {field} of {space}", space, shard.update,
                       UpdateOperation.create_field_index(key, schema))

    def info(self, space: str) -> SpaceInfo:
        info = self._edge(f"reading {space}", space, self._shard(space).info)
        return SpaceInfo(points=int(info.points_count), segments=int(info.segments_count),
                         indexed=int(info.indexed_vectors_count), disk_bytes=_disk_bytes(self.root / space),
                         location=str(self.root / space))


def to_edge_filter(where: Where | None) -> Any:
    """A :class:`Where` as a ``qdrant_edge.Filter`` (booleans pointed at their 0/1 mirror)."""
    if where is None:
        return None
    from qdrant_edge import FieldCondition, Filter, MatchAny as EdgeAny, MatchValue, RangeFloat

    def cond(c: Any) -> Any:
        if isinstance(c, Where):
            return to_edge_filter(c)
        if isinstance(c, Match):
            if isinstance(c.value, bool):
                return FieldCondition(key=_shadow_key(c.key), match=MatchValue(int(c.value)))
            return FieldCondition(key=c.key, match=MatchValue(c.value))
        if isinstance(c, MatchAny):
            return FieldCondition(key=c.key, match=EdgeAny(list(c.values)))
        if isinstance(c, Range):
            return FieldCondition(key=c.key, range=RangeFloat(gte=c.gte, lte=c.lte, gt=c.gt, lt=c.lt))
        raise TypeError(f"not a filter condition: {c!r}")

    def many(items: tuple[Any, ...]) -> list[Any] | None:
        return [cond(c) for c in items] or None

    return Filter(must=many(where.must), should=many(where.should), must_not=many(where.must_not))


def _shadow_key(key: str) -> str:
    """Where the 0/1 mirror of a boolean at payload path ``key`` lives."""
    return f"{BOOL_SHADOW}.{key}"


def _with_shadow(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload plus a 0/1 mirror of its booleans (Edge's filters cannot match them)."""
    out = dict(payload)
    shadow = _bools(payload)
    if shadow:
        out[BOOL_SHADOW] = shadow
    return out


def _bools(value: Any) -> Any:
    """The booleans of a JSON value as 0/1, in the same nesting (None when there are none)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Mapping):
        found = {k: b for k, v in value.items() if (b := _bools(v)) is not None}
        return found or None
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    return None


def _convert(exc: BaseException, what: str, path: Path) -> Exception | None:
    """An Edge error that means busy, read-only or full, as the embedpipe error; else None."""
    message = str(exc)
    if "WouldBlock" in message:
        return IndexBusy(f"{path} is open in another process ({what}); set qdrant.url to a "
                         "Qdrant server for concurrent access from many processes")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        if f"os error {code})" in message:
            return storage_error(OSError(code, os.strerror(code), str(path)), path)
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _writable(root: Path) -> bool:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    lock = probe / LOCK
    return os.access(probe, os.W_OK) and (not lock.exists() or os.access(lock, os.W_OK))


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": int(time.time()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else ""}


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {data['pid']} on {data['host']}: {data.get('command') or 'python'}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _check_room(root: Path, needed: int) -> None:
    """Refuse a write the disk may not hold, before Edge starts it.

    Edge writes its WAL and segments through memory maps of sparse files: on a full
    disk a write into one is not an error but SIGBUS, which kills the process. So every
    write first checks that the free space exceeds what it needs (an estimate, twice
    over: the WAL and the segment) plus a reserve of 64 MiB, or 1/64 of a smaller
    file system."""
    try:
        fs = os.statvfs(root)
    except OSError:
        return
    free, size = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    reserve = min(64 * 2**20, size // 64)
    if free < needed + reserve:
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
        raise storage_error(full, root) from None  # type: ignore[misc]


def _private(path: Path) -> None:
    """Folders 0700 and files 0600 under a shard: Edge creates them with the umask's
    modes (the engine folder is 0700 anyway; this keeps every file as private as the
    rest of the data directory)."""
    for folder, dirs, files in os.walk(path):
        for name, mode in [(d, DIR_MODE) for d in dirs] + [(f, FILE_MODE) for f in files] + [("", DIR_MODE)]:
            with contextlib.suppress(OSError):
                target = os.path.join(folder, name) if name else folder
                if os.lstat(target).st_mode & 0o077:
                    os.chmod(target, mode)


def _disk_bytes(path: Path) -> int:
    """Bytes a folder takes on disk (Edge preallocates sparse files: not their length)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total
