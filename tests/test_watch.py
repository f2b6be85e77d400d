"""The deprecation watch (issue 20): `embedpipe watch` against a real OpenAI-protocol
server on loopback, whose `/v1/models` cards announce shutdown dates and whose retire
switch answers 404 model_not_found or 410 Gone, as a provider does on deprecation day.

The index ``docs`` is live on ``hosted`` (the loopback server's text-embedding-3-small,
serving the static model's vectors); its replacement is ``static``, the same static model
run locally, so the migration plan is real and cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import types
from pathlib import Path

import pytest

from embedpipe.ingest import ingest
from embedpipe.status import index_status, profile_status
from embedpipe.watch import last_report, watch_here

from conftest import CRANFIELD, LOOPBACK_KEY, cli, hosted_profile_toml, static_profile_toml, write_jsonl

MODEL = "text-embedding-3-small"
DOCS = [{"id": f"d{n}", "text": f"Note {n}: {topic}."} for n, topic in enumerate(
    ["glaciers carve valleys", "compilers emit code", "lava flows downhill", "caches hold answers",
     "rivers reach the sea", "stars burn hydrogen"])]
WATCH_EXIT = 6


def _day(offset: int) -> str:
    return (dt.date.today() + dt.timedelta(days=offset)).isoformat()


@pytest.fixture
def project(make_settings, openai_server, static_model_dir: Path, tmp_path: Path):
    """``make(deprecation=..., more=...)``: settings with ``hosted`` (deprecation table
    fields as TOML, e.g. 'shutdown = "2030-01-01"') and ``static``, and index ``docs``
    built on ``hosted`` once."""
    openai_server.load_model()
    built: dict[str, bool] = {}

    def make(deprecation: str = 'replacement = "static"', more: str = ""):
        extra = f"deprecation = {{ {deprecation} }}\n" if deprecation else ""
        settings = make_settings(more + hosted_profile_toml(openai_server.base_url, extra=extra)
                                 + static_profile_toml(static_model_dir))
        if not built:
            ingest(settings, "docs", write_jsonl(tmp_path / "docs.jsonl", DOCS), profile="hosted")
            built["docs"] = True
        return settings

    return make


def watch_json(capsys, monkeypatch, settings, *args: str) -> tuple[int, dict, str]:
    code, out, err = cli(capsys, monkeypatch, "-c", str(settings.config_path), "watch", "--json", *args)
    return code, json.loads(out), err


def only_row(report: dict) -> dict:
    (row,) = report["rows"]
    return row


# --- the verdicts ---------------------------------------------------------------------------


def test_nothing_to_do_exits_0_and_records_the_check(project, openai_server, capsys, monkeypatch) -> None:
    settings = project()
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    assert code == 0 and report["needs_action"] is False and report["actions"] == []
    row = only_row(report)
    assert (row["index"], row["profile"], row["model"], row["status"]) == ("docs", "hosted", MODEL, "ok")
    assert row["provider_check"]["listed"] is True and row["provider_check"]["probe"] == "ok"
    assert row["days_left"] is None and row["plan"] is None and row["actions"] == []
    recorded = last_report(settings.data_dir)
    assert recorded["rows"]["docs"]["status"] == "ok" and recorded["checked_at"] == report["checked_at"]
    code, out, _ = cli(capsys, monkeypatch, "-c", str(settings.config_path), "watch")
    assert code == 0 and "nothing needs doing" in out and "docs" in out


@pytest.mark.parametrize(("horizon", "args", "needs"), [
    ("", (), True),  # the default horizon, 90 days
    ("[watch]\nwarn_days = 10\n", (), False),
    ("[watch]\nwarn_days = 10\n", ("--warn-days", "45"), True),
], ids=["default-90", "setting-10", "option-45"])
def test_a_catalogue_shutdown_within_warn_days_needs_doing(project, capsys, monkeypatch, horizon, args,
                                                           needs) -> None:
    settings = project(f'shutdown = "{_day(30)}", replacement = "static"', more=horizon)
    code, report, _ = watch_json(capsys, monkeypatch, settings, *args)
    row = only_row(report)
    assert (row["status"], row["days_left"], row["shutdown"]) == ("deprecated", 30, _day(30))
    assert row["shutdown_source"] == "catalogue" and row["needs_action"] is needs
    assert code == (WATCH_EXIT if needs else 0) and report["needs_action"] is needs
    if needs:
        assert "docs: migrate: `embedpipe migrate --to static --index docs`" in " ".join(report["actions"])
    else:
        assert report["actions"] == [] and any("beyond the 10-day horizon" in r for r in row["reasons"])


def test_an_announced_deprecation_without_a_date_needs_doing(project, capsys, monkeypatch) -> None:
    settings = project(f'announced = "{_day(-5)}", replacement = "static"')
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT and row["status"] == "deprecated" and row["days_left"] is None


def test_the_providers_shutdown_date_warns_with_days_left(project, openai_server, capsys, monkeypatch) -> None:
    settings = project()
    openai_server.configure(shutdown_dates={MODEL: _day(20)})
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT
    assert (row["status"], row["days_left"], row["shutdown"], row["shutdown_source"]) == (
        "deprecated", 20, _day(20), "provider")
    assert row["provider_check"]["shutdown_date"] == _day(20)
    assert any(f"announces shutdown_date {_day(20)}" in r for r in row["reasons"])
    # the earlier of the two dates wins
    settings = project(f'shutdown = "{_day(10)}", replacement = "static"')
    row = only_row(watch_json(capsys, monkeypatch, settings)[1])
    assert (row["days_left"], row["shutdown_source"]) == (10, "catalogue")


@pytest.mark.parametrize(("status", "said"), [(404, "HTTP 404 model_not_found"), (410, "HTTP 410")])
def test_a_retired_model_is_reported_with_the_plan_to_its_replacement(project, openai_server, capsys,
                                                                      monkeypatch, status, said) -> None:
    settings = project()
    openai_server.retire(MODEL, status)
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT and row["status"] == "retired" and row["needs_action"] is True
    assert row["provider_check"]["probe"] == "retired" and said in row["provider_check"]["detail"]
    assert row["provider_check"]["listed"] is False and row["days_left"] == 0
    plan = row["plan"]  # migrate --dry-run's numbers for the replacement
    dry = json.loads(cli(capsys, monkeypatch, "-c", str(settings.config_path), "migrate", "--to", "static",
                         "--index", "docs", "--dry-run", "--json")[1])["plan"]
    assert plan["to_profile"] == "static"
    for key in ("documents", "to_embed", "reusable", "tokens", "estimated_usd"):
        assert plan[key] == dry[key], key
    assert (plan["documents"], plan["to_embed"], plan["estimated_usd"]) == (len(DOCS), len(DOCS), 0.0)
    assert plan["estimated_seconds"] is not None and row["plan_error"] is None
    code, out, _ = cli(capsys, monkeypatch, "-c", str(settings.config_path), "watch")
    assert code == WATCH_EXIT and "retired (needs action)" in out
    assert "action: docs: migrate: `embedpipe migrate --to static --index docs`" in out


@pytest.mark.parametrize("cause", ["5xx", "no-key", "down"])
def test_a_provider_that_cannot_be_asked_is_unreachable_not_retired(project, openai_server, capsys,
                                                                    monkeypatch, cause) -> None:
    settings = project()
    if cause == "5xx":
        openai_server.configure(rate_500=1.0)
    elif cause == "no-key":
        monkeypatch.delenv("OPENAI_API_KEY")
    else:
        openai_server.stop()  # nothing listens any more: not asked twice
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT and row["status"] == "unreachable" and row["provider_check"]["probe"] == "unreachable"
    detail = row["provider_check"]["detail"]
    assert {"5xx": "HTTP 500", "no-key": "$OPENAI_API_KEY", "down": "GET /v1/models: connection failed"}[cause] in detail
    assert row["actions"][0].startswith(detail)


def test_a_plan_that_cannot_be_made_is_reported_in_the_row(project, openai_server, capsys, monkeypatch,
                                                           tmp_path: Path) -> None:
    settings = project('replacement = "gone"', more=(
        f'[profiles.gone]\nprovider = "sentence-transformers"\nmodel = "nobody/nothing"\n'
        f'path = "{tmp_path / "no-weights"}"\ndims = 8\n'))
    openai_server.retire(MODEL)
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT and row["plan"] is None
    assert "weights for profile 'gone' not found" in row["plan_error"]
    assert "(no plan: weights for profile 'gone' not found" in report["actions"][-1]


def test_no_replacement_says_how_to_pick_one(project, openai_server, capsys, monkeypatch) -> None:
    settings = project(deprecation="")
    openai_server.retire(MODEL)
    row = only_row(watch_json(capsys, monkeypatch, settings)[1])
    assert row["plan"] is None and row["replacement"] is None
    assert row["adapter_note"] == "no adapter (no replacement known to adapt to)"
    assert "pick a replacement from `embedpipe models`" in row["actions"][0]
    assert "[profiles.hosted.deprecation]" in row["actions"][0]


def test_an_index_whose_profile_is_gone_needs_doing(project, make_settings, capsys, monkeypatch,
                                                    static_model_dir: Path) -> None:
    project()
    settings = make_settings(static_profile_toml(static_model_dir))  # `hosted` removed
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert code == WATCH_EXIT and row["status"] == "unknown-profile"
    assert "define [profiles.hosted] again" in row["actions"][0]


def test_sovereign_mode_asks_no_hosted_provider(project, openai_server, capsys, monkeypatch) -> None:
    project()  # built before sovereign mode was switched on
    settings = project(f'shutdown = "{_day(400)}", replacement = "static"', more="sovereign = true\n")
    openai_server.reset_counters()
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert openai_server.counters()["requests"] == 0
    assert row["provider_check"]["probe"] == "skipped" and "sovereign mode" in row["provider_check"]["detail"]
    assert code == 0 and row["status"] == "deprecated" and row["days_left"] == 400


# --- the adapter column ------------------------------------------------------------------------


def use_adapter(monkeypatch: pytest.MonkeyPatch, record: object | None) -> list[str]:
    """Make `embedpipe.adapters.active_adapter` answer ``record``. Returns the versions
    asked about."""
    seen: list[str] = []

    def active_adapter(settings, version):
        seen.append(version.collection)
        return record

    import embedpipe.adapters as real

    monkeypatch.setattr(real, "active_adapter", active_adapter)
    return seen


def test_the_adapter_column_names_the_adapter_that_keeps_search_up(project, openai_server, capsys,
                                                                   monkeypatch) -> None:
    settings = project()
    openai_server.retire(MODEL)
    fields = {"id": "ad-1234", "profile": "static", "kind": "ridge", "retention": 0.97, "forced": False}
    record = types.SimpleNamespace(**fields, state="accepted", summary=lambda: {**fields, "state": "accepted"})
    seen = use_adapter(monkeypatch, record)
    code, report, _ = watch_json(capsys, monkeypatch, settings)
    row = only_row(report)
    assert "docs__hosted__v1" in seen  # asked about the live version
    assert row["adapter"] == fields
    assert row["adapter_note"] == "adapter ad-1234 via static (retention 0.97)"
    assert code == WATCH_EXIT and not any("embedpipe adapt" in a for a in row["actions"])

    use_adapter(monkeypatch, None)
    row = only_row(watch_json(capsys, monkeypatch, settings)[1])
    assert row["adapter"] is None
    assert row["adapter_note"] == "no adapter: `embedpipe adapt --index docs --to static` would keep search up"
    assert row["actions"][0] == "keep search up now: `embedpipe adapt --index docs --to static`"

    openai_server.retire(MODEL, 0)  # served again: nothing to do, no adapter to show
    row = only_row(watch_json(capsys, monkeypatch, settings)[1])
    assert (row["status"], row["adapter_note"]) == ("ok", "-")


# --- status and models repeat the last check ---------------------------------------------------


def test_status_and_models_show_the_last_watch_without_asking_again(project, openai_server, capsys,
                                                                     monkeypatch) -> None:
    settings = project()
    assert index_status(settings)[0]["watch"] is None  # never checked
    openai_server.retire(MODEL, 410)
    report = watch_here(settings)
    openai_server.reset_counters()

    (entry,) = index_status(settings)
    (warning,) = [w for w in entry["warnings"] if w.startswith("watch (")]
    assert warning.startswith(f"watch ({report.checked_at}): index 'docs' on profile 'hosted' is retired")
    assert "HTTP 410" in warning and "`embedpipe migrate --to static --index docs`" in warning
    assert entry["watch"] == {"checked_at": report.checked_at, "status": "retired", "needs_action": True,
                              "days_left": 0}
    hosted = next(p for p in profile_status(settings) if p["name"] == "hosted")
    assert warning in hosted["warnings"]
    code, out, err = cli(capsys, monkeypatch, "-c", str(settings.config_path), "status")
    assert code == 0 and f"warning: {warning}" in err
    assert f"deprecation watch {report.checked_at}: retired" in out
    code, _, err = cli(capsys, monkeypatch, "-c", str(settings.config_path), "models")
    assert code == 0 and f"warning: {warning}" in err
    assert openai_server.counters()["requests"] == 0  # read from the record, not the network

    openai_server.retire(MODEL, 0)  # the provider serves it again: the next check clears it
    watch_here(settings)
    assert not [w for w in index_status(settings)[0]["warnings"] if w.startswith("watch (")]


def test_a_check_of_a_replaced_version_says_nothing_about_the_live_one(project, openai_server) -> None:
    settings = project()
    openai_server.retire(MODEL)
    watch_here(settings)
    raw = json.loads((settings.data_dir / "watch" / "last.json").read_text())
    raw["rows"]["docs"]["fingerprint"] = "0" * 64  # as if checked before a migration
    (settings.data_dir / "watch" / "last.json").write_text(json.dumps(raw))
    (entry,) = index_status(settings)
    assert entry["watch"] is None and not [w for w in entry["warnings"] if w.startswith("watch (")]


# --- secrets ------------------------------------------------------------------------------------


def test_the_key_never_reaches_the_report_the_record_or_the_output(project, openai_server, capsys,
                                                                   monkeypatch, caplog) -> None:
    settings = project()
    openai_server.retire(MODEL)
    caplog.set_level("DEBUG")
    code, out, err = cli(capsys, monkeypatch, "-v", "-c", str(settings.config_path), "watch", "--json")
    assert code == WATCH_EXIT
    record = (settings.data_dir / "watch" / "last.json").read_text()
    for text in (out, err, record, caplog.text):
        assert LOOPBACK_KEY not in text
    assert openai_server.counters()["auth_requests"] > 0  # the key was sent, to the server only


# --- deprecation day, end to end ----------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.skipif(not CRANFIELD.is_dir(), reason=f"the Cranfield collection is not at {CRANFIELD}")
def test_deprecation_day_end_to_end(openai_server, make_settings, static_model_dir: Path, tmp_path: Path,
                                    capsys, monkeypatch, prefect_api) -> None:
    """Two weeks ahead the watch warns; an adapter is fitted; the provider retires the model
    (the loopback server's switch); search goes on through the adapter; the migration runs
    and retires it; the watch then finds nothing to do and status no longer warns."""
    from embedpipe.evaluation import read_cranfield

    openai_server.load_model()
    texts = list(read_cranfield(CRANFIELD).documents.items())[:200]
    settings = make_settings(
        hosted_profile_toml(openai_server.base_url, limits="max_retries = 1\ntimeout_s = 20",
                            extra=f'deprecation = {{ shutdown = "{_day(14)}", replacement = "static" }}\n')
        + static_profile_toml(static_model_dir) + "[adapter]\nsample_queries = 60\n")
    ingest(settings, "docs", write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": t} for i, t in texts
                                                                    if t.strip()]), profile="hosted")

    def run(*args: str) -> tuple[int, str, str]:
        return cli(capsys, monkeypatch, "-c", str(settings.config_path), *args)

    code, out, _ = run("watch", "--json")
    row = only_row(json.loads(out))
    assert code == WATCH_EXIT and (row["status"], row["days_left"], row["adapter"]) == ("deprecated", 14, None)
    assert row["actions"][0] == "keep search up now: `embedpipe adapt --index docs --to static`"

    code, out, err = run("adapt", "--index", "docs", "--to", "static", "--json")
    assert code == 0, err
    adapter = json.loads(out)["adapter"]

    openai_server.retire(MODEL, 410)  # deprecation day
    code, out, _ = run("watch", "--json")
    row = only_row(json.loads(out))
    assert code == WATCH_EXIT and row["status"] == "retired" and row["adapter"]["id"] == adapter
    assert row["adapter_note"].startswith(f"adapter {adapter} via static")
    assert [a.split(":")[0] for a in row["actions"]] == ["migrate"]  # search is up: only the migration is left
    code, out, err = run("search", "boundary layer transition", "--index", "docs", "--json")
    assert code == 0 and json.loads(out)[0]["via"].startswith(f"adapter {adapter}")

    code, out, err = run("migrate", "--to", "static", "--index", "docs", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["adapters_retired"] == [adapter]
    code, out, _ = run("watch", "--json")
    row = only_row(json.loads(out))
    assert code == 0 and (row["profile"], row["status"], row["adapter"]) == ("static", "ok", None)
    code, _, err = run("status")
    assert code == 0 and "warning: watch (" not in err
