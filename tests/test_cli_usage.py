"""Usage mistakes through the installed `embedpipe` entry point: click's message, exit 2,
never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import embedpipe

ENTRY = Path(sys.executable).with_name("embedpipe")


def run_entry(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert ENTRY.is_file(), f"the console script is not installed at {ENTRY}"
    return subprocess.run([str(ENTRY), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["migrate", "--to", "x", "--bogus"], "No such option: --bogus"),
        (["search"], "Missing argument"),
        (["search", "q", "--index", "kb", "-k", "abc"], "-k"),
        (["bogus"], "No such command 'bogus'"),
        (["statsu"], "Did you mean 'status'"),
        (["search", "q", "--idnex", "kb"], "Possible options: --index"),
    ],
)
def test_usage_mistakes_print_usage_and_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    out = run_entry(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "Usage:" in out.stderr
    assert says.lower() in out.stderr.lower()
    assert out.stdout == ""


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    out = run_entry("--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"embedpipe {embedpipe.__version__}"
