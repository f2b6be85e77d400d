"""Where embedding runs: in this process (``local``) or on a Ray cluster (``ray``).

A Ray run is a *pre-embed* step in front of the ordinary in-process build. The driver
plans the texts that need vectors (what the vector store does not hold yet for the
target fingerprint: the same plan as the in-process pipeline), cuts them into
partitions of ``[execution.ray] batch_size`` texts, and Ray actors embed them (one model
per actor). Each finished partition is committed whole to the Parquet vector store
(one ``VectorStore.add``, which appears by rename). The ordinary backfill then finds
every vector stored and writes the engine having embedded nothing; catch-up,
validation and cutover are unchanged. A re-run plans again from the store, so it
embeds only what no committed partition holds.

The same step serves ``embedpipe migrate`` (the backfill of a new version) and
``embedpipe ingest`` (the staged documents of a first build or a large ingest):
:func:`pre_embed` takes the points the ordinary write path will embed, whoever plans
them.

This module holds the plain, Ray-free parts (the plan, the partitions, which executor);
``embedpipe.execution.ray_embed`` holds the Ray code and is imported only when used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from embedpipe.backends.base import Embedder
    from embedpipe.config import Settings
    from embedpipe.migration import Migration
    from embedpipe.pipeline import Work
    from embedpipe.profiles import Profile
    from embedpipe.vectors import VectorStore

__all__ = [
    "EmbedAhead",
    "Executor",
    "PreEmbedStats",
    "hosted_note",
    "partitions",
    "migration_streams",
    "pre_embed",
    "planned_waves",
    "resolve_executor",
]

log = logging.getLogger(__name__)

Executor = Literal["local", "ray", "batch"]
Progress = Callable[[int], None]

# Hashes checked against the store at a time while planning (bounded memory).
PLAN_WINDOW = 65_536
# Texts the driver plans, ships and commits at a time: its memory holds one wave of
# texts (about 250 MB of 500-token texts), not the corpus.
WAVE = 100_000
# A Batch API wave: its batches are in flight together (each up to the completion
# window), so a wave is as large as memory allows; ten 50,000-input batches.
BATCH_WAVE = 500_000


@dataclass
class PreEmbedStats:
    """What a pre-embed did; lands in the migration or ingest report under ``executor``."""

    executor: str
    planned: int = 0  # distinct texts with no stored vector when this run planned
    partitions: int = 0  # partitions the plan cut them into
    committed: int = 0  # partitions stored by this run
    embedded: int = 0  # vectors stored by this run
    failed: int = 0  # texts a worker could not embed (left to the in-process build)
    workers: int = 0
    note: str | None = None  # why nothing ran on the cluster, when so
    batch: dict[str, Any] | None = None  # the Batch API's figures (``--batch``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, wave: PreEmbedStats) -> None:
        """Count one more wave of the same run."""
        for name in ("planned", "partitions", "committed", "embedded", "failed"):
            setattr(self, name, getattr(self, name) + getattr(wave, name))
        self.workers = wave.workers
        if wave.batch is not None:
            mine = self.batch or {}
            self.batch = {k: round(mine.get(k, 0) + v, 10) for k, v in wave.batch.items()}


def resolve_executor(settings: Settings, override: str | None = None) -> Executor:
    """The executor a run uses: ``--executor`` when given, else ``[execution] engine``."""
    chosen = override or settings.execution.engine
    if chosen not in ("local", "ray", "batch"):
        raise ConfigError(f"unknown executor {chosen!r}; use --executor local or --executor ray "
                          "(or --batch for a hosted model's Batch API)")
    return chosen  # type: ignore[return-value]


def hosted_note(profile_name: str) -> str:
    """The one line said when Ray is asked for a hosted target."""
    return (f"profile {profile_name!r} is hosted: its requests stay on this machine (the driver), "
            "under its rate limits; --executor ray spreads only local models")


def partitions(todo: dict[str, str], size: int) -> list[list[str]]:
    """The hashes of ``todo`` cut into partitions of at most ``size``, longest texts first:
    a partition holds texts of similar length, so a worker pads little (the in-process
    window sorts the same way), and memory limits surface on the first partition."""
    if size <= 0:
        raise ConfigError("execution.ray.batch_size must be positive")
    order = sorted(todo, key=lambda h: -len(todo[h]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def migration_works(m: Migration, ids: Sequence[str]) -> Iterator[Work]:
    """The points the backfill of ``ids`` will write (chunked as the target records)."""
    from embedpipe.chunking import chunker_for, works_for_row

    target = m._require_target()
    store_text = m.settings.index_store_text(target.index)
    chunker = chunker_for(target, m.embedder) if target.chunking else None
    wanted = pa.array(sorted(set(ids)), pa.string())
    for batch in m.corpus.iter_batches():
        rows = batch.filter(pc.is_in(batch.column("id"), value_set=wanted))
        for row in rows.to_pylist():
            yield from works_for_row(row, store_text, chunker)


@dataclass
class _Part:
    """One partition of a wave: its texts, and how far into its stream the works reach
    once it and every earlier partition are stored."""

    hashes: list[str]
    boundary: int  # works of the stream before this index are then covered
    left: set[str] = field(default_factory=set)


class EmbedAhead:
    """Embeds on Ray or through the Batch API, in a background thread, the texts of one or more work streams,
    while the caller writes the engine from the same streams: the write path's
    embedding and the cluster's overlap, partition by partition.

    ``streams`` are functions that each return one stream of works, in the order the
    write path will read them (a migration: one per backfill slice; an ingest: one).
    The background thread reads them as one sequence, wave by wave (at most ``WAVE``
    texts in memory for Ray, ``BATCH_WAVE`` for the Batch API: a wave may span slices,
    so one actor pool, or one set of batches in flight, serves many slices), plans the
    texts the store lacks, cuts them into partitions of ``[execution.ray] batch_size``
    texts (the Batch API: ``max_inputs_per_request``) in stream order, and the
    executor embeds them; each partition is committed whole to the vector store. :meth:`gate` hands the write
    path its stream's works only as far as every partition before them is stored, so
    the write path finds each vector stored and embeds nothing (a text a worker could
    not embed is left to it). A wave is planned after the previous one is stored, so
    a text repeated across waves is embedded once.

    Use as a context manager: leaving it (normally or not) stops the thread between
    partitions and, when this run started Ray, stops Ray. ``stats`` adds up the waves.
    """

    def __init__(
        self, settings: Settings, profile: Profile, fingerprint: str,
        streams: Sequence[Callable[[], Iterable[Work]]], store: VectorStore, executor: str,
        progress: Callable[[int], Progress] | None = None, embed: Callable[..., PreEmbedStats] | None = None,
        batch_state: Path | None = None, resubmit: bool = True,
    ) -> None:
        """``embed`` stands in for :func:`~embedpipe.execution.ray_embed.embed_on_ray`
        (same signature; tests pass a fake to play partitions in a chosen order).
        ``batch_state`` and ``resubmit``: the Batch API's state file and whether texts
        of failed, expired or cancelled batches are submitted again (``--batch``)."""
        self.settings, self.profile, self.fingerprint = settings, profile, fingerprint
        self.executor, self._embed = executor, embed
        self.streams, self.store, self.progress = list(streams), store, progress
        self.batch_state, self.resubmit = batch_state, resubmit
        self.stats = PreEmbedStats(executor=executor)
        self.failed: dict[str, str] = {}  # content hash -> why the executor could not embed it
        if executor == "batch":
            from embedpipe.execution.batch_embed import require_batch_profile

            require_batch_profile(profile)
            if batch_state is None:
                raise ConfigError("a Batch API run needs a state file (batch_state)")
        self.active = executor == "batch" or (executor == "ray" and profile.is_local)
        if executor == "ray" and not profile.is_local:
            self.stats.note = hosted_note(profile.name)
            log.info(self.stats.note)
        # Texts per partition (what one commit settles) and per wave (held in memory).
        self._part_size = (profile.batch.max_inputs_per_request if executor == "batch"
                           else settings.execution.ray.batch_size)
        self._wave = BATCH_WAVE if executor == "batch" else WAVE
        # The streams are planned as one sequence (one wave may span slices: one actor
        # pool, or every batch in flight together): where each starts in it, and how many
        # of its works have their vectors settled.
        self._offsets: list[int | None] = [None] * len(self.streams)
        self._covered = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._session: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> EmbedAhead:
        if not self.active:
            return self
        if self._embed is None and self.executor == "batch":
            from embedpipe.execution.batch_embed import embed_on_batch_api

            self._embed = functools.partial(embed_on_batch_api, state_path=self.batch_state,
                                            resubmit=self.resubmit, failed=self.failed)
        elif self._embed is None:
            from embedpipe.execution.ray_embed import embed_on_ray, ray_session

            self._embed = embed_on_ray
            self._session = ray_session(self.settings)  # joined here, in the caller's thread
            self._session.__enter__()
        self._thread = threading.Thread(target=self._run, name="embedpipe-embed-ahead", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._session is not None:
            self._session.__exit__(None, None, None)

    def write_embedder(self, embedder: Embedder) -> Embedder:
        """The embedder the write path uses beside this: the same one, except in a batch
        run, where a text the batches did not embed fails with their reason instead of
        going to the synchronous API at the full price."""
        if self.executor != "batch":
            return embedder
        from embedpipe.execution.batch_embed import BatchOnly

        return BatchOnly(embedder, self.failed)  # type: ignore[return-value]

    def gate(self, number: int, works: Iterable[Work]) -> Iterator[Work]:
        """``works`` (stream ``number``, as the write path reads it), each handed on once
        the partitions covering it are stored."""
        for index, work in enumerate(works):
            if self.active and not self._settled(number, index):
                self._wait(number, index)
            yield work

    def wait(self) -> PreEmbedStats:
        """Block until every stream is embedded (the pre-embed without overlap)."""
        if self.active and self.streams:
            self._wait(len(self.streams) - 1, _END)
        return self.stats

    def _settled(self, number: int, index: int) -> bool:
        start = self._offsets[number]
        return self._covered >= _END or (start is not None and self._covered > start + index)

    def _wait(self, number: int, index: int) -> None:
        with self._changed:
            while not self._settled(number, index) and self._error is None:
                self._changed.wait()
        if self._error is not None:
            raise self._error

    def _cover(self, upto: int) -> None:
        with self._changed:
            self._covered = max(self._covered, upto)
            self._changed.notify_all()

    def _sequence(self) -> Iterator[Work]:
        """Every stream's works, one after the other, noting where each starts."""
        count = 0
        for number, stream in enumerate(self.streams):
            with self._changed:
                self._offsets[number] = count
                self._changed.notify_all()
            for work in stream():
                count += 1
                yield work

    def _run(self) -> None:
        try:
            for wave, parts in planned_waves(self._sequence(), self.store, self._part_size, self._wave):
                if self._stop.is_set():
                    return
                self._embed_wave(wave, parts)
            self._cover(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting write path
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _embed_wave(self, wave: dict[str, str], parts: list[_Part]) -> None:
        owner = {h: n for n, part in enumerate(parts) for h in part.hashes}
        for part in parts:
            part.left = set(part.hashes)
        done = 0  # parts settled in order

        def committed(hashes: list[str]) -> None:
            nonlocal done
            for h in hashes:
                n = owner.get(h)
                if n is not None:
                    parts[n].left.discard(h)
            while done < len(parts) and not parts[done].left:
                done += 1
            if done:
                self._cover(parts[done - 1].boundary)

        committed([])  # leading partitions with nothing to embed are settled already
        if not wave:
            return
        advance = self.progress(len(wave)) if self.progress is not None else None
        assert self._embed is not None
        self.stats.add(self._embed(
            self.settings, self.profile, self.fingerprint, wave, self.store, progress=advance,
            parts=[p.hashes for p in parts if p.hashes], on_commit=committed, stop=self._stop))
        if not self._stop.is_set():
            committed(list(wave))  # whatever the cluster settled, this wave is done


_END = 1 << 62  # "every work of the stream"


def planned_waves(works: Iterable[Work], store: VectorStore, size: int,
                  wave_size: int | None = None) -> Iterator[tuple[dict[str, str], list[_Part]]]:
    """(content hash -> text, partitions) of the texts among ``works`` that ``store``
    lacks, in stream order: partitions of at most ``size`` texts, waves of about
    ``wave_size`` (default ``WAVE``). A partition's boundary is the index of the first work after it, so works
    before it need only stored vectors once it and every earlier partition are stored.
    The caller stores each wave before asking for the next (the store then answers
    for texts repeated across waves)."""
    if size <= 0:
        raise ConfigError("execution.ray.batch_size must be positive")
    limit = wave_size or WAVE
    wave: dict[str, str] = {}
    previous: dict[str, str] = {}  # the wave yielded last: stored since ``held`` was read
    parts: list[_Part] = [_Part([], 0)]
    window: list[Work] = []
    seen = 0  # works planned so far

    def flush() -> Iterator[tuple[dict[str, str], list[_Part]]]:
        nonlocal wave, previous, parts, seen
        held = store.present({w.content_hash for w in window})
        for work in window:
            seen += 1
            h = work.content_hash
            if h not in held and h not in wave and h not in previous:
                wave[h] = work.text
                parts[-1].hashes.append(h)
            parts[-1].boundary = seen
            if len(parts[-1].hashes) >= size:
                if len(wave) >= limit:
                    yield wave, parts
                    previous, wave, parts = wave, {}, []
                parts.append(_Part([], seen))
        window.clear()

    for work in works:
        window.append(work)
        if len(window) >= min(PLAN_WINDOW, size):
            yield from flush()
    yield from flush()
    if wave or any(p.boundary for p in parts):
        yield wave, parts


def pre_embed(
    settings: Settings, profile: Profile, fingerprint: str, works: Iterable[Work],
    store: VectorStore, executor: str, progress: Callable[[int], Progress] | None = None,
) -> PreEmbedStats:
    """Embed on the executor the texts of ``works`` that ``store`` lacks, into ``store``,
    and return when all are stored (:class:`EmbedAhead` without the overlap).

    ``local`` does nothing here; a hosted profile stays on the driver (``note`` says
    so: the caller's report carries it, the log has it at INFO)."""
    with EmbedAhead(settings, profile, fingerprint, [lambda: works], store, executor, progress) as ahead:
        return ahead.wait()


def migration_streams(m: Migration, slices: Sequence[Sequence[str]]) -> list[Callable[[], Iterator[Work]]]:
    """One work stream per backfill slice, read as the backfill will read it."""
    return [functools.partial(migration_works, m, ids) for ids in slices]
