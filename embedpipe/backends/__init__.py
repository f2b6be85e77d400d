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
    from embedpipe.config import Settings
    from embedpipe.profiles import Profile

__all__ = ["EmbedBatch", "Embedder", "build_embedder"]


def build_embedder(
    profile: Profile, settings: Settings | None = None, device: str | None = None
) -> Embedder:
    """The embedder for a profile.

    ``settings`` supplies the device for local models, and for hosted ones the
    sovereignty policy and the usage ledger (none without settings). ``device``
    overrides the configured one (auto, cpu, cuda, mps).
    """
    if profile.provider == "sentence-transformers":
        from embedpipe.backends.local import LocalEmbedder

        return LocalEmbedder(profile, device=device or (settings.device if settings else "auto"))
    if profile.provider == "openai":
        from embedpipe.backends.hosted import HostedEmbedder

        return HostedEmbedder.from_settings(profile, settings)
    raise ConfigError(f"profile {profile.name!r}: unknown provider {profile.provider!r}")
