"""Sustained hosted-embedding throughput against a tokens-per-minute limit.

A real loopback OpenAI-protocol server (``embedpipe.testing.openai_server``) serves a
distilled static model (fast enough that the server's TPM limit, not the model, is
the bottleneck) and enforces ``--tpm`` with a token bucket holding ``--burst-s``
seconds of budget. ``embedpipe.ingest`` builds a fresh index from Cranfield (or the
examples corpus repeated, when Cranfield is absent) with a hosted profile on that
server, in two modes:

* ``budgeted``  -- the profile declares ``tokens_per_minute = --tpm`` (the client paces
                   itself and sizes requests to its bucket) and ``refund_refused = true``,
                   which matches this server (a 429 is not counted against its limit);
* ``strict``    -- the same without refunds (the default, since OpenAI counts refused
                   requests against the limit): each 429 costs a request's budget;
* ``reactive``  -- (``--modes reactive``) the profile declares no budget; the client learns
                   the limit only from 429s with Retry-After. The server refuses any
                   request larger than its burst, so this mode only completes when
                   ``--burst-s`` is large (60, a minute's worth, like OpenAI's limits).

Reported per mode: tokens the server billed, seconds, sustained throughput as a
fraction of the limit, both raw (``billed / (tpm * minutes)``) and net of the
server's initial burst (``(billed - burst) / (tpm * minutes)``, the honest figure),
429s received, and lost documents (input documents not in the index and not reported
as failed; the goal is zero). Nothing is asserted; the figures are reported.

Run from the repository root::

    .venv/bin/python bench/hosted_tpm.py [--tpm 240000] [--burst-s 6] [--limit N]

Results go to ``bench/results/hosted_tpm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402 - sets HF_HUB_OFFLINE=1 before any model is loaded

REPO = common.REPO
CRANFIELD = common.DEFAULT_CRANFIELD
OUTPUT = common.RESULTS / "hosted_tpm.json"
KEY = "sk-bench-loopback"
PACKAGES = ("embedpipe", "openai", "tiktoken", "qdrant-client", "sentence-transformers", "model2vec",
            "torch")


def corpus(limit: int | None) -> tuple[list[dict[str, str]], str]:
    if CRANFIELD.is_dir():
        from embedpipe.evaluation import read_cranfield

        docs = [{"id": i, "text": t} for i, t in read_cranfield(CRANFIELD).documents.items() if t.strip()]
        source = "cranfield"
    else:
        base = [json.loads(line) for line in (REPO / "examples/corpus/docs.jsonl").read_text().splitlines()]
        docs = [{"id": f"{d['id']}-{r}", "text": f"{d['text']} ({r})"} for r in range(40) for d in base]
        source = "examples x40"
    return (docs[:limit] if limit else docs), source


def run_mode(mode: str, docs: list[dict[str, str]], model: Path, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from embedpipe.config import load_settings
    from embedpipe.index import IndexVersions, point_id
    from embedpipe.ingest import ingest
    from embedpipe.engine import close_all
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    folder = root / mode
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = ServerConfig(model_path=model, api_key=KEY, tpm_limit=args.tpm, tpm_burst_s=args.burst_s)
    budget = {
        "budgeted": f"tokens_per_minute = {args.tpm}\nrefund_refused = true\n",
        "strict": f"tokens_per_minute = {args.tpm}\n",
        "reactive": "",
    }[mode]
    with LoopbackOpenAI(config) as server:
        (folder / "embedpipe.toml").write_text(
            f'data_dir = "data"\n[profiles.hosted]\nprovider = "openai"\nmodel = "text-embedding-3-small"\n'
            f'base_url = "{server.base_url}"\napi_key_env = "OPENAI_API_KEY"\ndims = 256\nprice_per_million_tokens = 0.02\n'
            f"[profiles.hosted.limits]\nconcurrency = {args.concurrency}\nmax_retries = 50\n"
            f"backoff_max_s = 5\n{budget}"
        )
        os.environ["OPENAI_API_KEY"] = KEY
        settings = load_settings(folder / "embedpipe.toml")
        started = perf_counter()
        report = ingest(settings, "bench", data, profile="hosted")
        seconds = perf_counter() - started
        counters = server.counters()
    versions = IndexVersions.open(settings)
    present = versions.point_ids(versions.require_live("bench").collection)
    failed = {f["id"] for f in report.failures}
    lost = [d["id"] for d in docs if point_id(d["id"]) not in present and d["id"] not in failed]
    close_all()
    billed = counters["tokens_billed"]
    allowed = args.tpm * seconds / 60
    burst = args.tpm * args.burst_s / 60
    return {
        "mode": mode,
        "documents": len(docs),
        "indexed": len(present),
        "failed": len(failed),
        "lost": len(lost),
        "seconds": round(seconds, 2),
        "tokens_billed": billed,
        "fraction_of_limit_raw": round(billed / allowed, 3),
        "fraction_of_limit_net_of_burst": round((billed - burst) / allowed, 3),
        "http_429": counters["by_status"].get(429, 0),
        "requests": counters["requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpm", type=int, default=240_000)
    parser.add_argument("--burst-s", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--modes", default="budgeted,strict")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    docs, source = corpus(args.limit)
    with tempfile.TemporaryDirectory(prefix="embedpipe-bench-") as tmp:
        root = Path(tmp)
        model = common.distill_static(root)
        results = []
        for mode in args.modes.split(","):
            row = run_mode(mode, docs, model, args, root)
            results.append(row)
            print(json.dumps(row))
    print_table(results)
    out = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "corpus": source,
        "tpm_limit": args.tpm,
        "burst_s": args.burst_s,
        "concurrency": args.concurrency,
        "results": results,
    }
    common.write_result(args.output, out, PACKAGES)


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'mode':<10}{'docs':>7}{'indexed':>9}{'failed':>8}{'lost':>6}{'seconds':>9}"
              f"{'tokens':>10}{'of limit':>10}{'net burst':>11}{'429s':>6}")
    print("\nhosted build through the loopback server, against its tokens-per-minute limit")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<10}{r['documents']:>7}{r['indexed']:>9}{r['failed']:>8}{r['lost']:>6}"
              f"{r['seconds']:>9.1f}{r['tokens_billed']:>10}{r['fraction_of_limit_raw']:>10.3f}"
              f"{r['fraction_of_limit_net_of_burst']:>11.3f}{r['http_429']:>6}")

if __name__ == "__main__":
    main()
