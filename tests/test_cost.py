"""Build or buy (`embedpipe cost report`): monthly totals from a ledger of known records,
the local comparison, break-even worked out by hand, the plot, the CLI and its errors."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from embedpipe.cost import (
    PLOT_DPI,
    PLOT_SIZE_IN,
    build_report,
    load_gpus,
    monthly_usage,
    plot_report,
    trend,
)
from embedpipe.layout import Layout
from embedpipe.usage import UsageLedger, UsageRecord, cost_summary

from conftest import cli, files_under, hosted_profile_toml, static_profile_toml, write_jsonl

PRICE = 0.02  # USD per million tokens, synchronous (hosted_profile_toml's price); batch: half

# (ts, kind, api, requests, inputs, tokens): 1,000 tokens per embedding input.
RECORDS = [
    ("2026-01-10T09:00:00.000+00:00", "embeddings", "sync", 10, 100_000, 100_000_000),
    ("2026-01-20T09:00:00.000+00:00", "embeddings", "batch", 2, 50_000, 50_000_000),
    ("2026-02-05T09:00:00.000+00:00", "embeddings", "sync", 20, 200_000, 200_000_000),
    ("2026-03-15T09:00:00.000+00:00", "chat", "sync", 1, 1, 1_000),
    ("2026-04-01T09:00:00.000+00:00", "embeddings", "sync", 15, 150_000, 150_000_000),
]


def write_ledger(data_dir: Path, records=RECORDS) -> Path:
    """Ledger lines with fixed timestamps, priced as UsageLedger.record prices them."""
    path = Layout(data_dir).usage_ledger
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ts, kind, api, requests, inputs, tokens in records:
            price = PRICE / 2 if api == "batch" else PRICE
            rec = UsageRecord(ts, "hosted", "text-embedding-3-small", kind, requests, inputs, tokens,
                              round(tokens * price / 1e6, 10), api)
            fh.write(json.dumps(rec.__dict__) + "\n")
    return path


@pytest.fixture
def cost_settings(make_settings, static_model_dir):
    """A hosted profile (no server needed: no live index) and the static local model."""
    settings = make_settings(hosted_profile_toml("http://127.0.0.1:9/v1")
                             + static_profile_toml(static_model_dir))
    write_ledger(settings.data_dir)
    return settings


# --- the ledger, per month ---------------------------------------------------------------


def test_monthly_totals_keep_sync_and_batch_apart(cost_settings) -> None:
    rows = monthly_usage(UsageLedger(cost_settings.data_dir).records())
    got = {(r.month, r.kind, r.api): (r.requests, r.inputs, r.tokens, r.usd) for r in rows}
    assert got == {
        ("2026-01", "embeddings", "batch"): (2, 50_000, 50_000_000, 50 * PRICE / 2),
        ("2026-01", "embeddings", "sync"): (10, 100_000, 100_000_000, 100 * PRICE),
        ("2026-02", "embeddings", "sync"): (20, 200_000, 200_000_000, 200 * PRICE),
        ("2026-03", "chat", "sync"): (1, 1, 1_000, 1_000 * PRICE / 1e6),
        ("2026-04", "embeddings", "sync"): (15, 150_000, 150_000_000, 150 * PRICE),
    }


def test_trend_counts_empty_months_and_prices_every_token_both_ways(cost_settings) -> None:
    rows = monthly_usage(UsageLedger(cost_settings.data_dir).records())
    months = trend(rows, cost_settings.profiles)
    assert [m.month for m in months] == ["2026-01", "2026-02", "2026-03", "2026-04"]
    assert [m.tokens for m in months] == [150_000_000, 200_000_000, 0, 150_000_000]  # chat left out
    jan = months[0]
    assert jan.usd_billed == pytest.approx(100 * PRICE + 50 * PRICE / 2)
    assert jan.usd_sync == pytest.approx(150 * PRICE)  # as if all of it were synchronous
    assert jan.usd_batch == pytest.approx(150 * PRICE / 2)
    assert months[1].tokens_change_pct == pytest.approx(round((200 - 150) / 150 * 100, 1))
    assert months[2].tokens_change_pct == -100.0
    assert months[3].tokens_change_pct is None  # nothing to compare with after an empty month


def test_since_leaves_earlier_months_out(cost_settings) -> None:
    import datetime as dt

    report = build_report(cost_settings, since=dt.date(2026, 2, 1))
    assert [m.month for m in report.trend] == ["2026-02", "2026-03", "2026-04"]
    assert report.volume.tokens_per_month == pytest.approx(350_000_000 / 3)


# --- the local comparison and break-even ----------------------------------------------------


def test_break_even_at_a_given_throughput(cost_settings) -> None:
    docs_per_s, usd_h, reserved_h = 100.0, 2.0, 730.0
    report = build_report(cost_settings, compare="static", gpu_usd_per_hour=usd_h,
                          throughput=docs_per_s, gpu_hours_per_month=reserved_h)
    tokens_month = 500_000_000 / 4  # four months, March empty
    tokens_per_input = 500_000_000 / 500_000
    tokens_per_s = docs_per_s * tokens_per_input
    hours = tokens_month / tokens_per_s / 3600
    local = report.local
    assert local.throughput.source == "given" and local.throughput.tokens_per_s == tokens_per_s
    assert local.hours_per_month == pytest.approx(hours, rel=1e-6)
    assert local.usd_per_month_on_demand == pytest.approx(hours * usd_h, rel=1e-6)
    assert local.usd_per_month_reserved == pytest.approx(reserved_h * usd_h)
    sync_month = tokens_month * PRICE / 1e6
    assert report.volume.usd_sync_per_month == pytest.approx(sync_month)
    assert report.volume.usd_batch_per_month == pytest.approx(sync_month / 2)
    sync = report.break_even["sync"]
    # On demand both grow with volume: local per token is cheaper here, so from volume 0.
    assert usd_h / (tokens_per_s * 3600) < PRICE / 1e6
    assert sync["on_demand_volume_tokens_per_month"] == 0
    # Reserved: the month's fixed price over the hosted price per token.
    assert sync["reserved_volume_tokens_per_month"] == round(reserved_h * usd_h / (PRICE / 1e6))
    assert sync["reserved_fits_one_machine"] is (
        reserved_h * usd_h / (PRICE / 1e6) <= reserved_h * 3600 * tokens_per_s)
    assert sync["on_demand_months_to_pay_off"] == 0.0  # no index to move, cheaper every month
    assert sync["reserved_months_to_pay_off"] is None  # $1,460 a month never beats $2.50
    series = report.series
    assert series["month"][-1] == 24
    assert series["hosted_sync"][12] == pytest.approx(12 * sync_month)
    assert series["self_hosted_reserved"][3] == pytest.approx(3 * reserved_h * usd_h)


def test_the_probe_times_the_local_model_here(cost_settings) -> None:
    report = build_report(cost_settings, compare="static", gpu="cpu-2vcpu")
    t = report.local.throughput
    assert t.source == "probe" and t.device.startswith("cpu") and t.texts > 0
    assert t.tokens_per_s == pytest.approx(t.docs_per_s * t.tokens_per_doc, rel=0.01)
    assert report.local.gpu == load_gpus()["cpu-2vcpu"]
    assert report.local.hours_per_month == pytest.approx(
        report.volume.tokens_per_month / t.tokens_per_s / 3600, rel=1e-4)


def test_moving_a_live_hosted_index_and_the_months_to_pay_off(make_settings, openai_server,
                                                              static_model_dir, monkeypatch, capsys) -> None:
    settings = make_settings(hosted_profile_toml(openai_server.base_url)
                             + static_profile_toml(static_model_dir))
    docs = [{"id": f"d{i}", "text": f"document number {i} about wings and flow"} for i in range(40)]
    write_jsonl(Path("docs.jsonl"), docs)
    code, _, err = cli(capsys, monkeypatch, "ingest", "docs.jsonl", "--index", "kb", "--profile", "hosted")
    assert code == 0, err
    write_ledger(settings.data_dir)  # replaces the ingest's own lines: known volume
    billed = openai_server.counters()["requests"]
    docs_per_s, usd_h = 1.0, 0.05  # 34.7 h a month at $0.05: $1.74 against $2.50 hosted
    report = build_report(settings, compare="static", gpu_usd_per_hour=usd_h, throughput=docs_per_s)
    assert openai_server.counters()["requests"] == billed  # the plans send nothing billable
    (move,) = report.migrations
    assert (move.index, move.live_profile, move.documents) == ("kb", "hosted", 40)
    assert (move.hosted_tokens, move.usd_sync, move.usd_batch) == (0, 0.0, 0.0)  # already there
    assert move.local_texts == 40
    one_off = 40 / docs_per_s / 3600 * usd_h
    assert move.usd_local == pytest.approx(one_off, rel=1e-4)
    sync_month = 125_000_000 * PRICE / 1e6
    saving = sync_month - report.local.usd_per_month_on_demand
    assert saving > 0
    assert report.break_even["sync"]["on_demand_months_to_pay_off"] == pytest.approx(one_off / saving, rel=1e-3)
    assert report.series["self_hosted_on_demand"][0] == pytest.approx(one_off, rel=1e-4)


# --- the plot -----------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# Six months of growing use: the ledger behind the README's figure.
GROWING = [(f"2026-0{m}-15T12:00:00.000+00:00", "embeddings", "sync", 100, tokens // 800, tokens)
           for m, tokens in enumerate([300_000_000, 340_000_000, 400_000_000, 450_000_000,
                                       520_000_000, 600_000_000], start=1)]


def test_the_plot_is_a_png_of_the_fixed_size(cost_settings, tmp_path) -> None:
    """Also makes the README's figure: README_COST_PLOT=docs/img/cost-report.png."""
    import os
    import shutil

    write_ledger(cost_settings.data_dir, GROWING)
    report = build_report(cost_settings, compare="static", gpu="cpu-2vcpu")
    out = plot_report(report, tmp_path / "cost.png")
    assert png_size(out) == (int(PLOT_SIZE_IN[0] * PLOT_DPI), int(PLOT_SIZE_IN[1] * PLOT_DPI))
    assert not list(tmp_path.glob(".*.tmp"))
    if os.environ.get("README_COST_PLOT"):
        shutil.copyfile(out, Path(os.environ["README_COST_PLOT"]))


