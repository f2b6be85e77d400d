"""The `embedpipe` command, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config, write_jsonl

DOCS = [
    {"id": "a", "text": "Glaciers carve U-shaped valleys and fjords.", "kind": "geo"},
    {"id": "b", "text": "Compilers translate source code into machine instructions.", "kind": "cs"},
]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedpipe.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_ingest_search_status_models_as_json(tmp_path: Path) -> None:
    write_config(tmp_path)
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = run("ingest", str(docs), "--index", "kb", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {k: report[k] for k in ("added", "updated", "unchanged", "failed", "embedded")} == {
        "added": 2, "updated": 0, "unchanged": 0, "failed": 0, "embedded": 2}

    out = run("search", "how are fjords formed", "--index", "kb", "-k", "2", "--json", cwd=tmp_path)
    hits = json.loads(out.stdout)
    assert hits[0]["id"] == "a" and hits[0]["metadata"] == {"kind": "geo"}
    assert set(hits[0]) == {"id", "score", "metadata"}

    status = json.loads(run("status", "--json", cwd=tmp_path).stdout)
    (entry,) = status
    assert entry["alias"] == "kb__local-minilm__v1" and entry["documents"] == 2
    (version,) = entry["versions"]
    assert (version["state"], version["points"], version["live"]) == ("live", 2, True)
    assert len(version["fingerprint"]) == 64

    models = {m["name"]: m for m in json.loads(run("models", "--json", cwd=tmp_path).stdout)}
    assert models["local-minilm"]["usable"] is True
    assert models["local-minilm"]["fingerprint"] == version["fingerprint"][:12]
    assert models["local-bge"]["usable"] is False
    assert models["openai-3-small"]["usable"] is False


def test_human_output(tmp_path: Path) -> None:
    write_config(tmp_path)
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    planned = run("ingest", str(docs), "--index", "kb", "--dry-run", cwd=tmp_path).stdout
    assert "nothing written" in planned and "2 texts to embed" in planned
    assert "2 added" in run("ingest", str(docs), "--index", "kb", cwd=tmp_path).stdout
    assert "0 embedded" in run("ingest", str(docs), "--index", "kb", cwd=tmp_path).stdout
    assert " b " in run("search", "compilers", "--index", "kb", "-k", "1", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["ingest", "missing.jsonl", "--index", "kb"], "does not exist", 2),
        (["ingest", "docs.jsonl", "--index", "kb", "--profile", "nope"], "unknown profile 'nope'", 2),
        (["search", "x", "--index", "nowhere"], "has no live version", 2),
        (["ingest", "docs.jsonl", "--index", "bad__name"], "invalid index name", 2),
        (["status", "--index", "nowhere"], "does not exist", 2),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message, code) -> None:
    write_config(tmp_path)
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = run(*args, cwd=tmp_path)
    assert out.returncode == code
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_every_command_has_help(tmp_path: Path) -> None:
    for command in ("ingest", "search", "status", "models", "cost"):
        out = run(command, "--help", cwd=tmp_path)
        assert out.returncode == 0 and "--json" in out.stdout
    out = run("serve", "--help", cwd=tmp_path)
    assert out.returncode == 0 and all(o in out.stdout for o in ("--host", "--port", "--config"))
    for command in (("keys", "add"), ("keys", "list")):
        out = run(*command, "--help", cwd=tmp_path)
        assert out.returncode == 0 and "--json" in out.stdout
    out = run("keys", "add", "--help", cwd=tmp_path)
    assert all(o in out.stdout for o in ("--index", "--scope", "--env"))
    assert run("keys", "remove", "--help", cwd=tmp_path).returncode == 0


def test_keys_add_does_not_import_the_server(tmp_path: Path) -> None:
    write_config(tmp_path)
    code = ("import sys\nsys.argv = ['embedpipe', 'keys', 'add', 'app', '-i', 'docs', '-s', 'read']\n"
            "from embedpipe.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('loaded:', ','.join(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "added key 'app'" in out.stderr, out.stderr
    assert out.stdout.strip().endswith("loaded:")


def test_help_does_not_import_the_server() -> None:
    code = ("import sys\nsys.argv = ['embedpipe', '--help']\nfrom embedpipe.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('loaded:', ','.join(m for m in ('fastapi', 'uvicorn', 'starlette', 'embedpipe.serve.app')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("loaded:")
