"""Reading input documents: a JSONL file, a directory of .txt/.md files, or Parquet.

Readers yield :class:`~embedpipe.corpus.Document` objects and raise
:class:`~embedpipe.errors.InputError` naming the file (and line) of the first bad
record. Validation that needs the whole input (duplicate ids) is in ``validate``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedpipe.corpus import Document
from embedpipe.errors import InputError

__all__ = ["read_documents"]

TEXT_SUFFIXES = (".txt", ".md")


def read_documents(path: Path) -> Iterator[Document]:
    """Documents from ``path`` in input order, validated one by one and for duplicate ids."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a .jsonl file, a .parquet file or a directory")
    if path.is_dir():
        reader: Iterator[tuple[str, Document]] = _read_directory(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        reader = _read_jsonl(path)
    elif path.suffix.lower() == ".parquet":
        reader = _read_parquet(path)
    else:
        raise InputError(
            f"{path}: unsupported input type {path.suffix or '(none)'}; "
            "use .jsonl, .parquet or a directory of .txt/.md files"
        )
    seen: dict[str, str] = {}
    count = 0
    for where, doc in reader:
        if not doc.text.strip():
            raise InputError(f"{where}: document {doc.id!r} has empty text; remove it or add text")
        if doc.id in seen:
            raise InputError(
                f"{where}: duplicate id {doc.id!r} (first seen at {seen[doc.id]}); ids must be unique"
            )
        seen[doc.id] = where
        count += 1
        yield doc
    if count == 0:
        raise InputError(f"{path} holds no documents")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-encode the input as UTF-8"
        ) from None


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


def _coerce_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: 'id' must be a string or an integer, got {type(value).__name__}")
    doc_id = str(value)
    if not doc_id.strip():
        raise InputError(f"{where}: 'id' is empty")
    return doc_id


def _read_jsonl(path: Path) -> Iterator[tuple[str, Document]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            line = _decode(raw, where).strip()
            if number == 1:
                line = line.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
            if not line:
                continue
            try:
                record = json.loads(line, parse_constant=_no_constants)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: malformed JSON ({exc.msg}); fix or remove that line") from None
            except ValueError as exc:
                raise InputError(f"{where}: {exc}") from None
            _check_encodable(record, where)
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object with 'id' and 'text'")
            for key in ("id", "text"):
                if key not in record:
                    raise InputError(f"{where}: missing {key!r}; each line needs 'id' and 'text'")
            text = record.pop("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: 'text' must be a string")
            doc_id = _coerce_id(record.pop("id"), where)
            yield where, Document(doc_id, text, metadata=record, source=str(path.name))


def _read_directory(root: Path) -> Iterator[tuple[str, Document]]:
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise InputError(f"{root} has no .txt or .md files")
    for file in files:
        rel = file.relative_to(root).as_posix()
        text = _decode(file.read_bytes(), str(file)).lstrip("\ufeff")
        yield str(file), Document(rel, text, metadata={"path": rel}, source=rel)


def _no_nan(value: Any) -> Any:
    """NaN is not JSON; a missing float becomes null in metadata."""
    return None if isinstance(value, float) and value != value else value


def _read_parquet(path: Path) -> Iterator[tuple[str, Document]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    missing = [c for c in ("id", "text") if c not in names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; need 'id' and 'text'")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                where = f"{path} row {row}"
                text = record.pop("text")
                if not isinstance(text, str):
                    raise InputError(f"{where}: 'text' must be a string")
                doc_id = _coerce_id(record.pop("id"), where)
                metadata = {k: _no_nan(v) for k, v in record.items()}
                yield where, Document(doc_id, text, metadata=metadata, source=path.name)
    except pa.ArrowException as exc:
        raise InputError(f"{path}: cannot read row {row + 1} ({exc})") from None
