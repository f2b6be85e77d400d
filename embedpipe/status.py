"""What ``embedpipe status`` and ``embedpipe models`` report, as plain data."""

from __future__ import annotations

import os
from typing import Any

from embedpipe.config import Settings
from embedpipe.corpus import CorpusStore
from embedpipe.errors import EmbedpipeError
from embedpipe.index import IndexVersions
from embedpipe.layout import Layout, check_index_name
from embedpipe.profiles import Profile, fingerprint, resolve_weights, short
from embedpipe.sync import last_runs
from embedpipe.watch import last_row, watch_warnings

__all__ = ["deprecation_warning", "index_status", "live_profiles", "profile_status"]


def deprecation_warning(profile: Profile, index: str) -> str | None:
    """A warning when a live index uses a model its provider deprecated or retired."""
    dep = profile.deprecation
    state = dep.status()
    if state == "active":
        return None
    when = f" (shutdown {dep.shutdown.isoformat()})" if dep.shutdown else ""
    past = "was retired" if state == "retired" else "is deprecated"
    fix = (
        f"embedpipe migrate --to {dep.replacement} --index {index}"
        if dep.replacement
        else f"embedpipe migrate --to PROFILE --index {index} (pick one from `embedpipe models`)"
    )
    return f"index {index!r} is live on profile {profile.name!r}, whose model {past}{when}; run `{fix}`"


def live_profiles(settings: Settings) -> dict[str, list[str]]:
    """profile name -> indexes live on it (empty when Qdrant cannot be opened)."""
    return {name: [index for index, _ in live] for name, live in _live_versions(settings).items()}


def _live_versions(settings: Settings) -> dict[str, list[tuple[str, str]]]:
    """profile name -> (index, recorded fingerprint) of each live version on it."""
    from embedpipe.errors import EngineError

    try:
        versions = IndexVersions.open(settings)
        aliases = versions.aliases()
        out: dict[str, list[tuple[str, str]]] = {}
        for v in versions.versions():
            if aliases.get(v.index) == v.collection:
                out.setdefault(v.profile, []).append((v.index, v.fingerprint))
        return out
    except EngineError:
        return {}


def _source(settings: Settings, index: str) -> dict[str, Any] | None:
    cfg = settings.indexes.get(index)
    if cfg is None or cfg.source is None:
        return None
    return {"path": str(cfg.source), "schedule": cfg.schedule, "chunking": settings.index_chunking(index)}


def index_status(settings: Settings, index: str | None = None) -> list[dict[str, Any]]:
    """Every index (or one): alias target, corpus size and each version with its state."""

    if index is not None:
        check_index_name(index)
    versions = IndexVersions.open(settings)
    aliases = versions.aliases()
    by_index: dict[str, list[Any]] = {}
    for version in versions.versions(index):
        by_index.setdefault(version.index, []).append(version)
    if index is not None and index not in by_index:
        from embedpipe.errors import IndexNotFound

        raise IndexNotFound(f"index {index!r} does not exist; `embedpipe status` lists them")
    out = []
    for name, found in sorted(by_index.items()):
        live = next((v for v in found if aliases.get(name) == v.collection), None)
        warning = None
        if live is not None and live.profile in settings.profiles:
            warning = deprecation_warning(settings.profiles[live.profile], name)
        out.append(
            {
                "index": name,
                "alias": aliases.get(name),
                "warnings": ([warning] if warning else []) + _watch_warnings(settings, live),
                "watch": _last_watch(settings, live),
                "documents": CorpusStore.for_index(settings.data_dir, name).count(),
                "corpus_segments": CorpusStore.for_index(settings.data_dir, name).segment_count(),
                "migration": _migration_state(settings, name, {v.collection for v in found}),
                "adapter": _adapter(settings, live),
                "batches": _batches(settings, name),
                "source": _source(settings, name),
                "runs": last_runs(settings, name),
                "engine": versions.engine.describe(),
                "versions": [
                    {
                        **v.to_dict(),
                        "fingerprint_short": short(v.fingerprint),
                        **_storage(versions, v.collection),
                        "vector_store_segments": _vector_segments(settings, v),
                        "live": aliases.get(name) == v.collection,
                        "deprecation": _deprecation(settings, v.profile),
                    }
                    for v in found
                ],
            }
        )
    return out


def _adapter(settings: Settings, live: Any) -> dict[str, Any] | None:
    """The live version's accepted query adapter (``embedpipe adapt``), and whether
    searches go through it now (the index asks for it, or its model is retired)."""
    from embedpipe.adapters import active_adapter

    adapter = active_adapter(settings, live) if live is not None else None
    if adapter is None:
        return None
    profile = settings.profiles.get(live.profile)
    forced = settings.index_settings(live.index).query_via == "adapter"
    retired = profile is None or profile.deprecation.status() == "retired"
    return {**adapter.summary(), "in_use": "always (query_via = adapter)" if forced else
            "now (the model is retired)" if retired else "when the model cannot embed"}


def _watch_warnings(settings: Settings, live: Any) -> list[str]:
    """The last deprecation watch's warning for the live version (``embedpipe watch``)."""
    return watch_warnings(settings.data_dir, live.index, live.fingerprint) if live is not None else []


def _last_watch(settings: Settings, live: Any) -> dict[str, Any] | None:
    """When the watch last checked the live version and what it found (None: never)."""
    row = last_row(settings.data_dir, live.index, live.fingerprint) if live is not None else None
    if row is None:
        return None
    return {"checked_at": row.checked_at, "status": row.status, "needs_action": row.needs_action,
            "days_left": row.days_left}


