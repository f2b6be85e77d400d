"""Packing texts into Batch API input files, and the state file that remembers them.

Packing (``plan_batches``): each text is planned as the hosted backend plans it (the
document prompt, exact tiktoken counts, over-long texts split into pieces or refused:
``hosted.plan_inputs``); a text's pieces always travel in one batch (its vector is the
mean of all of them), and requests are packed by ``hosted.pack_requests`` within
``max_inputs_per_request`` (and the synchronous ``max_inputs``) and
``limits.max_request_tokens``. A batch closes before it would pass
``max_inputs_per_batch`` inputs, ``max_requests_per_file`` lines or ``max_file_bytes``
bytes, measured on the exact JSONL it will upload.

The state file (``BatchState``) is JSON written atomically and durably (a temporary
name, fsync, rename): the batches planned, their file and batch ids, their status,
which content hash each request line's inputs belong to, and the reasons texts failed.
It never holds a text or a key.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedpipe._files import write_json
from embedpipe.backends.hosted import PlannedInput, pack_requests, plan_inputs
from embedpipe.errors import BatchError
from embedpipe.profiles import Profile
from embedpipe.tokens import TokenCounter

__all__ = ["ENDPOINT", "STATE_VERSION", "BatchState", "PlannedBatch", "Request", "plan_batches"]

ENDPOINT = "/v1/embeddings"
STATE_VERSION = 1
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Request:
    """One line of an input file: its custom_id, and per input the row (an index into
    its batch's ``hashes``) and exact token count."""

    custom_id: str
    rows: list[int]
    tokens: list[int]


@dataclass
class PlannedBatch:
    """One batch: planned, then uploaded (``input_file_id``), then created (``batch_id``),
    polled (``status``), and finally ``done`` once its results were stored."""

    key: str  # local name, also the custom_id prefix: "b0003"
    hashes: list[str]
    requests: list[Request]
    status: str = "planned"  # then "uploaded", then the provider's batch status
    input_file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # why the provider failed the batch
    done: bool = False
    billed_tokens: int = 0
    stored: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # hash -> reason, this batch
    run: int = 0  # the run (``BatchState.run``) whose submission this is: attempts count per run
    # The ledger line of a finished batch: written after ``done`` is saved, then ``billed``
    # is saved; a run killed between the two writes it when it resumes.
    billed: bool = False
    billed_lines: int = 0
    billed_inputs: int = 0

    @property
    def failed_whole(self) -> bool:
        """The provider failed the batch as a whole (batch-level ``errors``, e.g. OpenAI's
        ``token_limit_exceeded``) and no line of it completed."""
        return self.done and self.status == "failed" and bool(self.errors) and not self.stored \
            and not self.billed_tokens

    @property
    def inputs(self) -> int:
        return sum(len(r.rows) for r in self.requests)

    @property
    def tokens(self) -> int:
        return sum(sum(r.tokens) for r in self.requests)

    @property
    def active(self) -> bool:
        return not self.done

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PlannedBatch:
        raw = dict(raw)
        raw["requests"] = [Request(**r) for r in raw["requests"]]
        raw.setdefault("billed", raw.get("done", False))  # older files billed before saving
        return cls(**raw)


@dataclass
class BatchState:
    """What a Batch API run has submitted, for resuming it and for ``status``."""

    path: Path
    profile: str
    fingerprint: str
    model: str
    batches: list[PlannedBatch] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # hash -> reason, final (planning refusals)
    updated: str = ""
    run: int = 0  # counts the runs (calls) that used this state: attempts are per run
    # hash -> reason, texts the last run gave up on after max_attempts submissions; the
    # next run tries them again (a fresh max_attempts)
    exhausted: dict[str, str] = field(default_factory=dict)
    # hash -> reason, texts a run with resubmit off did not send again (a run that
    # resubmits takes them up)
    unsent: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> BatchState | None:
        """The state at ``path``, or None when there is no file."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise BatchError(f"batch state {path} is unreadable ({exc}); move it away only if "
                             "its batches were cancelled, or they are billed again") from None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise BatchError(f"batch state {path} is not a version-{STATE_VERSION} embedpipe "
                             "batch state file")
        try:
            return cls(Path(path), str(raw["profile"]), str(raw["fingerprint"]), str(raw["model"]),
                       [PlannedBatch.from_json(b) for b in raw["batches"]], dict(raw.get("failed", {})),
                       str(raw.get("updated", "")), int(raw.get("run", 0)), dict(raw.get("exhausted", {})),
                       dict(raw.get("unsent", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BatchError(f"batch state {path} is malformed ({type(exc).__name__}: {exc}); restore it "
                             "from a backup, or move it away only if its batches were cancelled, "
                             "or they are billed again") from None

    @classmethod
    def open(cls, path: Path, profile: Profile, fingerprint: str) -> BatchState:
        """The state at ``path`` for this profile's space, or a new one."""
        state = cls.read(path)
        if state is None:
            return cls(Path(path), profile.name, fingerprint, profile.model)
        if state.fingerprint != fingerprint:
            raise BatchError(
                f"batch state {path} belongs to profile {state.profile!r} (another embedding "
                f"space than {profile.name!r}); use another state file for this profile")
        return state

    def save(self) -> None:
        """Write atomically and durably: a batch id must survive the crash that follows."""
        self.updated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        data = {"version": STATE_VERSION, "profile": self.profile, "fingerprint": self.fingerprint,
                "model": self.model, "updated": self.updated, "failed": self.failed,
                "run": self.run, "exhausted": self.exhausted, "unsent": self.unsent,
                "batches": [asdict(b) for b in self.batches]}
        write_json(self.path, data, durable=True)

    def next_key(self) -> str:
        return f"b{len(self.batches) + 1:04d}"

    def attempts(self) -> dict[str, int]:
        """Hash -> how many batches of this run it was put in (each one a submission, or
        about to be). Earlier runs' batches do not count: re-running gives a text a fresh
        ``max_attempts``."""
        counts: dict[str, int] = {}
        for b in self.batches:
            if b.run != self.run or b.status == "discarded":
                continue
            for h in set(b.hashes):
                counts[h] = counts.get(h, 0) + 1
        return counts

    def in_flight(self) -> set[str]:
        return {h for b in self.batches if b.active for h in b.hashes}

    def last_reasons(self) -> dict[str, str]:
        """Hash -> why its latest finished batch did not store it."""
        out: dict[str, str] = {}
        for b in self.batches:
            if b.done:
                out.update(b.failed)
        return out


@dataclass(frozen=True)
class _Text:
    hash: str
    pieces: list[PlannedInput]


def request_line(profile: Profile, custom_id: str, texts: Sequence[str]) -> str:
    """One JSONL line of an input file (ASCII JSON: its length is its size in bytes)."""
    body: dict[str, Any] = {"model": profile.model, "input": list(texts), "encoding_format": "base64"}
    if profile.dimensions:
        body["dimensions"] = profile.dimensions
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}) + "\n"


