"""The public API: what `embedpipe` exports, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import embedpipe
from embedpipe import errors


def test_all_lists_exactly_the_public_names() -> None:
    for name in embedpipe.__all__:
        assert getattr(embedpipe, name) is not None
    assert "Index" in embedpipe.__all__


def test_every_error_derives_from_the_base() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.EmbedpipeError)


def test_import_and_help_do_not_load_torch() -> None:
    code = (
        "import sys, embedpipe, embedpipe.cli\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'prefect', 'transformers')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    helped = subprocess.run(
        [sys.executable, "-m", "embedpipe.cli", "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0
    assert "ingest" in helped.stdout and "search" in helped.stdout
