"""The usage and cost ledger of hosted calls.

Every successful hosted request appends one JSON line to ``<data>/usage/ledger.jsonl``:
when, which profile and model, how many inputs and tokens, and what it cost at the
price in force then (so a later price change does not rewrite history). Tokens are
the provider's own ``usage.prompt_tokens`` when it reports them (that is what it
bills), else our exact tiktoken count. Lines are appended under a lock, one
``write`` each; a torn last line (a crash mid-write) is skipped when reading.
Nothing secret is recorded: no key, no text. The file is 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedpipe._files import make_dir, open_append, writing
from embedpipe.layout import Layout

__all__ = ["UsageLedger", "UsageRecord", "cost_summary"]

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class UsageRecord:
    """One hosted request that the provider answered (and so billed)."""

    ts: str  # UTC, ISO 8601
    profile: str
    model: str
    kind: str  # "embeddings" or "chat"
    requests: int
    inputs: int
    tokens: int
    usd: float
    # "sync" (a request answered at once) or "batch" (the Batch API, billed at its price).
    api: str = "sync"

    @property
    def day(self) -> str:
        return self.ts[:10]


class UsageLedger:
    """Append-only JSONL ledger under ``<data_dir>/usage``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Layout(Path(data_dir)).usage_ledger
        with _locks_guard:
            self._lock = _locks.setdefault(str(self.path), threading.Lock())

    def record(
        self, profile: str, model: str, kind: str, inputs: int, tokens: int,
        price_per_million: float | None, requests: int = 1, api: str = "sync",
    ) -> UsageRecord:
        """Append one request's usage (or ``requests`` of one batch, ``api="batch"``, at
        the batch price the caller passes); returns what was written."""
        entry = UsageRecord(
            ts=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            profile=profile,
            model=model,
            kind=kind,
            requests=requests,
            inputs=inputs,
            tokens=tokens,
            usd=round(tokens * (price_per_million or 0.0) / 1_000_000, 10),
            api=api,
        )
        line = (json.dumps(asdict(entry), separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock, writing(self.path.parent):
            make_dir(self.path.parent)
            fd = open_append(self.path, read=True)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn line from a crash: start afresh
                os.write(fd, line)
            finally:
                os.close(fd)
        return entry

    def records(self) -> Iterator[UsageRecord]:
        """Every complete record, oldest first."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            for raw in fh:
                try:
                    yield UsageRecord(**json.loads(raw))
                except (ValueError, TypeError):
                    continue  # a torn line from a crash mid-append


def cost_summary(ledger: UsageLedger, since: dt.date | None = None) -> list[dict[str, Any]]:
    """Requests, inputs, tokens and USD per (day, profile, kind), oldest day first."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in ledger.records():
        if since is not None and rec.day < since.isoformat():
            continue
        key = (rec.day, rec.profile, rec.kind)
        row = rows.setdefault(key, {"day": rec.day, "profile": rec.profile, "model": rec.model,
                                    "kind": rec.kind, "requests": 0, "inputs": 0, "tokens": 0,
                                    "usd": 0.0})
        row["requests"] += rec.requests
        row["inputs"] += rec.inputs
        row["tokens"] += rec.tokens
        row["usd"] += rec.usd
    for row in rows.values():
        row["usd"] = round(row["usd"], 10)
    return [rows[k] for k in sorted(rows)]