def plan_batches(
    profile: Profile, texts: Mapping[str, str], first_key: int
) -> tuple[list[PlannedBatch], dict[str, str]]:
    """Batches for ``texts`` (hash -> text) within every limit, and the texts that cannot
    go (hash -> reason: over max_tokens with long_inputs = "reject", or too big for any
    batch). Batch keys count up from ``first_key``."""
    hashes = list(texts)
    counter = TokenCounter(profile.tokenizer)
    inputs, refused = plan_inputs(profile, counter, [profile.document_prompt + texts[h] for h in hashes])
    failed = {hashes[row]: reason for row, reason in refused.items()}
    by_row: dict[int, list[PlannedInput]] = {}
    for item in inputs:
        by_row.setdefault(item.row, []).append(item)
    packer = _Packer(profile, first_key)
    for row, pieces in by_row.items():
        why = packer.add(_Text(hashes[row], pieces))
        if why:
            failed[hashes[row]] = why
    return packer.finish(), failed


class _Packer:
    """Greedy and incremental: texts join the open batch until one more would break a
    limit. The open batch's last request is tracked as ``pack_requests`` would grow it,
    and line sizes are summed exactly (``request_line`` is ASCII JSON: an input list of
    n strings is ``2 + sum(len(json.dumps(s))) + 2 * (n - 1)`` bytes), so adding a text
    costs its own pieces, not the batch's."""

    def __init__(self, profile: Profile, first_key: int) -> None:
        self.profile = profile
        self.limits = profile.batch
        self.max_inputs = min(profile.batch.max_inputs_per_request, profile.limits.max_inputs)
        self.max_tokens = profile.limits.max_request_tokens
        self.key = first_key
        self.done: list[PlannedBatch] = []
        self._reset()

    def _reset(self) -> None:
        self.open: list[_Text] = []
        # inputs, lines and bytes of the open batch; its last line: inputs, tokens, bytes
        self.totals = (0, 0, 0)
        self.last = (0, 0, 0)
        self.empty_line = len(request_line(self.profile, self._custom_id(0), []))

    def add(self, text: _Text) -> str | None:
        """Add a text, closing the open batch first if it no longer fits; the reason
        when the text fits in no batch at all."""
        grown = self._grow(text)
        if grown is None and self.open:
            self.done.append(self._build())
            self._reset()
            grown = self._grow(text)
        if grown is None:
            return (f"its {len(text.pieces)} input(s) do not fit one batch within the Batch API "
                    f"limits of profile {self.profile.name!r} ([profiles.{self.profile.name}.batch])")
        self.open.append(text)
        self.totals, self.last = grown
        return None

    def finish(self) -> list[PlannedBatch]:
        if self.open:
            self.done.append(self._build())
            self._reset()
        return self.done

    def _grow(self, text: _Text) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        """The open batch's totals and last line with ``text`` added, or None when a
        limit would break (the greedy rule of ``pack_requests``, step by step)."""
        inputs, lines, size = self.totals
        n, used, line = self.last
        for piece in text.pieces:
            width = len(json.dumps(piece.text))
            if n and (n >= self.max_inputs or used + piece.tokens > self.max_tokens):
                n, used, line = 0, 0, 0
            if n == 0:
                lines += 1
                line = self.empty_line
                size += line
            grow = width + (2 if n else 0)  # ", " between items
            n, used, line, size, inputs = n + 1, used + piece.tokens, line + grow, size + grow, inputs + 1
        ok = (inputs <= self.limits.max_inputs_per_batch and lines <= self.limits.max_requests_per_file
              and size <= self.limits.max_file_bytes)
        return ((inputs, lines, size), (n, used, line)) if ok else None

    def _custom_id(self, n: int) -> str:
        return f"b{self.key:04d}-r{n:05d}"

    def _build(self) -> PlannedBatch:
        flat = [PlannedInput(i, p.text, p.tokens) for i, t in enumerate(self.open) for p in t.pieces]
        packed = pack_requests(flat, self.max_inputs, self.max_tokens)
        requests = [Request(self._custom_id(n), [p.row for p in r], [p.tokens for p in r])
                    for n, r in enumerate(packed)]
        size = sum(len(request_line(self.profile, r.custom_id, [p.text for p in group]))
                   for r, group in zip(requests, packed))
        if (len(flat), len(packed), size) != self.totals:  # the arithmetic above is wrong
            raise BatchError(f"internal: batch packing measured {self.totals}, built "
                             f"{(len(flat), len(packed), size)}; please report this")
        batch = PlannedBatch(f"b{self.key:04d}", [t.hash for t in self.open], requests)
        self.key += 1
        return batch


