"""Reading documents from a source: a folder tree, or one JSONL, CSV or Parquet file.

In a folder, each ``.txt``/``.md``/``.rst``, ``.html`` and ``.pdf`` file is one document
whose id is its path relative to the folder; ``.jsonl``, ``.csv`` and ``.parquet`` files
hold one document per record, with the id and text in ``id_field`` and ``text_field``.

Two ways to read:

* :func:`read_documents` (``embedpipe ingest``) is strict: the first bad record raises
  an :class:`~embedpipe.errors.InputError` naming the file (and line), before anything
  is written;
* :class:`SourceScan` (``embedpipe sync``) is tolerant: a file that cannot be read is
  reported with its path and reason and the rest goes on. A file counts whole or not
  at all: the caller drops the documents of every file in ``scan.failed`` (a record
  file can fail after its first records were yielded) and keeps their indexed versions,
  so nothing is deleted because a file could not be read, and the next run retries it.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from embedpipe.corpus import Document
from embedpipe.errors import InputError, SourceUnavailable

__all__ = ["FileError", "SourceScan", "SourceSpec", "documents_from_records", "read_documents"]

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet")
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
ALL_SUFFIXES = DOCUMENT_SUFFIXES + RECORD_SUFFIXES


@dataclass(frozen=True)
class SourceSpec:
    """Where and how to read an index's documents (``[indexes.NAME]``)."""

    path: Path
    glob: str | None = None
    id_field: str = "id"
    text_field: str = "text"
    metadata_fields: tuple[str, ...] | None = None
    follow_symlinks: bool = False  # read links that lead out of a folder source

    @classmethod
    def of(cls, path: Path, **fields: Any) -> SourceSpec:
        meta = fields.pop("metadata_fields", None)
        return cls(Path(path), metadata_fields=tuple(meta) if meta is not None else None, **fields)


@dataclass(frozen=True)
class FileError:
    """A file (or one record of it) that could not be read, and why."""

    path: str  # relative to the source folder: what the corpus's ``source`` column holds
    reason: str
    id: str | None = None  # the document concerned, when the file was readable
    line: int | None = None  # the line (JSONL, CSV) or row (Parquet) of a bad record

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "id": self.id, "reason": self.reason}
        if self.line is not None:
            out["line"] = self.line
        return out


# --- strict reading (ingest) ---------------------------------------------------------


def read_documents(
    path: Path, spec: SourceSpec | None = None, skipped: list[FileError] | None = None,
    invalid: list[FileError] | None = None,
) -> Iterator[Document]:
    """Documents from ``path`` in input order; the first bad record raises InputError.

    Symbolic links left out by rule are appended to ``skipped``. Given an ``invalid``
    list, bad records (and, in a folder, unreadable files) are appended to it with their
    file, line and reason instead, and the rest is read (``--skip-invalid``).
    """
    spec = spec or SourceSpec(Path(path))
    root = Path(path)
    files = _files(root, spec, problems=invalid, skipped=skipped)
    seen: dict[str, str] = {}
    count = 0
    for file, name in files:
        try:
            for where, doc in _read_file(file, name, spec, single=not root.is_dir()):
                try:
                    if isinstance(doc, InputError):
                        raise doc
                    _check_document(doc, where, seen)
                except InputError as exc:
                    if invalid is None:
                        raise
                    invalid.append(_invalid(exc, file, where, doc))
                    continue
                count += 1
                yield doc
        except (InputError, OSError) as exc:  # the file as a whole: only a folder goes on
            if invalid is None or not root.is_dir():
                raise
            reason = _reason(exc, str(file)) if isinstance(exc, InputError) else (
                f"cannot read: {exc.strerror or exc}")
            invalid.append(FileError(str(file), reason))
    if count == 0:
        raise InputError(f"{root} holds no documents" + (
            f" that are valid ({len(invalid)} invalid records skipped)" if invalid else ""))


def documents_from_records(
    records: Iterable[Mapping[str, Any]], where: str = "documents", source: str = "api",
) -> list[Document]:
    """Documents from records already parsed as ``{"id", "text", "metadata"}`` (the
    server's documents endpoint): the checks :func:`read_documents` makes on a file's
    records (an id that is a non-empty string or integer, a text that is not blank,
    unique ids, strict JSON metadata), the first failure raised as an InputError that
    names the record as ``where[i]``. All are checked before any is returned."""
    seen: dict[str, str] = {}
    out: list[Document] = []
    for number, record in enumerate(records):
        place = f"{where}[{number}]"
        _check_encodable(dict(record), place)
        text = record.get("text")
        if not isinstance(text, str):
            raise InputError(f"{place}: 'text' must be a string")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise InputError(f"{place}: 'metadata' must be an object")
        doc = Document(_coerce_id(record.get("id"), place), text,
                       metadata={k: _finite(v, k, place) for k, v in metadata.items()}, source=source)
        _check_document(doc, place, seen)
        out.append(doc)
    if not out:
        raise InputError(f"{where}: no documents; send at least one")
    return out


