"""Token-aware chunking: long documents become overlapping chunks the model can embed whole.

A chunk is measured in the target model's own tokens (its tokenizer's character
offsets), so no chunk is truncated and none is needlessly short. Cuts prefer, in the
last quarter of a window, a paragraph break, then a sentence end, then a word
boundary; only a single overlong word is cut mid-token. Consecutive chunks share
``overlap`` tokens, so a sentence cut at one edge is whole in the other chunk.

Chunk ``n`` of document ``d`` has the id ``d#n`` and the point id ``uuid5(d#n)``: the
same text and settings give the same chunks and ids on every run. The chunking of a
version is recorded in its manifest (``Version.chunking``), and every writer of that
version chunks the same way; changing it in the config takes a migration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedpipe.corpus import content_hash
from embedpipe.errors import ConfigError
from embedpipe.pipeline import Work

if TYPE_CHECKING:
    from embedpipe.backends import Embedder
    from embedpipe.index import Version

__all__ = ["Chunk", "ChunkSpec", "Chunker", "chunk_id", "chunker_for", "split", "works_for_row"]

Span = tuple[int, int]  # a token's [start, end) character offsets in the text


@dataclass(frozen=True)
class ChunkSpec:
    """How a version chunks: at most ``max_tokens`` per chunk, ``overlap`` shared."""

    max_tokens: int
    overlap: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ConfigError(f"chunk_tokens = {self.max_tokens} is too small; use 8 or more")
        if not 0 <= self.overlap < self.max_tokens // 2 + 1:
            raise ConfigError(
                f"chunk_overlap = {self.overlap} must be between 0 and half of chunk_tokens "
                f"({self.max_tokens // 2})"
            )

    def to_dict(self) -> dict[str, int]:
        return {"max_tokens": self.max_tokens, "overlap": self.overlap}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ChunkSpec | None:
        if not raw:
            return None
        return cls(int(raw["max_tokens"]), int(raw.get("overlap", 0)))


@dataclass(frozen=True)
class Chunk:
    """Characters ``[start, end)`` of a document: its ``n``-th chunk."""

    n: int
    start: int
    end: int
    text: str


def chunk_id(doc_id: str, n: int) -> str:
    return f"{doc_id}#{n}"


def split(text: str, spans: Sequence[Span], spec: ChunkSpec) -> list[Chunk]:
    """Cut ``text`` (tokenized as ``spans``) into chunks of at most ``spec.max_tokens``.

    A text that fits is one chunk holding the whole text, unchanged.
    """
    count = len(spans)
    if count <= spec.max_tokens:
        return [Chunk(0, 0, len(text), text)]
    cuts: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + spec.max_tokens, count)
        if end < count:
            end = _best_cut(text, spans, start, end)
        cuts.append((spans[start][0], spans[end - 1][1]))
        if end >= count:
            break
        start = _word_start(text, spans, max(end - spec.overlap, start + 1), end)
    # Runs of whitespace tokens (some tokenizers have them) make no chunk of their own.
    kept = [(lo, hi) for lo, hi in cuts if text[lo:hi].strip()]
    return [Chunk(n, lo, hi, text[lo:hi]) for n, (lo, hi) in enumerate(kept)]


def _gap(text: str, spans: Sequence[Span], k: int) -> str:
    """The characters between token ``k - 1`` and token ``k``."""
    return text[spans[k - 1][1]:spans[k][0]]


def _best_cut(text: str, spans: Sequence[Span], start: int, end: int) -> int:
    """Where to end a chunk: the last paragraph break, else sentence end, else word
    boundary in the window's last quarter; else the hard limit."""
    floor = start + max(1, (end - start) * 3 // 4)
    word = sentence = None
    for k in range(end, floor - 1, -1):
        gap = _gap(text, spans, k)
        if not gap:  # inside a word (a word piece or punctuation follows)
            continue
        if "\n\n" in gap:
            return k
        if sentence is None and text[spans[k - 1][1] - 1] in ".!?":
            sentence = k
        if word is None:
            word = k
    return sentence or word or end


def _word_start(text: str, spans: Sequence[Span], k: int, end: int) -> int:
    """Move an overlap start forward to the beginning of a word (not mid-word-piece)."""
    for j in range(k, end):
        if j == 0 or _gap(text, spans, j):
            return j
    return k


class Chunker:
    """Splits corpus rows into chunk work items with one embedder's tokenizer."""

    def __init__(self, spec: ChunkSpec, embedder: Embedder) -> None:
        self.spec = spec
        self.embedder = embedder
        limit = chunk_limit(embedder)
        if limit is not None and spec.max_tokens > limit:
            raise ConfigError(
                f"chunk_tokens = {spec.max_tokens} exceeds what profile {embedder.profile.name!r} "
                f"embeds whole ({limit} tokens after special tokens and prompt); set chunk_tokens "
                f"to {limit} or less"
            )

    def split(self, text: str) -> list[Chunk]:
        """Chunks that each re-tokenize within ``max_tokens``: a cut inside a multi-byte
        character or before a space can tokenize a little longer on its own, so the
        window shrinks until every chunk fits."""
        spans = self.embedder.token_spans(text)
        spec = self.spec
        while True:
            chunks = split(text, spans, spec)
            if len(chunks) == 1 and len(spans) <= self.spec.max_tokens:
                return chunks
            over = max(len(self.embedder.token_spans(c.text)) for c in chunks) - self.spec.max_tokens
            if over <= 0 or spec.max_tokens <= 8:
                return chunks
            size = max(8, spec.max_tokens - max(1, over))
            spec = ChunkSpec(size, min(spec.overlap, size // 2))

    def works(self, row: Mapping[str, Any], store_text: bool) -> list[Work]:
        """One work item per chunk; the payload says which document and where in it."""
        base = Work.from_corpus_row(row, store_text)
        chunks = self.split(row["text"])
        out = []
        for chunk in chunks:
            cid = chunk_id(row["id"], chunk.n)
            payload = dict(base.payload, content_hash=content_hash(chunk.text), chunk_id=cid,
                           parent_id=row["id"], chunk=chunk.n, chunks=len(chunks),
                           start=chunk.start, end=chunk.end)
            if store_text:
                payload["text"] = chunk.text
            out.append(Work(cid, chunk.text, payload["content_hash"], payload))
        return out


def chunk_limit(embedder: Embedder) -> int | None:
    """Tokens of document text a model embeds whole (its limit less special tokens and
    the document prompt); None when it has no limit."""
    limit = embedder.max_tokens
    if limit is None:
        return None
    prompt = embedder.profile.document_prompt
    overhead = len(embedder.token_spans(prompt)) if prompt else 0
    special = 2 if embedder.profile.provider == "sentence-transformers" else 0  # [CLS], [SEP]
    return max(1, limit - special - overhead)


def chunker_for(version: Version, embedder: Embedder) -> Chunker | None:
    """The chunker a version was built with (None: one point per document)."""
    spec = ChunkSpec.from_dict(version.chunking)
    return Chunker(spec, embedder) if spec else None


def works_for_row(row: Mapping[str, Any], store_text: bool, chunker: Chunker | None) -> list[Work]:
    """The points one corpus row becomes: itself, or its chunks."""
    if chunker is None:
        return [Work.from_corpus_row(row, store_text)]
    return chunker.works(row, store_text)
