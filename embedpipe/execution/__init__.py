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

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from embedpipe.errors import ConfigError

if TYPE_CHECKING:
    from embedpipe.config import Settings
    from embedpipe.migration import Migration
    from embedpipe.pipeline import Work
    from embedpipe.profiles import Profile
    from embedpipe.vectors import VectorStore

__all__ = [
    "Executor",
    "PreEmbedStats",
    "hosted_note",
    "partitions",
    "pre_embed",
    "pre_embed_migration",
    "resolve_executor",
    "text_waves",
    "texts_to_embed",
]

log = logging.getLogger(__name__)

Executor = Literal["local", "ray"]
Progress = Callable[[int], None]

# Hashes checked against the store at a time while planning (bounded memory).
PLAN_WINDOW = 65_536
# Texts the driver plans, ships and commits at a time: its memory holds one wave of
# texts (about 250 MB of 500-token texts), not the corpus.
WAVE = 100_000


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, wave: PreEmbedStats) -> None:
        """Count one more wave of the same run."""
        for name in ("planned", "partitions", "committed", "embedded", "failed"):
            setattr(self, name, getattr(self, name) + getattr(wave, name))
        self.workers = wave.workers


def resolve_executor(settings: Settings, override: str | None = None) -> Executor:
    """The executor a run uses: ``--executor`` when given, else ``[execution] engine``."""
    chosen = override or settings.execution.engine
    if chosen not in ("local", "ray"):
        raise ConfigError(f"unknown executor {chosen!r}; use --executor local or --executor ray")
    return chosen  # type: ignore[return-value]


def hosted_note(profile_name: str) -> str:
    """The one line said when Ray is asked for a hosted target."""
    return (f"profile {profile_name!r} is hosted: its requests stay on this machine (the driver), "
            "under its rate limits; --executor ray spreads only local models")


def text_waves(works: Iterable[Work], store: VectorStore | None, size: int) -> Iterator[dict[str, str]]:
    """content hash -> text of the distinct texts among ``works`` that ``store`` does not
    hold yet, in waves of about ``size`` (at most ``size`` + ``PLAN_WINDOW``): the driver
    holds one wave of texts at a time, not the whole corpus. The caller
    commits each wave before asking for the next, so a text of an earlier wave is found
    in the store then, and the driver keeps no record of the corpus's hashes."""
    wave: dict[str, str] = {}
    window: dict[str, str] = {}

    def flush() -> None:
        held = store.present(window) if store is not None else set()
        wave.update((h, t) for h, t in window.items() if h not in held)
        window.clear()

    for work in works:
        if work.content_hash in window or work.content_hash in wave:
            continue
        window[work.content_hash] = work.text
        if len(window) >= min(PLAN_WINDOW, size):
            flush()
            if len(wave) >= size:
                yield dict(wave)
                wave.clear()
    flush()
    if wave:
        yield dict(wave)


def texts_to_embed(works: Iterable[Work], store: VectorStore | None) -> dict[str, str]:
    """Every text of ``works`` that ``store`` lacks, in one mapping (small inputs, tests)."""
    todo: dict[str, str] = {}
    for wave in text_waves(works, store, 1 << 62):
        todo.update(wave)
    return todo


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


def pre_embed(
    settings: Settings, profile: Profile, fingerprint: str, works: Iterable[Work],
    store: VectorStore, executor: str, progress: Callable[[int], Progress] | None = None,
) -> PreEmbedStats:
    """Embed on the executor the texts of ``works`` that ``store`` lacks, into ``store``.

    ``works`` are the points the ordinary write path will embed next (it then finds
    their vectors stored). ``local`` does nothing here; a hosted profile stays on the
    driver (``note`` says so: the caller's report carries it, the log has it at INFO)."""
    stats = PreEmbedStats(executor=executor)
    if executor == "local":
        return stats
    if not profile.is_local:
        stats.note = hosted_note(profile.name)
        log.info(stats.note)
        return stats
    from embedpipe.execution.ray_embed import embed_on_ray, ray_session

    waves = text_waves(works, store, WAVE)
    first = next(waves, None)
    if first is None:  # everything is stored already: no cluster needed
        return stats
    with ray_session(settings):  # one connection for every wave
        for wave in itertools.chain([first], waves):
            advance = progress(len(wave)) if progress is not None else None
            stats.add(embed_on_ray(settings, profile, fingerprint, wave, store, progress=advance))
    return stats


def pre_embed_migration(
    m: Migration, ids: Sequence[str], executor: str,
    progress: Callable[[int], Progress] | None = None,
) -> PreEmbedStats:
    """:func:`pre_embed` for the backfill of ``ids``. Call after ``m.prepare()``; the
    backfill follows."""
    if executor == "local" or not ids:
        return PreEmbedStats(executor=executor)
    return pre_embed(m.settings, m.profile, m.fingerprint, migration_works(m, ids), m.store(),
                     executor, progress=progress)