def _invalid(exc: InputError, file: Path, where: str, doc: Document | InputError) -> FileError:
    """A skipped record: the file, its line (or row) and the reason without the place."""
    line = where.rpartition(":")[2] if where.startswith(f"{file}:") else where.rpartition(" row ")[2]
    return FileError(str(file), _reason(exc, where), None if isinstance(doc, InputError) else doc.id,
                     int(line) if line.isdigit() else None)


def _check_document(doc: Document, where: str, seen: dict[str, str]) -> None:
    if not doc.text.strip():
        raise InputError(f"{where}: document {doc.id!r} has empty text; remove it or add text")
    if doc.id in seen:
        raise InputError(
            f"{where}: duplicate id {doc.id!r} (first seen at {seen[doc.id]}); ids must be unique"
        )
    seen[doc.id] = where


def _files(
    root: Path, spec: SourceSpec, problems: list[FileError] | None = None,
    skipped: list[FileError] | None = None,
) -> list[tuple[Path, str]]:
    """(file, name relative to the source) of every file to read, in a stable order.

    What cannot be listed (a folder without read permission, a symbolic link whose
    target is gone) goes to ``problems`` (named ``dir/`` for a folder), or raises when
    no list is given: silently leaving it out would look like deleted documents.
    Symbolic links left out by rule (see :class:`_Walk`) go to ``skipped``.
    """
    if not root.exists():
        raise SourceUnavailable(
            f"{root} does not exist; pass a .jsonl, .csv or .parquet file or a folder"
            " (a source that vanished may be an unmounted share: nothing was changed)"
        )
    if not root.is_dir():
        if root.suffix.lower() not in RECORD_SUFFIXES + DOCUMENT_SUFFIXES:
            raise InputError(
                f"{root}: unsupported input type {root.suffix or '(none)'}; use .jsonl, .csv, "
                ".parquet or a folder of .txt/.md/.html/.pdf files"
            )
        return [(root, root.name)]
    walk = _Walk(root, spec)
    walk.folder(root, "")
    if walk.trouble and problems is None:
        raise InputError(f"{root / walk.trouble[0].path}: {walk.trouble[0].reason}")
    if problems is not None:
        problems.extend(walk.trouble)
    if skipped is not None:
        skipped.extend(walk.skipped)
    return sorted(walk.found, key=lambda pair: pair[1])


