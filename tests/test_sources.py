"""Reading sources: folder trees with text, HTML and PDF files, record files, and the
tolerant scan a sync uses (a bad file is reported and skipped, never fatal)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from embedpipe.errors import InputError, SourceUnavailable
from embedpipe.sources import SourceScan, SourceSpec, read_documents


def make_pdf(lines: list[str], title: str | None = None) -> bytes:
    """A minimal one-page PDF whose text pypdf extracts (Helvetica, a line each)."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        safe = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({safe}) Tj T*")
    stream = "\n".join([*ops, "ET"]).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if title:
        objects.append(b"<< /Title (" + title.encode("latin-1") + b") >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    info = b" /Info %d 0 R" % len(objects) if title else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, info, xref)
    return bytes(out)


HTML = """<!doctype html><html><head><title>Greenhouse &amp; Venus</title>
<style>p { color: red }</style><script>var secret = "do not index";</script></head>
<body><h1>Venus</h1><p>A runaway greenhouse&nbsp;effect.</p><ul><li>hot</li><li>dense</li></ul>
<noscript>enable js</noscript></body></html>"""


def test_html_pdf_and_text_files_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "venus.html").write_text(HTML, encoding="utf-8")
    (tmp_path / "mars.pdf").write_bytes(make_pdf(["Mars is cold.", "It has dust storms."], "Mars"))
    (tmp_path / "notes.md").write_text("\ufeff# Notes\n\nPlain markdown.", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("skipped", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs = {d.id: d for d in read_documents(tmp_path)}
    assert set(docs) == {"a/venus.html", "mars.pdf", "notes.md"}
    venus = docs["a/venus.html"]
    assert venus.metadata == {"path": "a/venus.html", "title": "Greenhouse & Venus"}
    assert "do not index" not in venus.text and "color" not in venus.text and "enable js" not in venus.text
    assert venus.text.startswith("Venus\n\nA runaway greenhouse effect.\n\nhot\ndense")
    assert docs["mars.pdf"].text == "Mars is cold.\nIt has dust storms."
    assert docs["mars.pdf"].metadata == {"path": "mars.pdf", "pages": 1, "title": "Mars"}
    assert docs["notes.md"].text.startswith("# Notes")  # byte-order mark dropped


def test_glob_selects_files(tmp_path: Path) -> None:
    (tmp_path / "keep.md").write_text("kept", encoding="utf-8")
    (tmp_path / "drop.txt").write_text("dropped", encoding="utf-8")
    docs = list(SourceScan(SourceSpec(tmp_path, glob="**/*.md")))
    assert [d.id for d in docs] == ["keep.md"]


def test_html_in_a_declared_charset(tmp_path: Path) -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><body>caf\xe9</body></html>'
    (tmp_path / "p.html").write_bytes(page.encode("latin-1"))
    assert next(iter(read_documents(tmp_path))).text == "café"


def test_the_scan_reports_bad_files_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4 not really a pdf")
    (tmp_path / "empty.md").write_text("   \n", encoding="utf-8")
    (tmp_path / "records.jsonl").write_text(
        json.dumps({"id": "r1", "text": "first"}) + "\n{broken\n", encoding="utf-8")
    (tmp_path / "z-dupes.jsonl").write_text(
        json.dumps({"id": "good.txt", "text": "same id as a file"}) + "\n", encoding="utf-8")
    scan = SourceScan(SourceSpec(tmp_path))
    ids = [d.id for d in scan]
    assert "good.txt" in ids and ids.count("good.txt") == 1
    reasons = {e.path: e.reason for e in scan.errors}
    assert reasons["latin.txt"].startswith("not valid UTF-8")
    assert "not a readable PDF" in reasons["scan.pdf"]
    assert "empty text" in reasons["empty.md"]
    assert ":2: malformed JSON" in reasons["records.jsonl"]
    assert "duplicate id 'good.txt'" in reasons["z-dupes.jsonl"]
    # whole files that failed, and single documents skipped: neither may be deleted
    assert scan.failed == {"latin.txt", "scan.pdf", "records.jsonl"}
    assert scan.kept_ids == {"empty.md", "good.txt"}
    assert scan.files == 6


def test_csv_records_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "d.csv"
    good.write_text('id,text,lang\n1,"Venus, the hot one",en\n2,"Multi\nline",fr\n', encoding="utf-8")
    docs = list(read_documents(good, SourceSpec(good, metadata_fields=("lang",))))
    assert [(d.id, d.text, d.metadata) for d in docs] == [
        ("1", "Venus, the hot one", {"lang": "en"}), ("2", "Multi\nline", {"lang": "fr"})]
    assert docs[0].source == "d.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,ok\n2,too,many\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.csv:3: 1 more cells than the header"):
        list(read_documents(bad))
    nofield = tmp_path / "nofield.csv"
    nofield.write_text("key,body\n1,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="missing 'id'"):
        list(read_documents(nofield))


def test_missing_and_unsupported_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="does not exist.*unmounted"):
        list(SourceScan(SourceSpec(tmp_path / "gone")))
    odd = tmp_path / "x.docx"
    odd.write_bytes(b"PK")
    with pytest.raises(InputError, match="unsupported input type .docx"):
        list(read_documents(odd))


def _linked_tree(tmp_path: Path) -> Path:
    """``src`` with its own files, links that stay inside it and links that lead out."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    (src / "own.txt").write_text("inside the source", encoding="utf-8")
    (outside / "secret.txt").write_text("private text outside the source", encoding="utf-8")
    (outside / "more.md").write_text("another outside file", encoding="utf-8")
    (outside / "self").symlink_to(outside, target_is_directory=True)  # a loop once followed
    (src / "leak.txt").symlink_to(outside / "secret.txt")
    (src / "up.md").symlink_to(Path("..") / "outside" / "more.md")  # relative, still outside
    (src / "mirror").symlink_to(outside, target_is_directory=True)
    (src / "sub" / "alias.txt").symlink_to(src / "own.txt")  # resolves inside: read
    (src / "loop").symlink_to(src, target_is_directory=True)  # inside: read at its own path
    return src


def test_links_out_of_the_source_are_skipped_and_reported(tmp_path: Path) -> None:
    src = _linked_tree(tmp_path)
    scan = SourceScan(SourceSpec(src))
    assert {d.id: d.text for d in scan} == {"own.txt": "inside the source",
                                            "sub/alias.txt": "inside the source"}
    skipped = {e.path: e.reason for e in scan.skipped}
    assert set(skipped) == {"leak.txt", "up.md", "mirror/", "loop/"}
    assert str(tmp_path / "outside" / "secret.txt") in skipped["leak.txt"]
    assert "outside the source" in skipped["mirror/"] and "follow_symlinks = true" in skipped["leak.txt"]
    assert "inside the source" in skipped["loop/"]
    assert scan.errors == [] and scan.failed == set()  # skipped by rule: not a failure
    seen: list = []
    assert {d.id for d in read_documents(src, SourceSpec(src), skipped=seen)} == {"own.txt", "sub/alias.txt"}
    assert {e.path for e in seen} == set(skipped)
    (tmp_path / "srclink").symlink_to(src, target_is_directory=True)  # the root itself a link
    assert {d.id for d in read_documents(tmp_path / "srclink")} == {"own.txt", "sub/alias.txt"}


def test_follow_symlinks_reads_links_out_of_the_source_once(tmp_path: Path) -> None:
    src = _linked_tree(tmp_path)
    scan = SourceScan(SourceSpec(src, follow_symlinks=True))
    assert {d.id for d in scan} == {"own.txt", "sub/alias.txt", "leak.txt", "up.md",
                                    "mirror/secret.txt", "mirror/more.md"}
    assert {e.path: e.reason.split(";")[0] for e in scan.skipped} == {
        "loop/": f"symbolic link to {src}, a folder inside the source (read there)",
        "mirror/self/": f"symbolic link to {tmp_path / 'outside'}, a folder already read"}


@pytest.mark.parametrize("line, where", [
    ('{"id": "a", "text": "t", "score": 1e400}', "metadata 'score'"),
    ('{"id": "a", "text": "t", "m": {"xs": [1, -1e999]}}', "metadata 'm.xs[1]'"),
])
def test_non_finite_metadata_is_refused_with_the_line(tmp_path: Path, line: str, where: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"d.jsonl:2: {re.escape(where)} is not a finite number"):
        list(read_documents(path))


def test_non_finite_parquet_metadata_is_refused_and_nan_is_null(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "w": [float("nan"), 1.0],
                             "v": [[1.0], [float("inf")]]}), path)
    with pytest.raises(InputError, match=r"d.parquet row 2: metadata 'v\[0\]' is not a finite number"):
        list(read_documents(path))
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "w": [float("nan")]}), path)
    assert next(iter(read_documents(path))).metadata == {"w": None}  # a missing value
