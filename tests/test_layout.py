"""Index names and the paths built from them: one check, nothing outside the data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedpipe.errors import ConfigError
from embedpipe.layout import Layout, check_index_name

from conftest import cli, write_config, write_jsonl

BAD_NAMES = ["../../x", "..", ".", "a/b", "a\\b", "x\0y", "", "a__b", "ä" * 65, "/etc/x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_index_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid index name"):
        check_index_name(name)


@pytest.mark.parametrize("name", ["kb", "docs-2024", "my_index", "A1"])
def test_good_index_names_pass(name: str) -> None:
    check_index_name(name)


def test_every_index_path_goes_through_the_check_and_stays_under_the_root(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    scoped = [layout.corpus, layout.migrations, layout.runs, layout.pending, layout.lock,
              lambda i: layout.lock(i, "migrate")]
    for build in scoped:
        path = build("kb")
        assert path.resolve().is_relative_to((tmp_path / "data").resolve())
        assert "kb" in path.name or path.name == "kb"
        with pytest.raises(ConfigError, match="invalid index name"):
            build("../../x")
    assert layout.vectors("ab" * 32) == tmp_path / "data" / "vectors" / ("ab" * 8)
    with pytest.raises(ConfigError):
        layout.vectors("../../../../etc")
    with pytest.raises(ConfigError):
        layout.lock("kb", "../x")


def _outside(tmp_path: Path) -> set[str]:
    """Every path under tmp_path except the data directory and the cache."""
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
            if not p.is_relative_to(tmp_path / "data") and not p.is_relative_to(tmp_path / "cache")}


@pytest.mark.parametrize("args", [
    ["rollback", "--index", "{bad}"],
    ["retire", "--index", "{bad}", "--yes"],
    ["retire", "--index", "{bad}", "--dry-run"],
    ["migrate", "--to", "local-minilm", "--index", "{bad}", "--dry-run"],
    ["migrate", "--to", "local-minilm", "--index", "{bad}", "--yes"],
    ["ingest", "docs.jsonl", "--index", "{bad}"],
    ["ingest", "docs.jsonl", "--index", "{bad}", "--dry-run"],
    ["sync", "--index", "{bad}"],
    ["search", "anything", "--index", "{bad}"],
    ["ask", "anything", "--index", "{bad}"],
    ["status", "--index", "{bad}"],
])
@pytest.mark.parametrize("bad", ["../../x", "../outside"])
def test_every_command_refuses_a_path_as_index_name(tmp_path, capsys, monkeypatch, args, bad) -> None:
    write_config(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "hello"}])
    before = _outside(tmp_path)
    code, _, err = cli(capsys, monkeypatch, *[a.format(bad=bad) for a in args])
    assert code == 2, err
    assert err.startswith("error: invalid index name") and err.count("\n") == 1
    assert _outside(tmp_path) == before  # nothing made outside the data directory


def test_library_entries_refuse_a_path_as_index_name(settings, tmp_path: Path) -> None:
    from embedpipe.index import Index
    from embedpipe.ingest import delete
    from embedpipe.migration import Migration, retire, rollback
    from embedpipe.sync import last_runs

    before = _outside(tmp_path)
    for call in (lambda: rollback(settings, "../../x"), lambda: retire(settings, "../../x"),
                 lambda: delete(settings, "../../x", ["a"]), lambda: Index("../../x", settings),
                 lambda: Migration(settings, "../../x", "local-minilm"),
                 lambda: last_runs(settings, "../../x")):
        with pytest.raises(ConfigError, match="invalid index name"):
            call()
    assert _outside(tmp_path) == before
