"""Embedding partitions on a Ray cluster (``--executor ray``); imported only when used.

Ray Data runs an actor pool over the partitions (``map_batches`` with a class): each
actor loads the profile's model once through :class:`LocalEmbedder` (fp16 on CUDA),
checks that the weights it found produce the driver's fingerprint, and embeds its
partition sorted by length as the in-process pipeline does. It returns the vectors
keyed by content hash. The driver commits each partition it receives to the vector
store in one ``VectorStore.add`` (all or nothing), so a killed driver loses at most the
partitions in flight and the same command resumes.

Faults: Ray restarts a killed actor and retries its task (Ray Data's actor defaults:
``max_restarts`` and ``max_task_retries`` -1), and the driver stores each hash once whichever attempt
delivers it. A worker that cannot load the model, or whose weights are not the
driver's, fails the run with one line naming its host and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedpipe.errors import ExecutionError
from embedpipe.execution import PreEmbedStats, partitions
from embedpipe.pipeline import plan_chunks

if TYPE_CHECKING:
    from types import ModuleType

    from embedpipe.config import RaySettings, Settings
    from embedpipe.profiles import Profile
    from embedpipe.vectors import VectorStore

__all__ = ["EmbedWorker", "embed_on_ray", "ray_session", "require_ray"]

log = logging.getLogger(__name__)

INSTALL = "pip install 'embedpipe[ray]'"
CHUNK = 256  # texts per encode call inside a partition: the in-process pipeline's chunk


def require_ray() -> ModuleType:
    """``ray`` (with Ray Data), or one line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is what runs the actor pool
    except ImportError as exc:
        raise ExecutionError(
            f"--executor ray needs Ray, which is not installed here: {INSTALL} "
            f"(or use --executor local)") from exc
    return ray


def _host() -> str:
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - the host name alone still names the worker
        ip = None
    name = socket.gethostname()
    return f"{name} ({ip})" if ip and ip != name else name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class EmbedWorker:
    """One Ray actor: one copy of the model, loaded once, refused unless its weights make
    the driver's fingerprint. Errors are returned, not raised, so the driver can name
    the worker's host in one line instead of a Ray traceback."""

    def __init__(self, profile: Profile, fingerprint: str, device: str = "auto") -> None:
        from embedpipe.backends.local import LocalEmbedder

        self.dims = profile.dims
        self.host = _host()
        self.error = ""
        try:
            embedder = LocalEmbedder(profile, device)
            embedder.check()  # load the model (fp16 on CUDA), dims and pooling checked
            mine = embedder.fingerprint
            if mine != fingerprint:
                raise ExecutionError(
                    f"its weights for {profile.name!r} make fingerprint {mine[:12]}, the driver's "
                    f"is {fingerprint[:12]}: install the same weights on every worker")
            self.embedder = embedder
        except Exception as exc:  # noqa: BLE001 - reported by the driver with the host
            self.error = f"worker on {self.host} cannot embed: {_first_line(exc)}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hashes = [str(h) for h in batch["content_hash"]]
        texts = [str(t) for t in batch["text"]]
        vectors = np.zeros((len(texts), self.dims), dtype=np.float32)
        failed = [""] * len(texts)
        if not self.error:
            for rows in plan_chunks([len(t) for t in texts], CHUNK):
                result = self.embedder.embed_documents([texts[r] for r in rows])
                vectors[rows] = result.vectors
                for n, reason in result.failed.items():
                    failed[rows[n]] = reason or "failed"
        return {
            "content_hash": np.array(hashes, dtype=object),
            "vector": vectors,
            "failed": np.array(failed, dtype=object),
            "worker_error": np.array([self.error] * len(texts), dtype=object),
        }


def _connect(ray: ModuleType, cfg: RaySettings) -> bool:
    """Join (or start) the cluster; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING}
    if not cfg.address:
        # A Ray started for this run does its main work: Ray starts workers at nice 15
        # by default (they would yield the CPU to anything else on the machine, measured
        # 1.9x slower than in process on a shared 2-core box); ours run at the driver's.
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=cfg.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {cfg.address!r}" if cfg.address else "a local Ray"
        raise ExecutionError(
            f"cannot reach {where}: {_first_line(exc)}; start it (`ray start --head`) or set "
            "execution.ray.address / EMBEDPIPE_RAY_ADDRESS") from exc
    return True


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[None]:
    """Join (or start) Ray for the length of a run of several waves; stop only what this
    started."""
    ray = require_ray()
    started = _connect(ray, settings.execution.ray)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _check_resources(ray: ModuleType, cfg: RaySettings) -> None:
    """Refuse at once what the cluster can never schedule (Ray would wait forever)."""
    total = ray.cluster_resources()
    for kind, per in (("GPU", cfg.gpus_per_worker), ("CPU", cfg.cpus_per_worker)):
        if per and total.get(kind, 0) < per:
            raise ExecutionError(
                f"the Ray cluster has {total.get(kind, 0):g} {kind}s, a worker asks for {per:g}; "
                f"lower execution.ray.{kind.lower()}s_per_worker or add nodes")


def embed_on_ray(
    settings: Settings,
    profile: Profile,
    fingerprint: str,
    todo: dict[str, str],
    store: VectorStore,
    progress: Callable[[int], None] | None = None,
    parts: list[list[str]] | None = None,
    on_commit: Callable[[list[str]], None] | None = None,
    stop: threading.Event | None = None,
) -> PreEmbedStats:
    """Embed ``todo`` (content hash -> text) on Ray and commit each partition to ``store``.

    ``parts`` are the partitions (default: :func:`partitions` of ``todo``, longest
    first); ``on_commit`` hears the hashes of each committed batch (those a worker could
    not embed included: they are settled for this run); ``stop`` set by the caller ends
    the run between batches."""
    ray = require_ray()
    cfg = settings.execution.ray
    parts = partitions(todo, cfg.batch_size) if parts is None else parts
    stats = PreEmbedStats(executor="ray", planned=len(todo), partitions=len(parts), workers=cfg.workers)
    if not parts:
        return stats
    started = _connect(ray, cfg)
    try:
        _check_resources(ray, cfg)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        tables = [pa.table({"content_hash": part, "text": [todo[h] for h in part]}) for part in parts]
        out = ray.data.from_arrow(tables).map_batches(
            EmbedWorker,
            fn_constructor_kwargs={"profile": profile, "fingerprint": fingerprint,
                                   "device": settings.device},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            # Ray Data gives its actors max_restarts and max_task_retries -1: a killed
            # worker comes back (its model reloads) and the partitions it held are retried.
            compute=ray.data.ActorPoolStrategy(size=cfg.workers),
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker or None,
        )
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            _commit(batch, store, stats)
            if on_commit is not None:
                on_commit([str(h) for h in batch["content_hash"]])
            if progress is not None:
                progress(len(batch["content_hash"]))
            if stop is not None and stop.is_set():
                break
    finally:
        if started:
            ray.shutdown()
    return stats


def _commit(batch: dict[str, np.ndarray], store: VectorStore, stats: PreEmbedStats) -> None:
    """Store one finished partition whole (one ``add``); raise a worker's refusal."""
    errors = [e for e in batch["worker_error"] if e]
    if errors:
        raise ExecutionError(str(errors[0]))
    ok = [i for i, reason in enumerate(batch["failed"]) if not reason]
    stats.failed += len(batch["failed"]) - len(ok)
    if ok:
        vectors = np.asarray(batch["vector"], dtype=np.float32)[ok]
        stats.embedded += store.add([str(batch["content_hash"][i]) for i in ok], vectors)
    stats.committed += 1
