"""API keys of ``embedpipe serve``: where they come from, how a request's key is checked,
and the key file ``embedpipe keys`` writes. Imports nothing heavy (the CLI uses it).

A key is ``ep_`` and 43 random URL-safe characters (``secrets.token_urlsafe(32)``, 256
bits), shown once when it is made; embedpipe never writes it to a file or a log. Each key
has a name (what logs and errors call it, with the first 12 hex digits of its SHA-256),
the indexes it may use (``*``: every index) and its scopes:

* ``read``: search, ``GET /v1/indexes``, ``/v1/embeddings`` (``model = "index:<name>"``
  for an index it may use; a profile name needs a key for every index, ``*``);
* ``write``: ``POST .../documents`` (a dry run too) and ``DELETE .../documents/{id}``;
* ``chat``: ``/v1/chat/completions``. ``/v1/models`` takes any valid key.

Two sources, both optional; names are unique across them:

* the key file (``[server] key_file``, default ``<data_dir>/keys.toml``), 0600, holding
  SHA-256 hashes only. ``embedpipe keys add`` appends an entry and ``keys remove``
  rewrites the file; a running server reloads it when it changes (a key added or
  revoked takes effect on the next request, no restart). Entries::

      [[keys]]
      name = "docs-reader"
      sha256 = "<64 hex digits>"
      indexes = ["docs"]
      scopes = ["read"]
      created = "2026-12-05T22:00:00+00:00"

* the environment variable ``[server] keys_env`` (``EMBEDPIPE_SERVER_KEYS``), which holds
  the keys themselves for deployments whose secrets arrive as variables: entries
  ``NAME:SCOPES:INDEXES:KEY`` separated by ``;`` or newlines, SCOPES and INDEXES
  comma-separated, e.g. ``app:read,write:docs,faq:ep_...;ops:read,write,chat:*:ep_...``.
  Read once, when the server starts. ``embedpipe keys add NAME --env`` prints an entry.

A presented key is hashed and its digest compared with every known hash with
``hmac.compare_digest`` (all of them, whichever matches), so neither the comparison nor
the loop tells by its timing how much of a guess was right.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpipe.config import ENV_NAME_PATTERN, KEY_NAME_PATTERN
from embedpipe.errors import AccessDenied, AuthenticationRequired, ConfigError, KeyFileInvalid
from embedpipe.layout import check_index_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from embedpipe.config import Settings

__all__ = ["ALL_INDEXES", "SCOPES", "ApiKey", "KeyRing", "add_key", "env_key", "hash_key", "new_key",
           "parse_env", "read_key_file", "remove_key"]

log = logging.getLogger(__name__)

SCOPES = ("read", "write", "chat")
ALL_INDEXES = "*"
KEY_PREFIX = "ep_"
MIN_KEY_CHARS = 16  # a key from the environment: at least this long
MAX_KEY_CHARS = 512  # a presented key longer than this is not one of ours
HEADER = (
    "# API keys of `embedpipe serve`: SHA-256 hashes only; each key was shown once, when it was made.\n"
    "# Add one: embedpipe keys add NAME --index docs --scope read   Revoke: embedpipe keys remove NAME\n"
    "# A running server reloads this file when it changes.\n"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The SHA-256 of a key, as 64 lowercase hex digits (what the key file holds)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random key: ``ep_`` + 256 bits, URL-safe (fits a header and a shell)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """A key the server accepts, without the key: its name, hash, indexes and scopes."""

    name: str
    sha256: str
    indexes: tuple[str, ...]
    scopes: tuple[str, ...]
    source: str  # the key file's path, or $VARIABLE
    created: str | None = None

    @property
    def tag(self) -> str:
        """How logs and messages name it: its name and a hash prefix, never the key."""
        return f"{self.name!r} (sha256 {self.sha256[:12]})"

    @property
    def every_index(self) -> bool:
        return ALL_INDEXES in self.indexes

    def may(self, scope: str, index: str | None = None) -> bool:
        """Whether it has ``scope`` and, when ``index`` is given, may use that index."""
        return scope in self.scopes and (index is None or self.every_index or index in self.indexes)

    def require(self, scope: str, index: str | None = None, *, every_index: bool = False,
                what: str = "") -> None:
        """AccessDenied naming the missing scope or index (and the key by name)."""
        doing = f" ({what})" if what else ""
        if scope not in self.scopes:
            raise AccessDenied(
                f"API key {self.name!r} lacks the {scope} scope{doing}; it has "
                f"{', '.join(self.scopes)}. Use a key with {scope} (`embedpipe keys add NAME "
                f"--scope {scope} ...`)")
        if every_index and not self.every_index:
            raise AccessDenied(
                f"API key {self.name!r} may use only index {', '.join(self.indexes)}{doing}, and this "
                f"needs a key for every index (--index '*'); for an index's own model ask for "
                f"model 'index:{self.indexes[0]}'")
        if index is not None and not self.may(scope, index):
            raise AccessDenied(
                f"API key {self.name!r} may not use index {index!r}{doing}; it may use "
                f"{', '.join(self.indexes)}. Use a key for {index!r} (`embedpipe keys add NAME "
                f"--index {index!r} ...`)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256_prefix": self.sha256[:12], "indexes": list(self.indexes),
                "scopes": list(self.scopes), "source": self.source, "created": self.created}


# --- checking what a key may be given ----------------------------------------------------


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not re.match(KEY_NAME_PATTERN, name):
        raise ConfigError(f"{where}: key name {name!r} is not valid; use letters, digits, '_', '.' "
                          "and '-' (at most 64, starting with a letter or digit)")
    return name


def _check_scopes(scopes: Iterable[Any], where: str) -> tuple[str, ...]:
    scopes = list(scopes)
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        got = f"unknown scope {unknown[0]!r}" if unknown else "no scope"
        raise ConfigError(f"{where}: {got}; scopes are {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in scopes)  # canonical order, no repeats


def _check_indexes(indexes: Iterable[Any], where: str) -> tuple[str, ...]:
    indexes = list(dict.fromkeys(indexes))
    if not indexes:
        raise ConfigError(f"{where}: no index; name the indexes the key may use, or '*' for every index")
    for index in indexes:
        if index != ALL_INDEXES:
            try:
                check_index_name(index)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc} (or '*' for every index)") from None
    return (ALL_INDEXES,) if ALL_INDEXES in indexes else tuple(indexes)


# --- the environment ---------------------------------------------------------------------


def parse_env(value: str, var: str) -> list[ApiKey]:
    """The keys of ``NAME:SCOPES:INDEXES:KEY`` entries (``;`` or newline separated).
    Errors name the entry by number and name, never by its key."""
    keys = []
    entries = [e.strip() for e in re.split(r"[;\n]", value) if e.strip()]
    for number, entry in enumerate(entries, 1):
        parts = entry.split(":", 3)
        where = f"${var} entry {number}"
        if len(parts) != 4 or not all(p.strip() for p in parts):
            raise KeyFileInvalid(
                f"{where} is not NAME:SCOPES:INDEXES:KEY (e.g. app:read,write:docs:ep_...; '*' for "
                "every index; entries separated by ';'); `embedpipe keys add NAME --env` prints one")
        name, scopes, indexes, key = (p.strip() for p in parts)
        try:
            _check_name(name, where)
            where = f"${var} key {name!r}"
            checked_scopes = _check_scopes((s.strip() for s in scopes.split(",")), where)
            checked_indexes = _check_indexes((i.strip() for i in indexes.split(",")), where)
        except ConfigError as exc:
            raise KeyFileInvalid(str(exc)) from None
        if len(key) < MIN_KEY_CHARS or len(key) > MAX_KEY_CHARS or not key.isascii() or any(
                c.isspace() for c in key):
            raise KeyFileInvalid(
                f"{where}: the key must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} ASCII characters without "
                "spaces; make one with `embedpipe keys add NAME --env`")
        keys.append(ApiKey(name, hash_key(key), checked_indexes, checked_scopes, f"${var}"))
    return keys


def env_key(name: str, indexes: Sequence[str], scopes: Sequence[str], var: str) -> tuple[str, ApiKey]:
    """A fresh key as one ``NAME:SCOPES:INDEXES:KEY`` entry for the key variable ``var``,
    and what the server will make of it. Nothing is written."""
    _check_name(name, "embedpipe keys add")
    checked = (_check_indexes(indexes, "--index"), _check_scopes(scopes, "--scope"))
    key = new_key()
    entry = f"{name}:{','.join(checked[1])}:{','.join(checked[0])}:{key}"
    return entry, ApiKey(name, hash_key(key), *checked, f"${var}")


# --- the key file ------------------------------------------------------------------------


def _entry(raw: Any, number: int, path: Path) -> ApiKey:
    where = f"{path}: [[keys]] entry {number}"
    if not isinstance(raw, dict):
        raise KeyFileInvalid(f"{where} is not a table")
    if "key" in raw or "secret" in raw:
        raise KeyFileInvalid(
            f"{where} holds a key in clear ('key'); the key file holds only SHA-256 hashes: delete "
            "that entry and make a new key with `embedpipe keys add` (treat the old key as leaked)")
    unknown = sorted(set(raw) - {"name", "sha256", "indexes", "scopes", "created"})
    if unknown:
        raise KeyFileInvalid(f"{where}: unknown field {unknown[0]!r} (fields: name, sha256, indexes, "
                             "scopes, created)")
    try:
        name = _check_name(raw.get("name"), where)
        where = f"{path}: key {name!r}"
        digest = raw.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ConfigError(f"{where}: sha256 must be 64 lowercase hex digits (a key's SHA-256)")
        for field in ("indexes", "scopes"):
            if not isinstance(raw.get(field), list) or not all(isinstance(v, str) for v in raw[field]):
                raise ConfigError(f"{where}: {field} must be a list of strings")
        created = raw.get("created")
        return ApiKey(name, digest, _check_indexes(raw["indexes"], where), _check_scopes(raw["scopes"], where),
                      str(path), None if created is None else str(created))
    except KeyFileInvalid:
        raise
    except ConfigError as exc:
        raise KeyFileInvalid(str(exc)) from None


def read_key_file(path: Path) -> list[ApiKey]:
    """The entries of a key file (KeyFileInvalid naming the file and entry at fault)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileInvalid(f"key file {path} does not exist; make it with `embedpipe keys add NAME "
                             "--index INDEX --scope read`, or fix [server] key_file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeyFileInvalid(f"key file {path} cannot be read ({reason})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileInvalid(f"key file {path}: invalid TOML: {exc}") from None
    if set(raw) - {"keys"}:
        raise KeyFileInvalid(f"key file {path}: unexpected {sorted(set(raw) - {'keys'})[0]!r}; it holds "
                             "only [[keys]] entries")
    entries = raw.get("keys", [])
    if not isinstance(entries, list):
        raise KeyFileInvalid(f"key file {path}: keys must be [[keys]] entries")
    keys = [_entry(e, n, Path(path)) for n, e in enumerate(entries, 1)]
    _check_unique(keys)
    return keys


def _check_unique(keys: Sequence[ApiKey]) -> None:
    names: dict[str, ApiKey] = {}
    digests: dict[str, ApiKey] = {}
    for key in keys:
        if key.name in names:
            raise KeyFileInvalid(f"two keys are named {key.name!r} ({names[key.name].source} and "
                                 f"{key.source}); names must be unique")
        if key.sha256 in digests:
            raise KeyFileInvalid(f"keys {digests[key.sha256].name!r} and {key.name!r} are the same key; "
                                 "remove one")
        names[key.name] = digests[key.sha256] = key


def _toml_entry(key: ApiKey) -> str:
    # json.dumps writes valid TOML basic strings and arrays for these (checked) values.
    lines = ["", "[[keys]]", f"name = {json.dumps(key.name)}", f"sha256 = {json.dumps(key.sha256)}",
             f"indexes = {json.dumps(list(key.indexes))}", f"scopes = {json.dumps(list(key.scopes))}"]
    if key.created:
        lines.append(f"created = {json.dumps(key.created)}")
    return "\n".join(lines) + "\n"


def add_key(path: Path, name: str, indexes: Sequence[str], scopes: Sequence[str]) -> tuple[str, ApiKey]:
    """Make a key, append its hash entry to the key file (created 0600; an existing file
    is made 0600 too) and return (the key, its entry). The key itself is written nowhere:
    show it to the user once."""
    from embedpipe._files import FILE_MODE, make_dir, open_append, writing

    path = Path(path)
    _check_name(name, "embedpipe keys add")
    checked = (_check_indexes(indexes, "--index"), _check_scopes(scopes, "--scope"))
    if path.exists():
        read_key_file(path)  # refuse to append to a file that is already invalid
    key = new_key()
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entry = ApiKey(name, hash_key(key), *checked, str(path), created)
    with writing(path.parent):
        make_dir(path.parent)
        fd = open_append(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # two `keys add` at once: one after the other
            existing = read_key_file(path) if os.fstat(fd).st_size else []
            if any(k.name == name for k in existing):
                raise ConfigError(f"a key named {name!r} is already in {path}; pick another name, or "
                                  f"revoke it first (`embedpipe keys remove {name}`)")
            os.fchmod(fd, FILE_MODE)
            text = _toml_entry(entry) if os.fstat(fd).st_size else HEADER + _toml_entry(entry)
            os.write(fd, text.encode("utf-8"))  # one write, appended whole
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
    return key, entry


def remove_key(path: Path, name: str) -> ApiKey:
    """Drop the entry of that name from the key file (rewritten atomically, 0600)."""
    from embedpipe._files import write_text_atomic

    path = Path(path)
    keys = read_key_file(path)
    gone = next((k for k in keys if k.name == name), None)
    if gone is None:
        raise ConfigError(f"no key named {name!r} in {path}; its keys: "
                          f"{', '.join(k.name for k in keys) or 'none'}")
    write_text_atomic(path, HEADER + "".join(_toml_entry(k) for k in keys if k.name != name), durable=True)
    return gone


# --- the server's keys -------------------------------------------------------------------


def _stamp_of(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: inode (a rewrite renames), size, mtime; None: absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1, -1)  # unreadable: reading it says why
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class KeyRing:
    """The keys a server accepts: those of the key variable (read at start) and of the
    key file (reloaded whenever its size, time or inode changes).

    ``required`` is decided at start: a server that started with keys keeps asking for
    one even if every key is revoked (it never falls open). A key file that turns
    invalid while the server runs disables the file's keys (KeyFileInvalid, 503) until
    it is fixed: a revocation with a typo in it must not leave the revoked key working.
    """

    def __init__(self, settings: Settings) -> None:
        server = settings.server
        self.path = settings.key_file
        self.env_var = server.keys_env
        if not re.match(ENV_NAME_PATTERN, self.env_var):  # pragma: no cover - config checks it
            raise ConfigError(f"server.keys_env {self.env_var!r} is not a variable name")
        secret = server.env_keys.get_secret_value() if server.env_keys is not None else ""
        self._env = parse_env(secret, self.env_var) if secret.strip() else []
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._file: list[ApiKey] = []
        self._broken: str | None = None
        if server.key_file is not None and not self.path.exists():
            read_key_file(self.path)  # says it does not exist and how to make it
        self._reload(at_start=True)
        self.required = bool(self.keys())
        unknown = sorted(set(server.rate_limits) - {k.name for k in self.keys()})
        if unknown:
            raise ConfigError(f"server.rate_limits names {unknown[0]!r}, which is no key's name (keys: "
                              f"{', '.join(k.name for k in self.keys()) or 'none'})")

    def keys(self) -> list[ApiKey]:
        with self._lock:
            return [*self._env, *self._file]

    def describe(self) -> str:
        """One line for the server's log: how many keys from where, by name and hash prefix."""
        if not self.required:
            return "no API keys: open to every client that reaches this loopback address"
        parts = []
        for source in dict.fromkeys(k.source for k in self.keys()):
            named = [f"{k.name} {k.sha256[:12]}" for k in self.keys() if k.source == source]
            parts.append(f"{len(named)} from {source} ({', '.join(named)})")
        return (f"API keys required on every route but /healthz, /docs and /openapi.json: "
                f"{'; '.join(parts) or 'none left (every key was revoked)'}")

    def refresh(self) -> None:
        """Reload the key file if it changed since it was read (one stat per call)."""
        if _stamp_of(self.path) != self._stamp:
            self._reload(at_start=False)

    def _reload(self, at_start: bool) -> None:
        with self._lock:
            stamp = _stamp_of(self.path)
            try:
                found = read_key_file(self.path) if stamp is not None else []
                _check_unique([*self._env, *found])
            except KeyFileInvalid as exc:
                if at_start:
                    raise
                self._stamp, self._file, self._broken = stamp, [], str(exc)
                log.error("%s; its keys are refused until it is fixed (the server rereads it)", exc)
                return
            if not at_start:
                before = {k.sha256: k.name for k in self._file}
                after = {k.sha256: k.name for k in found}
                log.warning("key file %s reloaded: %d keys (added: %s; removed: %s)", self.path, len(found),
                            ", ".join(n for d, n in after.items() if d not in before) or "none",
                            ", ".join(n for d, n in before.items() if d not in after) or "none")
            self._stamp, self._file, self._broken = stamp, found, None

    def identify(self, authorization: str | None) -> ApiKey:
        """The key an ``Authorization: Bearer <key>`` header presents, or
        AuthenticationRequired (KeyFileInvalid when only a broken key file could know it)."""
        if not authorization:
            raise AuthenticationRequired(
                "this server needs an API key: send 'Authorization: Bearer <key>' (the openai SDK: "
                "api_key=<key>); its operator makes one with `embedpipe keys add`")
        scheme, _, presented = authorization.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise AuthenticationRequired(
                "the Authorization header must be 'Bearer <key>' (the openai SDK sends that with api_key=<key>)")
        self.refresh()
        digest = hash_key(presented) if len(presented) <= MAX_KEY_CHARS else "-" * 64
        found = None
        for key in self.keys():  # every one, so the time taken does not say which matched
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is not None:
            return found
        if self._broken is not None:
            raise KeyFileInvalid("the server's API key file is invalid, so its keys are refused until it "
                                 "is fixed; the server's log names the problem")
        log.warning("refused an unknown API key (sha256 %s)", digest[:12])
        raise AuthenticationRequired("unknown API key: check it, or ask the server's operator for one "
                                     "(`embedpipe keys add`); revoked keys stop working at once")