class _Walk:
    """The files of a folder source, every symbolic link resolved first.

    Without ``follow_symlinks`` only what resolves under the (resolved) source root is
    read: a link that leads out of it would put text from elsewhere on the machine into
    the corpus, the payloads and perhaps a hosted request. A link to a folder inside the
    source is not descended (its files are read at their own paths, once); with
    ``follow_symlinks`` links leading out are read too, each real folder once (no loops).
    Links left out are listed in ``skipped`` with the reason: reported, never taken for
    deleted documents.
    """

    def __init__(self, root: Path, spec: SourceSpec) -> None:
        self.root, self.spec = root, spec
        self.real = root.resolve()
        self.visited: set[Path] = set()
        self.found: list[tuple[Path, str]] = []
        self.trouble: list[FileError] = []
        self.skipped: list[FileError] = []

    def folder(self, path: Path, rel: str) -> None:
        self.visited.add(path.resolve())
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not rel:
                raise SourceUnavailable(f"{self.root} cannot be read ({exc.strerror}); "
                                        "nothing was changed") from None
            self.trouble.append(FileError(rel, f"folder cannot be read: {exc.strerror}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = rel + entry.name
            if entry.is_dir(follow_symlinks=False):
                self.folder(Path(entry.path), name + "/")
            elif entry.is_symlink() and entry.is_dir():
                self.linked_folder(Path(entry.path), name + "/")
            else:
                self.file(Path(entry.path), name)

    def linked_folder(self, path: Path, rel: str) -> None:
        target = path.resolve()
        if target.is_relative_to(self.real):
            self._skip(rel, f"symbolic link to {target}, a folder inside the source (read there)")
        elif not self.spec.follow_symlinks:
            self._skip(rel, f"symbolic link to {target}, a folder outside the source; {_FOLLOW}")
        elif target in self.visited:
            self._skip(rel, f"symbolic link to {target}, a folder already read")
        else:
            self.folder(path, rel)

    def file(self, path: Path, rel: str) -> None:
        if path.suffix.lower() not in ALL_SUFFIXES or not _matches(rel, self.spec.glob):
            return
        if not path.is_symlink():
            if path.is_file():  # not a fifo or a device
                self.found.append((path, rel))
            return
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a loop of links
            self.trouble.append(FileError(rel, "symbolic link loop"))
            return
        if not self.spec.follow_symlinks and not target.is_relative_to(self.real):
            self._skip(rel, f"symbolic link to {target}, outside the source; {_FOLLOW}")
        elif not target.exists():
            self.trouble.append(FileError(
                rel, f"broken symbolic link (its target {os.readlink(path)} is missing)"))
        elif target.is_file():
            self.found.append((path, rel))

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append(FileError(rel, reason))


_FOLLOW = "set follow_symlinks = true in the index's settings to read it"


def _matches(rel: str, pattern: str | None) -> bool:
    """``glob`` as fnmatch patterns on the relative path (``**/`` also matches the top)."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(rel, pattern) or (
        pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:]))


def _read_file(
    file: Path, name: str, spec: SourceSpec, single: bool
) -> Iterator[tuple[str, Document | InputError]]:
    """(where, document) pairs of one file. A bad record comes as (where, the InputError),
    so a caller may skip it and go on; what spoils the whole file raises."""
    suffix = file.suffix.lower()
    source = file.name if single else name
    if suffix in (".jsonl", ".ndjson"):
        records: Records = _jsonl_records(file)
    elif suffix == ".csv":
        records = _csv_records(file)
    elif suffix == ".parquet":
        records = _parquet_records(file)
    else:
        text, meta = _extract(file)
        yield str(file), Document(name, text, metadata={"path": name, **meta}, source=source)
        return
    for where, record in records:
        if isinstance(record, InputError):
            yield where, record
            continue
        try:
            yield where, _record_document(record, where, spec, source)
        except InputError as exc:
            yield where, exc


def _record_document(record: dict[str, Any], where: str, spec: SourceSpec, source: str) -> Document:
    for key in (spec.id_field, spec.text_field):
        if key not in record:
            raise InputError(
                f"{where}: missing {key!r}; each record needs {spec.id_field!r} and {spec.text_field!r}"
            )
    text = record.pop(spec.text_field)
    if not isinstance(text, str):
        raise InputError(f"{where}: {spec.text_field!r} must be a string")
    doc_id = _coerce_id(record.pop(spec.id_field), where, spec.id_field)
    if spec.metadata_fields is not None:
        record = {k: record[k] for k in spec.metadata_fields if k in record}
    return Document(doc_id, text, metadata={k: _finite(v, k, where) for k, v in record.items()},
                    source=source)


# --- tolerant reading (sync) --------------------------------------------------------


@dataclass
class SourceScan:
    """Documents of a source, file by file; unreadable files are reported, not fatal.

    Iterate once. Afterwards ``errors`` lists what was skipped, ``failed`` holds the
    names of files whose documents must all be dropped (and kept as indexed), and
    ``kept_ids`` the ids of documents skipped on their own (empty text, a duplicate id).
    A name in ``failed`` that ends with ``/`` is a folder that could not be listed: every
    document from below it is kept. ``skipped`` lists the symbolic links left out by
    rule (see ``follow_symlinks``); what the corpus holds from them is kept too.
    """

    spec: SourceSpec
    errors: list[FileError] = field(default_factory=list)
    skipped: list[FileError] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    kept_ids: set[str] = field(default_factory=set)
    files: int = 0

    def __iter__(self) -> Iterator[Document]:
        root = self.spec.path
        single = not root.is_dir()
        seen: dict[str, str] = {}
        problems: list[FileError] = []
        files = _files(root, self.spec, problems, self.skipped)
        self.errors.extend(problems)
        self.failed.update(p.path for p in problems)
        for file, name in files:
            self.files += 1
            try:
                for where, doc in _read_file(file, name, self.spec, single):
                    if isinstance(doc, InputError):  # a bad record: the file is kept as indexed
                        raise doc
                    try:
                        _check_document(doc, where, seen)
                    except InputError as exc:
                        self.errors.append(FileError(name, _reason(exc, where), doc.id))
                        self.kept_ids.add(doc.id)
                        continue
                    yield doc
            except InputError as exc:
                self.errors.append(FileError(name, _reason(exc, str(file))))
                self.failed.add(file.name if single else name)
            except OSError as exc:  # unreadable: permissions, a vanished file, I/O errors
                self.errors.append(FileError(name, f"cannot read: {exc.strerror or exc}"))
                self.failed.add(file.name if single else name)
            except Exception as exc:  # noqa: BLE001 - a parser's own bug must not stop the run
                self.errors.append(FileError(name, f"cannot read: {type(exc).__name__}: {exc}"))
                self.failed.add(file.name if single else name)


def _reason(exc: InputError, where: str) -> str:
    """The error without the leading path the FileError already carries."""
    text = str(exc)
    return text[len(where) + 2:] if text.startswith(where + ": ") else text


# --- formats --------------------------------------------------------------------------


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-encode the input as UTF-8"
        ) from None


def _extract(file: Path) -> tuple[str, dict[str, Any]]:
    """Text and metadata of a one-document file."""
    suffix = file.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return _pdf_text(file)
    raw = file.read_bytes()
    if suffix in HTML_SUFFIXES:
        return _html_text(raw, str(file))
    return _decode(raw, str(file)).lstrip("\ufeff"), {}


_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9._-]+)""", re.IGNORECASE)


def _html_text(raw: bytes, where: str) -> tuple[str, dict[str, Any]]:
    try:
        html = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        declared = _CHARSET.search(raw[:4096])
        if not declared:
            _decode(raw, where)  # raises the UTF-8 error
        try:
            html = raw.decode(declared.group(1).decode("ascii"))  # type: ignore[union-attr]
        except (LookupError, UnicodeDecodeError):
            raise InputError(f"{where}: cannot decode as its declared charset "
                             f"{declared.group(1).decode('ascii')!r}") from None  # type: ignore[union-attr]
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    meta = {"title": parser.title.strip()} if parser.title.strip() else {}
    return parser.text(), meta


class _TextOfHTML(HTMLParser):
    """Visible text of an HTML page: no scripts or styles, block elements on new lines."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCK = {"p", "div", "ul", "ol", "table", "section", "article", "h1", "h2", "h3", "h4", "h5",
             "h6", "pre", "blockquote", "header", "footer", "hr", "main", "nav", "aside", "dl"}
    LINE = {"br", "li", "tr", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self._skip += 1
        self._in_title = self._in_title or tag == "title"
        if tag in self.BLOCK:
            self.parts.append("\n\n")
        elif tag in self.LINE:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag == "title":
            self._in_title = False
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if not self._skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf_text(file: Path) -> tuple[str, dict[str, Any]]:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - a dependency, but say what to do
        raise InputError(f"{file}: reading PDF needs pypdf (pip install pypdf)") from None
    try:
        reader = PdfReader(file)
        if reader.is_encrypted and not reader.decrypt(""):
            raise InputError(f"{file}: the PDF is encrypted; decrypt it or remove it from the source")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata or {}).get("/Title")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises more than PyPdfError on bad files
        raise InputError(f"{file}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise InputError(f"{file}: no extractable text in {len(pages)} pages (a scanned image?); "
                         "OCR it first")
    meta: dict[str, Any] = {"pages": len(pages)}
    if isinstance(title, str) and title.strip():
        meta["title"] = title.strip()
    return text, meta


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; use null or a number")


def _check_encodable(record: Any, where: str) -> None:
    """JSON escapes can spell lone surrogates (``"\\ud800"``), which no file can store."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{where}: contains a lone surrogate escape (\\ud800-\\udfff); fix the text"
        ) from None


