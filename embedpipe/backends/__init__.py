"""Embedding backends, built in one place from a profile.

``build_embedder(profile)`` is the only constructor the rest of embedpipe uses; the
backend class is chosen by ``profile.provider``. Heavy libraries (torch,
sentence-transformers) are imported when a backend first embeds, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedpipe.backends.base import EmbedBatch, Embedder
from embedpipe.errors import ConfigError

if TYPE_CHECKING:
    from embedpipe.profiles import Profile

__all__ = ["EmbedBatch", "Embedder", "build_embedder"]


def build_embedder(profile: Profile, device: str = "auto") -> Embedder:
    """The embedder for a profile. ``device`` applies to local models (auto, cpu, cuda, mps)."""
    if profile.provider == "sentence-transformers":
        from embedpipe.backends.local import LocalEmbedder

        return LocalEmbedder(profile, device=device)
    raise ConfigError(
        f"profile {profile.name!r} uses provider {profile.provider!r}, whose embedding backend "
        "is not in this version of embedpipe yet; use a local profile (see `embedpipe models`)"
    )
