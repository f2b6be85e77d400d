"""The small interface every embedding backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from embedpipe.profiles import Profile

__all__ = ["EmbedBatch", "Embedder"]


@dataclass(frozen=True)
class EmbedBatch:
    """Vectors for a batch of texts, in input order, and what happened on the way."""

    vectors: np.ndarray  # float32, shape (len(texts), profile.dims)
    truncated: int = 0  # texts cut at the model's input limit (local models)
    failed: dict[int, str] = field(default_factory=dict)  # row -> reason; its vector is junk
    chunked: int = 0  # texts split into pieces whose vectors were averaged (hosted)
    tokens: int | None = None  # tokens the model processed (None: the backend cannot say cheaply)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of one embedding space (one fingerprint)."""

    profile: Profile

    @property
    def concurrency(self) -> int:
        """How many ``embed_documents`` calls may run at once (1 for a local model)."""
        ...

    @property
    def fingerprint(self) -> str:
        """The identity of the space this embedder produces (see ``profiles.fingerprint``)."""
        ...

    def check(self) -> None:
        """Make sure the model is usable (loaded, right dimension, reachable) before any
        write, so a bad profile fails with nothing created. Raises ``ModelError`` and kin."""
        ...

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        """Embed documents (with the profile's document prompt)."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each document by the model's tokenizer (exact for hosted models)."""
        ...

    @property
    def max_tokens(self) -> int | None:
        """The model's input limit in tokens (None: no limit)."""
        ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character ``[start, end)`` of each token of ``text`` (no special tokens, no
        prompt), by the model's own tokenizer: what chunking measures."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many queries at once (with the query prompt); rows in input order."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query (with the profile's query prompt)."""
        ...
