"""The loopback server's Files and Batch APIs (``/v1/files``, ``/v1/batches``), for embeddings.

Shaped like OpenAI's: a JSONL file uploaded with ``purpose = "batch"``, a batch created
on it (``endpoint = "/v1/embeddings"``, ``completion_window = "24h"``), polled through
``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` (or ``failed`` when
the file is invalid, ``expired`` when the window ran out, ``cancelling`` ->
``cancelled``), then an output file of lines ``{"id", "custom_id", "response":
{"status_code": 200, "request_id", "body": <embeddings response>}, "error": null}`` and
an error file of the lines that failed.

Time is lazy and deterministic: nothing runs in the background. A batch's state is
worked out when it is read, from the seconds since it was created and the live config:
its lines complete in file order over ``batch_delay_s``; a batch that expires
(``batch_expire_after_s``) or is cancelled (``batch_cancel_after_s``, or by the client)
keeps the first ``floor(total * elapsed / batch_delay_s)`` lines, and the rest go to the
error file as ``batch_expired`` / ``batch_cancelled``. Lines chosen to fail
(``batch_fail_ids``, or a seeded ``batch_fail_rate``) answer 500 in the error file; only
batches among the first ``batch_faulty_batches`` created (None: all) suffer them.

The server's fault rates reach these endpoints too when ``batch_api_faults`` is set, and
``batch_lost_replies`` creates batches whose replies never arrive (a client that just
retries makes a second one).

Only completed lines are billed (``batch_tokens_billed``, ``batch_inputs_billed``), as
the provider bills. The embeddings themselves come from the same code as the
synchronous ``/v1/embeddings`` (the service's ``embed_body``).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BATCH_COUNTERS", "BatchApi", "BatchApiError", "FileReply"]

# Counter names the owning service adds to its own (all ints).
BATCH_COUNTERS = (
    "files_uploaded", "files_deleted", "file_downloads", "batches_created", "batches_failed",
    "batches_cancelled", "batches_expired", "batch_lines_completed", "batch_lines_failed",
    "batch_inputs_billed", "batch_tokens_billed",
)
ENDPOINT = "/v1/embeddings"
WINDOW_S = {"24h": 24 * 3600}
_TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchApiError(Exception):
    """An OpenAI-style error answer (the service turns it into its own error reply)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class FileReply:
    """Raw file content (``GET /v1/files/{id}/content``)."""

    content: bytes


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content),
                "created_at": self.created_at, "filename": self.filename, "purpose": self.purpose,
                "status": "processed", "expires_at": None, "status_details": None}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    started: float  # monotonic
    faulty: bool  # among the batches that suffer the configured faults
    lines: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors
    status: str = "validating"
    stamps: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    finalizing_shown: bool = False
    cancel_requested_at: float | None = None


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, bytes)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BatchApiError(400, "expected a multipart/form-data body with 'file' and 'purpose'")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class BatchApi:
    """Files and batches held in memory, behind one lock.

    ``embed_body(body) -> (status, payload)`` answers one embeddings request body the way
    ``/v1/embeddings`` would (200 with vectors and usage, or an error status and body);
    ``bump(name, amount)`` adds to the owner's counters; ``snapshot()`` is its live config.
    """

    def __init__(self, embed_body: Callable[[dict[str, Any]], tuple[int, dict[str, Any]]],
                 bump: Callable[..., None], snapshot: Callable[[], Any]) -> None:
        self._embed_body = embed_body
        self._bump = bump
        self._snapshot = snapshot
        self._lock = threading.RLock()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._seq = 0
        self._created = 0  # batches created since batch_faulty_batches was last set

    def reset_faulty_count(self) -> None:
        with self._lock:
            self._created = 0

    def _new_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-loopback{self._seq:06d}"

    # -- files ------------------------------------------------------------------------
    def upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
        if "file" not in fields:
            raise BatchApiError(400, "Missing the 'file' field", param="file")
        if purpose not in ("batch", "assistants", "fine-tune", "vision", "user_data", "evals"):
            raise BatchApiError(400, f"'{purpose}' is not a valid purpose", param="purpose")
        filename, content = fields["file"]
        limit = self._snapshot().batch_max_file_bytes
        if purpose == "batch" and len(content) > limit:
            raise BatchApiError(400, f"File is too large: {len(content)} bytes, the limit for "
                                f"purpose 'batch' is {limit} bytes", param="file", code="file_too_large")
        with self._lock:
            f = _File(self._new_id("file"), filename or "upload.jsonl", purpose, content, int(time.time()))
            self._files[f.id] = f
        self._bump("files_uploaded")
        return f.card()

    def _file(self, file_id: str) -> _File:
        f = self._files.get(file_id)
        if f is None:
            raise BatchApiError(404, f"No such File object: {file_id}", param="id")
        return f

    def file_card(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            return self._file(file_id).card()

    def file_content(self, file_id: str) -> FileReply:
        with self._lock:
            content = self._file(file_id).content
        self._bump("file_downloads")
        return FileReply(content)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._file(file_id)
            del self._files[file_id]
        self._bump("files_deleted")
        return {"id": file_id, "object": "file", "deleted": True}

    def list_files(self) -> dict[str, Any]:
        with self._lock:
            return {"object": "list", "data": [f.card() for f in self._files.values()], "has_more": False}

    # -- batches ----------------------------------------------------------------------
    def create(self, data: dict[str, Any]) -> dict[str, Any]:
        file_id = data.get("input_file_id")
        if data.get("endpoint") != ENDPOINT:
            raise BatchApiError(400, f"endpoint must be {ENDPOINT!r} on this server", param="endpoint")
        window = data.get("completion_window")
        if window not in WINDOW_S:
            raise BatchApiError(400, f"'{window}' is not one of ['24h'] - 'completion_window'",
                                param="completion_window")
        cfg = self._snapshot()
        with self._lock:
            f = self._file(str(file_id))
            if f.purpose != "batch":
                raise BatchApiError(400, f"File {f.id} was not uploaded with purpose 'batch'",
                                    param="input_file_id")
            self._created += 1
            faulty = cfg.batch_faulty_batches is None or self._created <= cfg.batch_faulty_batches
            b = _Batch(self._new_id("batch"), f.id, window, data.get("metadata"), int(time.time()),
                       time.monotonic(), faulty)
            b.lines, b.errors = _validate(f.content, cfg)
            self._batches[b.id] = b
            card = self._card(b)
        self._bump("batches_created")
        return card

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            b = self._batch(batch_id)
            self._advance(b)
            return self._card(b)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            b = self._batch(batch_id)
            self._advance(b)
            if b.status in _TERMINAL:
                raise BatchApiError(409, f"Cannot cancel a batch with status '{b.status}'.")
            if b.cancel_requested_at is None:
                b.cancel_requested_at = time.monotonic()
                b.status = "cancelling"
                b.stamps["cancelling_at"] = int(time.time())
            return self._card(b)

    def list_batches(self) -> dict[str, Any]:
        with self._lock:
            for b in self._batches.values():
                self._advance(b)
            cards = [self._card(b) for b in reversed(list(self._batches.values()))]
        return {"object": "list", "data": cards, "has_more": False,
                "first_id": cards[0]["id"] if cards else None, "last_id": cards[-1]["id"] if cards else None}

    def _batch(self, batch_id: str) -> _Batch:
        b = self._batches.get(batch_id)
        if b is None:
            raise BatchApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return b

    # -- the lazy clock ---------------------------------------------------------------
    def _advance(self, b: _Batch) -> None:
        """Move ``b`` to the state its age and the live config say it has reached."""
        if b.status in _TERMINAL:
            return
        cfg = self._snapshot()
        now = time.monotonic()
        if b.status == "validating":
            if b.errors:
                b.status = "failed"
                b.stamps["failed_at"] = int(time.time())
                self._bump("batches_failed")
                return
            b.status = "in_progress"
            b.stamps["in_progress_at"] = int(time.time())
        delay = cfg.batch_delay_s
        elapsed = now - b.started
        if b.cancel_requested_at is not None:
            self._finish(b, "cancelled", _progress(b.cancel_requested_at - b.started, delay))
            return
        # A batch cancelled (from outside) or expired before its delay ran out; one whose
        # lines all completed first is completed, however late it is read.
        cancel, expire = cfg.batch_cancel_after_s, cfg.batch_expire_after_s
        if b.faulty and cancel is not None and cancel < delay and elapsed >= cancel:
            b.stamps["cancelling_at"] = int(time.time())
            self._finish(b, "cancelled", _progress(cancel, delay))
            return
        if b.faulty and expire is not None and expire < delay and elapsed >= expire:
            self._finish(b, "expired", _progress(expire, delay))
            return
        if elapsed < delay:
            b.completed = math.floor(len(b.lines) * _progress(elapsed, delay))
            return
        if not b.finalizing_shown:  # one poll sees it, as a client would
            b.finalizing_shown = True
            b.status = "finalizing"
            b.stamps["finalizing_at"] = int(time.time())
            return
        self._finish(b, "completed", 1.0)

    def _finish(self, b: _Batch, status: str, progress: float) -> None:
        """Run the first ``progress`` of the lines, write the output and error files."""
        cfg = self._snapshot()
        done = math.floor(len(b.lines) * progress)
        out, err = [], []
        why = {"expired": ("batch_expired", "This request could not be executed before the "
                           "completion window expired."),
               "cancelled": ("batch_cancelled", "This request was not executed because the "
                             "batch was cancelled.")}.get(status)
        for n, line in enumerate(b.lines):
            request_id = f"req_loopback_batch_{b.id[-6:]}_{n}"
            base = {"id": f"batch_req_{b.id[-6:]}_{n:06d}", "custom_id": line["custom_id"]}
            if n >= done and why is not None:
                err.append({**base, "response": None, "error": {"code": why[0], "message": why[1]}})
                continue
            code, payload = self._answer(b, line, cfg)
            entry = {**base, "response": {"status_code": code, "request_id": request_id,
                                          "body": payload}, "error": None}
            (out if code == 200 else err).append(entry)
            if code == 200:
                self._bump("batch_inputs_billed", len(payload["data"]))
                self._bump("batch_tokens_billed", payload["usage"]["prompt_tokens"])
        b.completed, b.failed = len(out), len(err)
        self._bump("batch_lines_completed", len(out))
        self._bump("batch_lines_failed", len(err))
        if out:
            b.output_file_id = self._store_output(b, out, "batch_output")
        if err:
            b.error_file_id = self._store_output(b, err, "batch_output")
        b.status = status
        b.stamps[f"{status}_at"] = int(time.time())
        if status in ("cancelled", "expired"):
            self._bump(f"batches_{status}")

    def _answer(self, b: _Batch, line: dict[str, Any], cfg: Any) -> tuple[int, dict[str, Any]]:
        if b.faulty and _chosen_to_fail(b.id, line["custom_id"], cfg):
            return 500, {"error": {"message": "The server had an error while processing your "
                                   "request. Sorry about that!", "type": "server_error",
                                   "param": None, "code": None}}
        return self._embed_body(line["body"])

    def _store_output(self, b: _Batch, entries: list[dict[str, Any]], purpose: str) -> str:
        content = "".join(json.dumps(e) + "\n" for e in entries).encode()
        f = _File(self._new_id("file"), f"{b.id}_output.jsonl", purpose, content, int(time.time()))
        self._files[f.id] = f
        return f.id

    def _card(self, b: _Batch) -> dict[str, Any]:
        stamps = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                  "cancelling_at", "cancelled_at")
        errors = {"object": "list", "data": b.errors} if b.status == "failed" else None
        return {
            "id": b.id, "object": "batch", "endpoint": ENDPOINT, "errors": errors,
            "input_file_id": b.input_file_id, "completion_window": b.completion_window,
            "status": b.status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": b.created_at, "expires_at": b.created_at + WINDOW_S[b.completion_window],
            **{name: b.stamps.get(name) for name in stamps},
            "request_counts": {"total": 0 if b.status == "validating" else len(b.lines),
                               "completed": b.completed, "failed": b.failed},
            "metadata": b.metadata,
        }


