"""``python -m embedpipe.engine._build SHARD``: build a Qdrant Edge shard's HNSW index in a
process of its own, for ``EdgeEngine.build_index`` in a server (see ``edge.py``).

Edge's ``optimize`` holds the Python interpreter while it runs (minutes at a million
points), so in ``embedpipe serve`` it would stop every search of every index for that
long; in a child process it stops none. The parent has closed the shard and opens it
again once this exits. Prints ``{"changed": bool}``; a failure is one line on stderr
and exit 1.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m embedpipe.engine._build SHARD_DIR", file=sys.stderr)
        return 2
    from qdrant_edge import EdgeShard

    try:
        shard = EdgeShard.load(argv[0])
        try:
            changed = bool(shard.optimize())
            shard.flush()
        finally:
            shard.close()
    except Exception as exc:  # noqa: BLE001 - Edge raises bare Exception; the parent classifies
        print(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, file=sys.stderr)
        return 1
    print(json.dumps({"changed": changed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
