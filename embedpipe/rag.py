"""Grounded answers: retrieve with the index's own model, answer through the gateway.

The question is embedded by the embedder pinned to the index's live version (the one
fingerprint that can search it); a ``sensitive`` question is refused before anything is
sent when that model is hosted, as it is refused by hosted chat backends; the passages found go to the chat gateway as numbered
sources named by document id, with the instruction to cite them as ``[id]``. The answer
keeps the ids it cites that really were retrieved: a citation of anything else is
dropped, not trusted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedpipe.errors import InputError

if TYPE_CHECKING:
    from embedpipe.gateway import ChatResult, Gateway
    from embedpipe.index import Hit, Index

__all__ = ["Answer", "answer", "build_messages", "cited"]

SYSTEM = (
    "Answer the question using only the sources. Cite every source you use by its id in "
    "square brackets, like [doc-1]. If the sources do not contain the answer, say that you "
    "do not know."
)
MAX_SOURCE_CHARS = 2000  # per passage: a chunk, or the head of a long unchunked document


@dataclass
class Answer:
    """A grounded answer and where it came from."""

    question: str
    text: str
    citations: list[str]  # ids the answer cites, each one a retrieved document
    sources: list[dict[str, Any]]  # the retrieved passages: id, score, chunk_id
    backend: str
    latency_s: float
    chat: dict[str, Any] = field(default_factory=dict)  # the gateway's ChatResult

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.text, "citations": self.citations,
                "sources": self.sources, "backend": self.backend, "latency_s": self.latency_s,
                "chat": self.chat}


def build_messages(question: str, passages: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The chat request: the sources, each under its id, then the question."""
    blocks = [f"[{doc_id}] {' '.join(text.split())[:MAX_SOURCE_CHARS]}" for doc_id, text in passages]
    user = "Sources:\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def cited(text: str, ids: Sequence[str]) -> list[str]:
    """The retrieved ids the answer cites, in the order it first cites them."""
    known = set(ids)
    out: list[str] = []
    for match in re.finditer(r"\[([^\[\]]+)\]", text):
        for part in match.group(1).split(","):
            doc_id = part.strip()
            if doc_id in known and doc_id not in out:
                out.append(doc_id)
    return out


def answer(index: Index, question: str, k: int = 5, gateway: Gateway | None = None,
           sensitive: bool = False, **params: Any) -> Answer:
    """Retrieve ``k`` documents (the best chunk of each) and answer from them."""
    if not question or not question.strip():
        raise InputError("the question is empty; ask something")
    from embedpipe.gateway import Gateway

    gateway = gateway or Gateway.from_settings(index.settings)
    gateway.route(sensitive)  # a policy that leaves no backend fails before the search
    # A sensitive question leaves the network neither to a chat API nor to an embedding API.
    hits = index.search(question, k=k, group_by_doc=True, sensitive=sensitive)
    passages = _passages(index, hits)
    result: ChatResult = gateway.chat(build_messages(question, passages), sensitive=sensitive, **params)
    return Answer(
        question=question, text=result.content,
        citations=cited(result.content, [h.id for h in hits]),
        sources=[{"id": h.id, "score": h.score, "chunk_id": h.chunk_id, **({"via": h.via} if h.via else {})}
                 for h in hits],
        backend=result.backend, latency_s=result.latency_s, chat=result.to_dict(),
    )


def _passages(index: Index, hits: Sequence[Hit]) -> list[tuple[str, str]]:
    """(id, text) of each hit; from the corpus when the index keeps no text in Qdrant."""
    missing = [h.id for h in hits if h.text is None]
    rows: dict[str, dict[str, Any]] = {}
    if missing:
        from embedpipe.corpus import CorpusStore

        rows = CorpusStore.for_index(index.settings.data_dir, index.name).get(missing)
    out = []
    for h in hits:
        text = h.text
        if text is None and h.id in rows:
            full = rows[h.id]["text"]
            text = full[h.start:h.end] if h.start is not None else full
        out.append((h.id, text or ""))
    return out
