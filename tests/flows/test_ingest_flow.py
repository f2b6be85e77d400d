"""The sync flow on Prefect's real test server: tasks, the summary artifact, failures.

The same steps are tested without Prefect in tests/test_sync.py; here the flow is run
through `run_sync` and `embedpipe sync --prefect`, and read back from the server.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from embedpipe.errors import MassDeleteRefused
from embedpipe.sync import last_runs

from conftest import prefect_records, static_profile_toml

FILES = {
    "venus.txt": "Venus has a runaway greenhouse effect.",
    "mars.md": "# Mars\n\nMars has planet-wide dust storms.",
    "tcp.html": "<html><body><p>TCP retransmits lost segments.</p></body></html>",
}


@pytest.fixture
def project(make_settings, static_model_dir: Path, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in FILES.items():
        (src / name).write_text(text, encoding="utf-8")
    settings = make_settings('default_profile = "static"\n' + static_profile_toml(static_model_dir)
                             + f'\n[indexes.notes]\nsource = "{src}"\n')
    return settings, src


def test_sync_flow_records_a_summary_artifact(prefect_api: str, project) -> None:
    from embedpipe.flows.ingest import run_sync

    settings, src = project
    first = run_sync(settings, "notes")
    assert (first["added"], first["failed"], first["status"]) == (3, 0, "ok")
    (src / "venus.txt").unlink()
    (src / "bad.txt").write_bytes(b"\xff broken")
    second = run_sync(settings, "notes")
    assert (second["deleted"], second["unchanged"], second["failed"], second["embedded"]) == (1, 2, 1, 0)

    run, tasks, artifacts = prefect_records("sync-notes")
    assert run.state.is_completed()
    assert sorted(t.name for t in tasks) == ["apply-changes-notes", "read-source-notes"]
    (artifact,) = [a for a in artifacts if a.key == "sync-notes"]
    assert "| deleted | 1 |" in artifact.data and "| unchanged | 2 |" in artifact.data
    assert "`bad.txt`: not valid UTF-8" in artifact.data
    # the run log has both runs, newest first, with the same numbers
    runs = last_runs(settings, "notes")
    assert [(r["added"], r["deleted"], r["status"]) for r in runs[:2]] == [(0, 1, "partial"), (3, 0, "ok")]


def test_a_refused_run_fails_the_flow_and_is_logged(prefect_api: str, project) -> None:
    from embedpipe.flows.ingest import run_sync

    settings, src = project
    run_sync(settings, "notes")
    for name in FILES:
        (src / name).unlink()
    with pytest.raises(MassDeleteRefused):
        run_sync(settings, "notes")
    run, _, _ = prefect_records("sync-notes")
    assert run.state.is_failed()
    assert last_runs(settings, "notes")[0]["status"] == "error"
    done = run_sync(settings, "notes", allow_mass_delete=True)
    assert done["deleted"] == 3


def test_cli_sync_through_prefect(prefect_api: str, project, capsys, monkeypatch) -> None:
    from embedpipe.cli import main

    settings, _ = project
    monkeypatch.setattr(sys, "argv", ["embedpipe", "-c", str(settings.config_path), "sync",
                                      "--index", "notes", "--prefect", "--json"])
    capsys.readouterr()
    main()
    summary = json.loads(capsys.readouterr().out)
    assert summary["added"] == 3 and summary["index"] == "notes"
    run, _, _ = prefect_records("sync-notes")
    assert run.state.is_completed()