def _storage(versions: IndexVersions, collection: str) -> dict[str, Any]:
    """points, segments, indexed vectors and bytes on disk of a version; a shard that
    cannot be opened is reported (``error``) rather than failing the whole status."""
    from embedpipe.errors import ShardUnreadable

    try:
        info = versions.engine.info(collection)
    except ShardUnreadable as exc:
        return {"points": None, "error": str(exc)}
    return {"points": info.points, "segments": info.segments, "indexed_vectors": info.indexed,
            "disk_bytes": info.disk_bytes}


def _vector_segments(settings: Settings, version: Any) -> int | None:
    """Segment files of the vector store of a version's space (None: it has none)."""
    from embedpipe.vectors import VectorStore

    store = VectorStore.existing(settings.data_dir, version.fingerprint, version.dims)
    return store.segment_count() if store is not None else None


def _batches(settings: Settings, index: str) -> list[dict[str, Any]]:
    """Batch API runs of the index (``--batch``) with work still at the provider, texts
    a re-run takes up again (exhausted, unsent) or texts failed for good: what each state
    file records (no call to the provider)."""
    folder = Layout(settings.data_dir).batch_state(index, "0" * 16).parent
    if not folder.is_dir():
        return []
    from embedpipe.batch import read_progress

    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            progress = read_progress(path)
        except EmbedpipeError:
            continue  # an unreadable state: the next --batch run says so in one line
        if progress is None or (progress.pending == 0 and not progress.failed):  # pending counts in flight
            continue
        out.append({"profile": progress.profile, "batches": progress.batches, "texts": progress.texts,
                    "stored": progress.stored, "failed": progress.failed, "in_flight": progress.in_flight,
                    "exhausted": progress.exhausted, "unsent": progress.unsent, "pending": progress.pending,
                    "requests": progress.requests, "updated": progress.updated})
    return out


def _migration_state(settings: Settings, index: str, collections: set[str]) -> dict[str, Any] | None:
    """The last migration's progress record, unless it finished or its version is gone."""
    import json

    path = Layout(settings.data_dir).migrations(index) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("phase") == "live" or state.get("collection") not in collections:
        return None
    return state


def _deprecation(settings: Settings, profile: str) -> str:
    known = settings.profiles.get(profile)
    return known.deprecation.status() if known else "unknown profile"


def profile_status(settings: Settings, verify: bool = False) -> list[dict[str, Any]]:
    """Each profile with provider, dims, short fingerprint, usability, deprecation, the
    indexes live on it, and a warning per live index on a deprecated model.

    ``verify`` hashes every local profile's weights again instead of trusting the hash
    cache, and names each live index whose recorded fingerprint the weights no longer
    produce (``mismatched_indexes``): its queries would fail with ``FingerprintMismatch``.
    """
    live = _live_versions(settings)
    out = []
    for profile in sorted(settings.profiles.values(), key=lambda p: p.name):
        entry = _one_profile(profile, settings.sovereign, rehash=verify)
        on_it = live.get(profile.name, [])
        entry["live_indexes"] = sorted(index for index, _ in on_it)
        entry["warnings"] = [
            w for w in (deprecation_warning(profile, i) for i in entry["live_indexes"]) if w
        ]
        entry["warnings"] += [w for i, fp in on_it for w in watch_warnings(settings.data_dir, i, fp)]
        if verify:
            entry["verified"] = profile.is_local and entry["full_fingerprint"] is not None
            entry["mismatched_indexes"] = sorted(
                index for index, recorded in on_it
                if entry["full_fingerprint"] is not None and recorded != entry["full_fingerprint"])
            entry["warnings"] += [_changed_weights(profile, i) for i in entry["mismatched_indexes"]]
        del entry["full_fingerprint"]
        out.append(entry)
    return out


def _changed_weights(profile: Profile, index: str) -> str:
    return (f"index {index!r} was built by profile {profile.name!r}, whose weights no longer "
            "produce its fingerprint (the files changed); restore the original weights, or run "
            f"`embedpipe migrate --to {profile.name} --index {index}` to re-embed it with these")


def _one_profile(profile: Profile, sovereign: bool = False, rehash: bool = False) -> dict[str, Any]:
    usable, where = _usable(profile)
    if sovereign and profile.is_hosted:
        usable, where = False, "refused: sovereign mode"
    fp = None
    if usable:
        try:
            fp = fingerprint(profile, rehash=rehash and profile.is_local)
        except EmbedpipeError:
            usable = False
    dep = profile.deprecation
    return {
        "name": profile.name,
        "provider": profile.provider,
        "model": profile.model,
        "hosted": profile.is_hosted,
        "dims": profile.dims,
        "fingerprint": short(fp) if fp else None,
        "full_fingerprint": fp,
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
            return False, f"weights not found: `embedpipe models pull {profile.name}`"
        return True, f"{found.source}: {found.path}"
    from embedpipe.backends._openai import endpoint, key_env_for, key_in_clear

    server = profile.base_url or "api.openai.com"
    var = key_env_for(profile.base_url, profile.api_key_env)  # the rule the client follows
    if var is None:
        return True, f"{server}, no key"
    if key_in_clear(endpoint(profile), profile.allow_insecure_key):
        return False, "refused: the key would cross plain http (allow_insecure_key)"
    if os.environ.get(var, "").strip():
        return True, f"{server}, key in ${var}"
    return False, f"${var} not set"