def _progress(elapsed: float, delay: float) -> float:
    return 1.0 if delay <= 0 else max(0.0, min(1.0, elapsed / delay))


def _chosen_to_fail(batch_id: str, custom_id: str, cfg: Any) -> bool:
    if custom_id in cfg.batch_fail_ids:
        return True
    # Seeded by the custom_id alone: a resubmitted line is drawn again (in a new batch
    # that is faulty too, it fails the same way: the attempt limit is reachable).
    return cfg.batch_fail_rate > 0 and random.Random(f"{cfg.seed}:{custom_id}").random() < cfg.batch_fail_rate


def _validate(content: bytes, cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's request lines, and the errors that fail the whole batch (as OpenAI's
    validation does: bad JSON, a wrong method or url, duplicate custom_ids, one model per
    file, too many requests or embedding inputs)."""
    lines, errors, seen, models = [], [], set(), set()
    text = content.decode("utf-8", errors="replace")
    rows = [r for r in text.splitlines() if r.strip()]
    if not rows:
        return [], [_error("empty_file", "The batch input file is empty.", None)]
    if len(rows) > cfg.batch_max_requests:
        return [], [_error("too_many_requests", f"The input file has {len(rows)} requests, over the "
                           f"limit of {cfg.batch_max_requests} per batch.", None)]
    inputs = 0
    for n, row in enumerate(rows, 1):
        try:
            item = json.loads(row)
        except ValueError:
            errors.append(_error("invalid_json_line", "This line is not parseable as valid JSON.", n))
            continue
        body = item.get("body") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or not isinstance(body, dict):
            errors.append(_error("invalid_request", "Each line needs custom_id, method, url and a body object.", n))
            continue
        if item.get("method") != "POST":
            errors.append(_error("invalid_method", "The method must be POST.", n, "method"))
        if item.get("url") != ENDPOINT:
            errors.append(_error("mismatched_endpoint", f"The url {item.get('url')!r} does not match "
                                 f"the batch endpoint {ENDPOINT!r}.", n, "url"))
        if item["custom_id"] in seen:
            errors.append(_error("duplicate_custom_id", "The custom_id for this request is a "
                                 "duplicate of another request.", n, "custom_id"))
        seen.add(item["custom_id"])
        models.add(body.get("model"))
        given = body.get("input")
        inputs += len(given) if isinstance(given, list) and not all(isinstance(t, int) for t in given) else 1
        lines.append(item)
    if len(models) > 1:
        errors.append(_error("mismatched_model", "All requests in a batch must use the same model.", None))
    if inputs > cfg.batch_max_inputs:
        errors.append(_error("too_many_inputs", f"The batch has {inputs} embedding inputs, over the "
                             f"limit of {cfg.batch_max_inputs} across all requests.", None))
    return lines, errors


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}
