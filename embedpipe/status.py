"""What ``embedpipe status`` and ``embedpipe models`` report, as plain data."""

from __future__ import annotations

import os
from typing import Any

from embedpipe.config import Settings
from embedpipe.corpus import CorpusStore
from embedpipe.errors import EmbedpipeError
from embedpipe.index import IndexVersions
from embedpipe.profiles import Profile, fingerprint, resolve_weights, short

__all__ = ["index_status", "profile_status"]


def index_status(settings: Settings, index: str | None = None) -> list[dict[str, Any]]:
    """Every index (or one): alias target, corpus size and each version with its state."""
    from embedpipe.qdrant import connect

    versions = IndexVersions(connect(settings), settings)
    aliases = versions.aliases()
    by_index: dict[str, list[Any]] = {}
    for version in versions.versions(index):
        by_index.setdefault(version.index, []).append(version)
    if index is not None and index not in by_index:
        from embedpipe.errors import IndexNotFound

        raise IndexNotFound(f"index {index!r} does not exist; `embedpipe status` lists them")
    out = []
    for name, found in sorted(by_index.items()):
        out.append(
            {
                "index": name,
                "alias": aliases.get(name),
                "documents": CorpusStore.for_index(settings.data_dir, name).count(),
                "versions": [
                    {
                        **v.to_dict(),
                        "fingerprint_short": short(v.fingerprint),
                        "points": versions.count(v.collection),
                        "live": aliases.get(name) == v.collection,
                        "deprecation": _deprecation(settings, v.profile),
                    }
                    for v in found
                ],
            }
        )
    return out


def _deprecation(settings: Settings, profile: str) -> str:
    known = settings.profiles.get(profile)
    return known.deprecation.status() if known else "unknown profile"


def profile_status(settings: Settings) -> list[dict[str, Any]]:
    """Each profile with provider, dims, short fingerprint, usability and deprecation."""
    return [_one_profile(p) for p in sorted(settings.profiles.values(), key=lambda p: p.name)]


def _one_profile(profile: Profile) -> dict[str, Any]:
    usable, where = _usable(profile)
    fp = None
    if usable:
        try:
            fp = fingerprint(profile)
        except EmbedpipeError:
            usable = False
    dep = profile.deprecation
    return {
        "name": profile.name,
        "provider": profile.provider,
        "model": profile.model,
        "dims": profile.dims,
        "fingerprint": short(fp) if fp else None,
        "usable": usable,
        "where": where,
        "deprecation": dep.status(),
        "shutdown": dep.shutdown.isoformat() if dep.shutdown else None,
        "replacement": dep.replacement,
    }


def _usable(profile: Profile) -> tuple[bool, str]:
    if profile.is_local:
        try:
            found = resolve_weights(profile)
        except EmbedpipeError:
            return False, "weights not found"
        return True, f"{found.source}: {found.path}"
    if os.environ.get(profile.api_key_env):
        return True, f"API key in ${profile.api_key_env}"
    return False, f"${profile.api_key_env} not set"
