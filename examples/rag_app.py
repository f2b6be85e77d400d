"""A minimal retrieval step of a RAG application on top of embedpipe.

Run `make demo` first (it builds the "demo" index), then:

    .venv/bin/python examples/rag_app.py "why do fjords have steep walls?"

The query is embedded with the model that built the live index version, checked
against the fingerprint recorded on the collection, so it can never be searched in
the wrong embedding space.
"""

from __future__ import annotations

import sys
from pathlib import Path

from embedpipe import EmbedpipeError, Index

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedpipe.toml"


def build_context(question: str, k: int = 3) -> str:
    """The top-k passages, with their ids, ready to paste into a prompt."""
    hits = Index.open("demo", str(CONFIG)).search(question, k=k)
    return "\n\n".join(f"[{hit.id}] {hit.text}" for hit in hits)


if __name__ == "__main__":
    question = " ".join(sys.argv[1:]) or "which planet has a runaway greenhouse effect?"
    try:
        print(build_context(question))
    except EmbedpipeError as exc:
        sys.exit(f"error: {exc}")
