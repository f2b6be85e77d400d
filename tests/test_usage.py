"""The cost ledger: one line per billed request, summed per day and profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpipe.usage import UsageLedger, cost_summary


def test_records_sum_per_day_and_profile_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    ledger = UsageLedger(tmp_path)
    ledger.record("small", "text-embedding-3-small", "embeddings", 10, 1_000_000, 0.02)
    ledger.record("small", "text-embedding-3-small", "embeddings", 5, 500_000, 0.02)
    ledger.record("large", "text-embedding-3-large", "embeddings", 1, 1_000, 0.13)
    with ledger.path.open("ab") as fh:
        fh.write(b'{"ts": "2026-01-01T00:00')  # a crash mid-append
    ledger.record("large", "text-embedding-3-large", "embeddings", 1, 1_000, 0.13)
    rows = cost_summary(ledger)
    assert [(r["profile"], r["requests"], r["tokens"]) for r in rows] == [
        ("large", 2, 2_000), ("small", 2, 1_500_000)]
    assert rows[1]["usd"] == pytest.approx(0.03)
    assert rows[0]["usd"] == pytest.approx(0.00026)
    import datetime as dt

    assert cost_summary(ledger, since=dt.date.today() + dt.timedelta(days=1)) == []
