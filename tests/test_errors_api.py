"""The public API: what `embedpipe` exports, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import embedpipe
from embedpipe import errors


def test_all_lists_exactly_the_public_names() -> None:
    expected = {*errors.__all__, "Hit", "Index", "RemoteIndex", "__version__", "ingest", "load_settings",
                "sync"}
    assert sorted(embedpipe.__all__) == sorted(expected)
    assert len(embedpipe.__all__) == len(set(embedpipe.__all__))
    for name in embedpipe.__all__:
        assert getattr(embedpipe, name) is not None
    for name in errors.__all__:  # every error class, the very same object
        assert getattr(embedpipe, name) is getattr(errors, name)


def test_errors_all_lists_every_error_class() -> None:
    classes = {n for n, v in vars(errors).items()
               if isinstance(v, type) and issubclass(v, errors.EmbedpipeError)}
    assert sorted(errors.__all__) == sorted(classes)


def test_every_error_derives_from_the_base() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.EmbedpipeError)


def test_import_and_help_do_not_load_torch() -> None:
    code = (
        "import sys, embedpipe, embedpipe.cli\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'prefect', 'transformers', 'fastapi',"
        " 'uvicorn')"
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


def test_data_dir_errors_have_their_own_exit_codes() -> None:
    # A script tells a read-only data directory (73, EX_CANTCREAT) from a full disk (74, EX_IOERR).
    assert issubclass(errors.DataDirReadOnly, errors.DataDirError)
    assert issubclass(errors.DiskFull, errors.DataDirError)
    assert (errors.DataDirReadOnly.exit_code, errors.DiskFull.exit_code) == (73, 74)
    assert errors.DataDirError.exit_code not in (0, 1, 2, 3, 4, 5, 69, 75)