def input_file(profile: Profile, batch: PlannedBatch, texts: Mapping[str, str]) -> bytes:
    """The JSONL input file of ``batch``, rebuilt from the texts (the state holds none).

    Pieces are cut again exactly as planned: the plan is deterministic for a text, so
    the rebuilt requests carry the same inputs as the ones the state records."""
    counter = TokenCounter(profile.tokenizer)
    planned, refused = plan_inputs(profile, counter, [profile.document_prompt + texts[h] for h in batch.hashes])
    if refused:
        raise BatchError(f"batch {batch.key}'s texts can no longer be planned as they were "
                         "(the profile changed?); re-run with a new state file")
    by_row: dict[int, list[PlannedInput]] = {}
    for item in planned:
        by_row.setdefault(item.row, []).append(item)
    pieces: dict[int, Iterator[PlannedInput]] = {row: iter(items) for row, items in by_row.items()}
    lines = []
    for r in batch.requests:
        items = [next(pieces[row]) for row in r.rows]
        if [i.tokens for i in items] != r.tokens:  # another tokenizer or max_tokens since
            raise BatchError(f"batch {batch.key}'s texts no longer count as planned (the profile "
                             "changed?); re-run with a new state file")
        lines.append(request_line(profile, r.custom_id, [i.text for i in items]))
    return "".join(lines).encode("ascii")
