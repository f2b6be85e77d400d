"""Embeddings through OpenAI's Batch API: half the price, results within 24 hours.

``embed_with_batches(profile, texts, store, state_path, ledger)`` fills a
``VectorStore`` with the vectors of ``texts`` (content hash -> text):

1. Texts already in the store are never submitted. The rest are packed by exact token
   counts into JSONL input files within the profile's ``[batch]`` limits
   (``_batch_plan``), each one batch.
2. Each batch is written to the state file *before* it is uploaded, its file id
   after the upload, its batch id right after creation, always atomically and durably,
   so a killed process knows every batch it made. A file uploaded but not yet made
   into a batch is looked up among the provider's batches (by ``input_file_id``)
   before a new batch is created: a kill at any point never bills a batch twice.
3. Batches are polled with backoff (``poll_initial_s`` doubling to ``poll_max_s``).
   A finished batch's output and error files are downloaded and matched by
   ``custom_id``; every vector is checked as the synchronous backend checks it (count,
   indices, dimension, finite); the texts whose every piece came back are stored
   (``store.add``, atomic) and handed to ``on_stored``; the tokens the provider reports
   in each line's ``usage`` go to the ledger at ``profile.batch_price`` (``api =
   "batch"``). Then the batch is marked done and its files deleted.
4. What a failed, expired or cancelled batch did complete is kept. The rest is
   resubmitted in new batches, up to ``batch.max_attempts`` submissions per text and
   run (a re-run starts afresh), or (``resubmit=False``) reported failed with the reason.
   A batch the provider failed whole is resubmitted only once nothing else is in flight.

Running again with the same state file resumes: unfinished batches are polled, nothing
submitted is submitted again. The store is the truth for the caller: ``on_stored`` is
a progress hook, and a text stored just before a kill is simply found there next time.
The state file holds content hashes, ids and counts; never a text, never a key.
``read_progress(state_path)`` summarises a state file for ``embedpipe status``.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe._batch_plan import ENDPOINT, TERMINAL, BatchState, PlannedBatch, input_file, plan_batches
from embedpipe.backends._openai import (
    Deadline,
    MalformedResponse,
    RequestFailed,
    call_with_retries,
    check_sovereignty,
    profile_client,
    scope,
)
from embedpipe.backends.hosted import PlannedInput, checked_vectors, decode_embedding, mean_of_pieces
from embedpipe.errors import BatchError, ModelError, ProviderError
from embedpipe.profiles import Profile, fingerprint
from embedpipe.ratelimit import RateLimiter
from embedpipe.usage import UsageLedger
from embedpipe.vectors import VectorStore

if TYPE_CHECKING:
    import openai

__all__ = ["BatchProgress", "BatchStats", "embed_with_batches", "read_progress"]

log = logging.getLogger(__name__)

# Uploads and downloads may be large: their wall-clock deadline grows with the bytes
# (at least this many per second), on top of the profile's timeout_s.
_MIN_BYTES_PER_S = 1_000_000
_DOWNLOAD_S = 600.0


@dataclass
class BatchStats:
    """What one ``embed_with_batches`` call did (a report's batch section)."""

    batches: int = 0  # batches this call created
    files: int = 0  # input files this call uploaded
    requests: int = 0  # request lines in them
    inputs: int = 0  # texts this call submitted (a resubmitted text counts again)
    tokens: int = 0  # tokens the provider billed for batches finished in this call
    usd: float = 0.0  # those tokens at the batch price
    stored: int = 0  # texts whose vectors this call stored
    skipped: int = 0  # texts already in the store: not submitted
    resumed: int = 0  # unfinished batches found in the state file and polled again
    resubmitted: int = 0  # texts submitted again after a failed, expired or cancelled batch
    chunked: int = 0  # texts sent as several pieces (over max_tokens), this call
    polls: int = 0  # batch status requests
    statuses: dict[str, str] = field(default_factory=dict)  # batch id -> its final status
    attempts: dict[int, int] = field(default_factory=dict)  # submissions -> texts stored or failed
    failed: dict[str, str] = field(default_factory=dict)  # content hash -> reason


@dataclass
class BatchProgress:
    """A state file, summarised for ``embedpipe status``."""

    path: Path
    profile: str
    batches: dict[str, int]  # status -> batches ("planned", "uploaded", the provider's, "done")
    texts: int  # distinct texts the state knows
    stored: int  # of them, stored from a finished batch
    failed: int  # reported failed for good (no batch can take them)
    in_flight: int  # in a batch not finished yet
    requests: dict[str, int]  # the unfinished batches' request_counts, summed
    updated: str  # when the state was last written (UTC)
    exhausted: int = 0  # the last run gave up on them after max_attempts; running again retries
    unsent: int = 0  # failed, not resubmitted (resubmit off); a run that resubmits retries
    # texts still to come: in flight, or failed but taken up again by a re-run
    # (exhausted, unsent); 0 with ``finished``: done, nothing pending (a status may hide it)
    pending: int = 0

    @property
    def finished(self) -> bool:
        return self.in_flight == 0


def read_progress(state_path: Path) -> BatchProgress | None:
    """The progress a batch state file records, or None when there is none."""
    state = BatchState.read(Path(state_path))
    if state is None:
        return None
    statuses: dict[str, int] = {}
    requests = {"total": 0, "completed": 0, "failed": 0}
    stored: set[str] = set()
    for b in state.batches:
        if b.status == "discarded":  # planned, never uploaded, dropped: cost nothing
            continue
        name = "done" if b.done else b.status
        statuses[name] = statuses.get(name, 0) + 1
        if b.done:
            stored.update(h for h in b.hashes if h not in b.failed)
        else:
            for k in requests:
                requests[k] += b.request_counts.get(k, 0)
    in_flight = state.in_flight() - stored
    known = {h for b in state.batches if b.status != "discarded" for h in b.hashes} | set(state.failed)
    return BatchProgress(Path(state_path), state.profile, statuses, len(known), len(stored),
                         len(set(state.failed) - stored), len(in_flight), requests, state.updated,
                         exhausted=len(set(state.exhausted) - stored),
                         unsent=len(set(state.unsent) - stored),
                         pending=len(in_flight | ((set(state.exhausted) | set(state.unsent)) - stored)))


def embed_with_batches(
    profile: Profile,
    texts: Mapping[str, str],
    store: VectorStore,
    state_path: Path,
    ledger: UsageLedger | None = None,
    *,
    resubmit: bool = True,
    on_stored: Callable[[list[str]], None] | None = None,
    sovereign: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
) -> BatchStats:
    """Store a vector for every text of ``texts`` (content hash -> text) through the
    Batch API, or report why not (``stats.failed``). Resumes ``state_path``'s batches.

    ``should_stop`` is asked before each upload and each batch creation; when it answers
    True the call raises ``BatchError`` (what was uploaded or created is in the state
    file, and the same command resumes it)."""
    run = _Run(profile, texts, store, Path(state_path), ledger, resubmit, on_stored, sovereign, sleep)
    run.should_stop = should_stop
    return run.go()


class _Run:
    def __init__(self, profile: Profile, texts: Mapping[str, str], store: VectorStore, state_path: Path,
                 ledger: UsageLedger | None, resubmit: bool,
                 on_stored: Callable[[list[str]], None] | None, sovereign: bool,
                 sleep: Callable[[float], None]) -> None:
        if profile.provider != "openai":
            raise ModelError(f"profile {profile.name!r} is not an OpenAI-protocol model; the "
                             "Batch API serves hosted OpenAI profiles only")
        check_sovereignty(profile, sovereign)  # before a client, a key or a byte sent
        fp = fingerprint(profile)
        if store.fingerprint != fp:
            raise BatchError(f"the vector store is for space {store.fingerprint[:12]}, not "
                             f"profile {profile.name!r}'s ({fp[:12]})")
        self.profile, self.texts, self.store = profile, texts, store
        self.ledger, self.resubmit, self.on_stored, self.sleep = ledger, resubmit, on_stored, sleep
        self.state = BatchState.open(state_path, profile, fp)
        # A new run: the batches still in flight become this run's, and every text gets a
        # fresh max_attempts (the ones an earlier run gave up on are tried again; only
        # planning refusals are failed for good). Older state files wrote those to failed.
        self.state.run += 1
        for b in self.state.batches:
            if b.active:
                b.run = self.state.run
        self.state.exhausted = {}
        self.state.failed = {h: r for h, r in self.state.failed.items() if "batch.max_attempts" not in r}
        # Texts of a batch the provider failed whole, held back until nothing else is active.
        self.held: set[str] = set()
        self.should_stop: Callable[[], bool] | None = None
        self.client: openai.OpenAI = profile_client(profile)
        self.limiter = RateLimiter()  # batch calls do not spend the embeddings budgets
        self.stats = BatchStats()
        # Texts not resubmitted because resubmit is off: reported, and kept in the state
        # apart from the permanent failures (a later run that resubmits takes them up).
        if resubmit:
            self.state.unsent = {}
        self.unsent: dict[str, str] = self.state.unsent

    def go(self) -> BatchStats:
        self.stats.resumed = sum(1 for b in self.state.batches if b.active)
        self.stats.skipped = len(self.store.present(self.texts))
        for b in self.state.batches:
            if b.done and not b.billed and b.status != "discarded":  # killed before its ledger line
                self._bill(b)
        self._plan_new(release=not any(b.active for b in self.state.batches))
        delay = retry = self.profile.batch.poll_initial_s
        while True:
            submitted = self._submit_planned()
            active = [b for b in self.state.batches if b.active]
            if not active:
                if not self.held:
                    break
                # Batches the provider failed whole (e.g. the enqueued-token limit): sent
                # again only once nothing else is in flight, after a wait that doubles.
                self.sleep(retry)
                retry = min(retry * 2, self.profile.batch.poll_max_s)
                self._plan_new(release=True)
                continue
            if submitted:
                delay = self.profile.batch.poll_initial_s
            if self._poll(active):
                self._plan_new()
                continue  # something finished: submit its retries before waiting
            self.sleep(delay)
            delay = min(delay * 2, self.profile.batch.poll_max_s)
        self._report_failed()
        return self.stats

    # -- planning -------------------------------------------------------------------
    def _plan_new(self, release: bool = False) -> None:
        """Batches for the texts that need one: never submitted, or (resubmit) back from
        a batch that did not store them, with submissions left. The texts of a batch the
        provider failed whole wait (``self.held``) unless ``release``."""
        for b in self.state.batches:
            if b.status == "planned" and not b.done and any(h not in self.texts for h in b.hashes):
                # Planned by a killed run, never uploaded, and not all its texts are passed
                # again: it cost nothing; its passed texts are planned anew just below.
                b.done, b.status, b.failed = True, "discarded", {}
        present = self.store.present(self.texts)
        flying, attempts = self.state.in_flight(), self.state.attempts()
        reasons = self.state.last_reasons()
        whole = set() if release else self._failed_whole()
        ever = {h for b in self.state.batches if b.status != "discarded" for h in b.hashes}
        self.held = set()
        todo: dict[str, str] = {}
        for h, text in self.texts.items():
            if (h in present or h in flying or h in self.state.failed or h in self.unsent
                    or h in self.state.exhausted):
                continue
            tried = attempts.get(h, 0)
            last = reasons.get(h, "not stored")
            if tried and not self.resubmit:
                self.unsent[h] = f"{last} (not resubmitted: resubmit is off)"
                continue
            if tried >= self.profile.batch.max_attempts:
                self.state.exhausted[h] = (f"{last} (after {tried} submissions; batch.max_attempts = "
                                           f"{self.profile.batch.max_attempts}; running again tries again)")
                continue
            if h in whole:
                self.held.add(h)
                continue
            todo[h] = text
            self.stats.resubmitted += 1 if h in ever else 0
        if not todo:
            return
        batches, refused = plan_batches(self.profile, todo, len(self.state.batches) + 1)
        self.state.failed.update(refused)
        for b in batches:
            b.run = self.state.run
        self.state.batches.extend(batches)
        self.state.save()  # planned before anything is uploaded

    def _failed_whole(self) -> set[str]:
        """The texts whose latest batch the provider failed as a whole."""
        latest: dict[str, PlannedBatch] = {}
        for b in self.state.batches:
            for h in b.hashes:
                latest[h] = b
        return {h for h, b in latest.items() if b.failed_whole}

    def _report_failed(self) -> None:
        present = self.store.present(self.texts)
        failed = {**self.state.exhausted, **self.state.failed, **self.unsent}
        self.stats.failed = {h: r for h, r in failed.items() if h in self.texts and h not in present}
        if self.state.batches or self.state.failed or self.unsent:
            self.state.save()  # what this run gave up on, for read_progress

    # -- submitting -----------------------------------------------------------------
    def _submit_planned(self) -> int:
        made = 0
        for b in self.state.batches:
            fresh = b.status == "planned"
            if fresh:
                self._check_stop(f"uploading batch {b.key}")
                self._upload(b)
            if b.status == "uploaded":
                self._check_stop(f"creating batch {b.key}")
                # Uploaded by an earlier, killed run: it may have created the batch too.
                made += self._create(b, adopt=not fresh)
        return made

    def _check_stop(self, what: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise BatchError(f"profile {self.profile.name!r}: stopped before {what}; what was "
                             "submitted is in the state file: the same command resumes")

    def _upload(self, b: PlannedBatch) -> None:
        raw = input_file(self.profile, b, self.texts)
        deadline = self.profile.limits.timeout_s + len(raw) / _MIN_BYTES_PER_S
        card = self._call(lambda: self.client.files.create(
            file=(f"embedpipe-{b.key}.jsonl", io.BytesIO(raw)), purpose="batch"),
            f"upload batch input {b.key}", deadline)
        b.input_file_id, b.status = card.id, "uploaded"
        self.state.save()
        self.stats.files += 1
        self.stats.requests += len(b.requests)

    def _create(self, b: PlannedBatch, adopt: bool) -> int:
        """Create ``b``'s batch, or adopt the one made for its file by a killed run or
        by a try whose reply was lost (a timeout after the provider created it): a
        retry looks before it creates, so a batch is never made (and billed) twice."""
        tries, created = 0, False

        def send() -> Any:
            nonlocal tries, created
            tries += 1
            if adopt or tries > 1:
                found = self._existing_batch(b.input_file_id)
                if found is not None:
                    return found
            card = self.client.batches.create(
                input_file_id=b.input_file_id, endpoint=ENDPOINT,
                completion_window=self.profile.batch.completion_window,
                metadata={"embedpipe_batch": b.key, "embedpipe_profile": self.profile.name})
            created = True
            return card

        found = self._call(send, f"create batch {b.key}")
        b.batch_id, b.status = found.id, found.status
        self.state.save()  # the batch id is durable before the first wait
        if created or not adopt:  # a file uploaded by this call: its batch is this call's
            self.stats.batches += 1
            self.stats.inputs += len(b.hashes)
            self.stats.chunked += sum(1 for n in _pieces_per_row(b).values() if n > 1)
            log.info("%s: batch %s created (%d texts, %d requests, %d tokens)", self.profile.name,
                     found.id, len(b.hashes), len(b.requests), b.tokens)
        return 1

    def _existing_batch(self, file_id: str | None) -> Any | None:
        """The provider's batch made from ``file_id``, if any (newest first; later pages
        are fetched as the iteration reaches them). Called inside ``_call``'s retries."""
        return next((x for x in self.client.batches.list(limit=100) if x.input_file_id == file_id), None)

    # -- polling --------------------------------------------------------------------
    def _poll(self, active: list[PlannedBatch]) -> bool:
        """One look at every unfinished batch; True when one finished (and was stored)."""
        finished = False
        for b in active:
            card = self._call(lambda: self.client.batches.retrieve(b.batch_id), f"poll batch {b.batch_id}")
            self.stats.polls += 1
            counts = card.request_counts.model_dump() if card.request_counts else {}
            changed = (card.status, counts) != (b.status, b.request_counts)
            b.status, b.request_counts = card.status, counts
            b.output_file_id, b.error_file_id = card.output_file_id, card.error_file_id
            if card.status in TERMINAL:
                b.errors = [_batch_error(e) for e in (card.errors.data if card.errors else [])]
                self._finish(b)
                finished = True
            elif changed:
                self.state.save()
        return finished

    def _finish(self, b: PlannedBatch) -> None:
        """Store what came back, note why the rest did not, bill it, forget the files."""
        lines = {}
        for file_id in (b.output_file_id, b.error_file_id):
            if file_id:
                lines.update(self._download(file_id))
        pieces, failed, billed, ok_lines = self._match(b, lines)
        hashes, vectors = _complete_texts(self.profile, b, pieces, failed)
        # Vectors of texts the caller did not pass (a batch resumed from an earlier run)
        # are stored too (they were paid for), but reported and counted only for passed ones.
        mine = [h for h in hashes if h in self.texts]
        before = self.store.present(mine)
        if hashes:
            self.store.add(hashes, vectors)
        b.failed, b.billed_tokens, b.stored, b.done = failed, billed, len(hashes), True
        b.billed_lines, b.billed_inputs = ok_lines, sum(len(pieces[r]) for r in pieces)
        self.state.save()
        self._bill(b)
        self.stats.stored += len(mine) - len(before)
        self.stats.statuses[b.batch_id or b.key] = b.status
        attempts = self.state.attempts()
        for h in hashes:
            n = attempts.get(h, 1)
            self.stats.attempts[n] = self.stats.attempts.get(n, 0) + 1
        if mine and self.on_stored is not None:
            self.on_stored(mine)
        self._forget_files(b)
        log.info("%s: batch %s %s: %d stored, %d not", self.profile.name, b.batch_id, b.status,
                 len(hashes), len(failed))

    def _match(self, b: PlannedBatch, lines: dict[str, dict[str, Any]]
               ) -> tuple[dict[int, list[tuple[PlannedInput, np.ndarray]]], dict[str, str], int, int]:
        """Vectors per row from the lines that came back; hash -> reason for the rest."""
        pieces: dict[int, list[tuple[PlannedInput, np.ndarray]]] = {}
        failed: dict[str, str] = {}
        billed = ok_lines = 0
        default = _missing_reason(b)
        for r in b.requests:
            line = lines.get(r.custom_id)
            tokens = _billed_tokens(line)
            if tokens is not None:  # billed by the provider whether or not we can use it
                billed += tokens
                ok_lines += 1
            try:
                vectors = self._line_vectors(line, len(r.rows), default)
            except RequestFailed as exc:
                for row in r.rows:
                    failed.setdefault(b.hashes[row], exc.reason)
                continue
            for row, n, vec in zip(r.rows, r.tokens, vectors):
                pieces.setdefault(row, []).append((PlannedInput(row, "", n), vec))
        return pieces, failed, billed, ok_lines

    def _line_vectors(self, line: dict[str, Any] | None, n: int, default: str) -> np.ndarray:
        """A 200 line's checked vectors; ``RequestFailed`` with the reason otherwise."""
        if line is None:
            raise RequestFailed(default)
        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            raise RequestFailed(_line_error(line))
        body = response.get("body") or {}
        try:
            data = list(body["data"])
            indices = [d["index"] for d in data]
            vectors = [decode_embedding(d["embedding"]) for d in data]
            return checked_vectors(self.profile, indices, vectors, n)
        except (KeyError, TypeError, ValueError, MalformedResponse, ProviderError) as exc:
            # A 200 line the protocol does not allow: its texts are not stored (and resubmitted).
            raise RequestFailed(f"the provider returned an unusable result ({exc})") from None

    def _bill(self, b: PlannedBatch) -> None:
        """The ledger line of finished batch ``b`` (its results saved), then ``billed``
        saved: a kill in between is billed when the run resumes, never lost."""
        tokens = b.billed_tokens
        self.stats.tokens += tokens
        self.stats.usd += self.profile.usd(tokens, batch=True) or 0.0
        if self.ledger is not None and b.billed_lines:
            self.ledger.record(self.profile.name, self.profile.model, "embeddings", b.billed_inputs, tokens,
                               self.profile.batch_price, requests=b.billed_lines, api="batch")
        b.billed = True
        self.state.save()

    # -- the provider's files -------------------------------------------------------
    def _download(self, file_id: str) -> dict[str, dict[str, Any]]:
        raw = self._call(lambda: self.client.files.content(file_id), f"download {file_id}", _DOWNLOAD_S)
        out = {}
        for text in raw.text.splitlines():
            try:
                item = json.loads(text)
                out[str(item["custom_id"])] = item
            except (ValueError, KeyError, TypeError):
                log.warning("%s: skipped an unreadable line in %s", self.profile.name, file_id)
        return out

    def _forget_files(self, b: PlannedBatch) -> None:
        """Best effort: the provider keeps files until deleted; a leftover costs storage."""
        for file_id in (b.input_file_id, b.output_file_id, b.error_file_id):
            if file_id:
                try:
                    self._call(lambda: self.client.files.delete(file_id), f"delete {file_id}")
                except (BatchError, ProviderError) as exc:
                    log.info("%s: could not delete file %s (%s)", self.profile.name, file_id, exc)

    def _call(self, send: Callable[[], Any], what: str, deadline_s: float | None = None) -> Any:
        """One Batch/Files API call with the profile's retries; what no retry fixes is
        raised in our words (a refused key, a gone model), the rest as ``BatchError``."""
        try:
            if deadline_s is None:
                return call_with_retries(self.profile, send, 0, self.limiter)
            with scope(Deadline(deadline_s, f"{what} deadline")):
                return call_with_retries(self.profile, send, 0, self.limiter)
        except RequestFailed as exc:
            raise BatchError(f"profile {self.profile.name!r}: could not {what} ({exc.reason}); "
                             "re-run to resume (nothing submitted is submitted again)") from None


def _pieces_per_row(b: PlannedBatch) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in b.requests:
        for row in r.rows:
            counts[row] = counts.get(row, 0) + 1
    return counts


def _complete_texts(profile: Profile, b: PlannedBatch, pieces: dict[int, list[tuple[PlannedInput, np.ndarray]]],
                    failed: dict[str, str]) -> tuple[list[str], np.ndarray]:
    """The hashes whose every piece came back, and their vectors (the token-weighted mean
    of their pieces, as the synchronous backend makes it)."""
    expected = _pieces_per_row(b)
    rows = [row for row in sorted(pieces)
            if len(pieces[row]) == expected[row] and b.hashes[row] not in failed]
    if not rows:
        return [], np.zeros((0, profile.dims), dtype=np.float32)
    position = {row: i for i, row in enumerate(rows)}
    flat = [(PlannedInput(position[row], "", item.tokens), vec) for row in rows for item, vec in pieces[row]]
    vectors = mean_of_pieces(profile, len(rows), flat, {})
    return [b.hashes[row] for row in rows], vectors


def _billed_tokens(line: dict[str, Any] | None) -> int | None:
    """The tokens a 200 line was billed (its body's usage), or None for a line not billed."""
    response = (line or {}).get("response") or {}
    if response.get("status_code") != 200:
        return None
    usage = (response.get("body") or {}).get("usage") or {}
    try:
        return int(usage.get("prompt_tokens", usage.get("total_tokens", 0)))
    except (TypeError, ValueError):
        return 0


def _missing_reason(b: PlannedBatch) -> str:
    if b.status == "failed":
        why = "; ".join(b.errors[:3]) or "no reason given"
        return f"the provider failed batch {b.batch_id} ({why})"
    if b.status in ("expired", "cancelled"):
        return f"batch {b.batch_id} {b.status} before this request ran"
    return f"batch {b.batch_id} ({b.status}) returned no result for this request"


def _line_error(line: dict[str, Any]) -> str:
    error = line.get("error")
    if isinstance(error, dict):
        return f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
    response = line.get("response") or {}
    body = response.get("body") or {}
    message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
    return f"HTTP {response.get('status_code')}: {str(message).splitlines()[0][:200] if message else 'failed'}"


def _batch_error(e: Any) -> str:
    where = f" (line {e.line})" if getattr(e, "line", None) else ""
    return f"{e.code}: {e.message}{where}"