def _coerce_id(value: Any, where: str, key: str = "id") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: {key!r} must be a string or an integer, got {type(value).__name__}")
    doc_id = str(value)
    if not doc_id.strip():
        raise InputError(f"{where}: {key!r} is empty")
    return doc_id


Records = Iterator[tuple[str, "dict[str, Any] | InputError"]]


def _jsonl_records(path: Path) -> Records:
    """(where, record) per line; a bad line comes as its InputError (the next is read)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            try:
                record = _jsonl_record(raw, where, first=number == 1)
            except InputError as exc:
                yield where, exc
                continue
            if record is not None:
                yield where, record


def _jsonl_record(raw: bytes, where: str, first: bool) -> dict[str, Any] | None:
    line = _decode(raw, where).strip()
    if first:
        line = line.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
    if not line:
        return None
    try:
        record = json.loads(line, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON ({exc.msg}); fix or remove that line") from None
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    _check_encodable(record, where)
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with an id and a text")
    return record


def _csv_records(path: Path) -> Records:
    text = _decode(path.read_bytes(), str(path)).lstrip("\ufeff")
    csv.field_size_limit(1 << 30)  # a document's text is one (large) cell
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more cells than the header names
                yield where, InputError(f"{where}: {len(record[None])} more cells than the header has")
                continue
            yield where, dict(record)
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _finite(value: Any, key: str, where: str) -> Any:
    """Metadata as strict JSON: NaN (how Parquet and pandas spell a missing float) becomes
    null; an infinity (``1e400`` in JSON) has no JSON form, so the record is refused."""
    if isinstance(value, float):
        if value != value:
            return None
        if value in (math.inf, -math.inf):
            raise InputError(f"{where}: metadata {key!r} is not a finite number ({value}); "
                             "use a finite number or null")
    elif isinstance(value, dict):
        return {k: _finite(v, f"{key}.{k}", where) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        return [_finite(v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    return value


def _parquet_records(path: Path) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield f"{path} row {row}", record
    except pa.ArrowException as exc:
        raise InputError(f"{path}: cannot read row {row + 1} ({exc})") from None