# --- the CLI ------------------------------------------------------------------------------


def test_cost_report_json_and_text(cost_settings, monkeypatch, capsys, tmp_path) -> None:
    args = ("cost", "report", "--compare", "static", "--gpu-usd-per-hour", "2", "--throughput", "100")
    code, out, err = cli(capsys, monkeypatch, *args, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) >= {"months", "trend", "volume", "local", "migrations", "break_even", "series",
                         "assumptions"}
    assert data["volume"]["tokens_per_month"] == 125_000_000
    assert data["local"]["gpu"]["usd_per_hour"] == 2.0
    code, out, err = cli(capsys, monkeypatch, *args, "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    assert "hosted usage per month" in out and "2026-02" in out and "200,000,000" in out
    assert "on demand" in out and "assumes:" in out and (tmp_path / "c.png").is_file()


def test_cost_without_a_subcommand_is_unchanged(cost_settings, monkeypatch, capsys) -> None:
    code, out, err = cli(capsys, monkeypatch, "cost", "--since", "2026-02-01", "--json")
    assert code == 0, err
    import datetime as dt

    expected = cost_summary(UsageLedger(cost_settings.data_dir), dt.date(2026, 2, 1))
    assert json.loads(out) == expected
    code, out, _ = cli(capsys, monkeypatch, "cost")
    assert code == 0 and out.splitlines()[0].split() == ["day", "profile", "kind", "requests", "tokens", "USD"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--since", "yesterday"], "is not a date"),
        (["--compare", "nope"], "nope"),
        (["--compare", "hosted"], "is a hosted profile"),
        (["--compare", "static", "--gpu", "tpu-9000"], "unknown --gpu 'tpu-9000'"),
        (["--compare", "static", "--throughput", "5"], "--gpu-usd-per-hour"),
        (["--plot", "cost.jpg"], "write a .png file"),
        (["--since", "2030-01-01"], "no usage since 2030-01-01"),
    ],
)
def test_mistakes_end_in_one_line_and_change_nothing(cost_settings, monkeypatch, capsys, tmp_path,
                                                       args, says) -> None:
    before = files_under(tmp_path)
    code, out, err = cli(capsys, monkeypatch, "cost", "report", *args)
    assert code != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err
    assert files_under(tmp_path) == before


def test_no_ledger_and_no_matplotlib_are_one_line_errors(make_settings, cost_settings, monkeypatch,
                                                          capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, _, err = cli(capsys, monkeypatch, "cost", "report", "--plot", "c.png")
    assert code != 0 and "pip install 'embedpipe[plot]'" in err and err.count("\n") == 1
    Layout(cost_settings.data_dir).usage_ledger.unlink()
    before = files_under(tmp_path)
    code, _, err = cli(capsys, monkeypatch, "cost", "report")
    assert code != 0 and "no usage ledger" in err and err.count("\n") == 1
    assert files_under(tmp_path) == before
