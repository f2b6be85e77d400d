"""Retrieval metrics, and the Cranfield end-to-end proof that ids, vectors and prompts are stored right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from embedpipe.evaluation import mean, ndcg_at_k, read_cranfield, recall_at_k
from embedpipe.index import Index
from embedpipe.ingest import ingest

from conftest import CRANFIELD, static_profile_toml


@pytest.mark.parametrize(
    "ranked, gains, expected",
    [
        (["a", "b"], {"a": 3.0, "b": 1.0}, 1.0),
        (["b", "a"], {"a": 3.0, "b": 1.0}, (1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3))),
        (["x", "y"], {"a": 2.0}, 0.0),
        (["x"], {}, 0.0),
    ],
)
def test_ndcg(ranked, gains, expected) -> None:
    assert ndcg_at_k(ranked, gains, 10) == pytest.approx(expected)


def test_recall() -> None:
    assert recall_at_k(["a", "x", "b"], {"a": 1, "b": 2, "c": 1}, k=2) == pytest.approx(1 / 3)


needs_cranfield = pytest.mark.skipif(
    not (CRANFIELD / "cran.all.1400").is_file(),
    reason=f"Cranfield collection not found at {CRANFIELD} (shared/datasets/cranfield)",
)


@needs_cranfield
def test_cranfield_reader() -> None:
    golden = read_cranfield(CRANFIELD)
    assert len(golden.documents) == 1400 and len(golden.queries) == 225
    assert set(golden.judgments) <= set(golden.queries)
    assert golden.documents["1"].startswith("experimental investigation of the aerodynamics")


@needs_cranfield
@pytest.mark.parametrize(
    "profile, reference",
    [
        ("static", 0.392),
        pytest.param("local-minilm", 0.506, marks=pytest.mark.slow),  # ~1 min of encoding
    ],
)
def test_cranfield_through_the_index_matches_direct_exact_search(
    make_settings, static_model_dir, tmp_path, profile, reference
) -> None:
    """Ingest the Cranfield abstracts with a real model, search all 225 queries through
    Index.search, and reproduce the nDCG@10 of a direct exact computation (±0.005)."""
    golden = read_cranfield(CRANFIELD)
    # Two Cranfield records (471, 995) have no text; embedpipe refuses empty documents,
    # so both sides of the comparison use the other 1,398.
    texts = {i: t for i, t in golden.documents.items() if t.strip()}
    settings = make_settings(static_profile_toml(static_model_dir))
    docs = tmp_path / "cran.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))
    report = ingest(settings, "cran", docs, profile=profile)
    assert report.added == report.embedded == len(texts) == 1398

    idx = Index("cran", settings)
    through_index = mean(
        [ndcg_at_k([h.id for h in idx.search(golden.queries[q], k=10)], gains) for q, gains in golden.judgments.items()]
    )

    from sentence_transformers import SentenceTransformer

    from embedpipe.profiles import resolve_weights

    weights = resolve_weights(settings.profile(profile)).path
    model = SentenceTransformer(str(weights), device="cpu")
    ids = list(texts)
    d = model.encode([texts[i] for i in ids], normalize_embeddings=True)
    qids = list(golden.judgments)
    q = model.encode([golden.queries[i] for i in qids], normalize_embeddings=True)
    top = np.argsort(-(q @ d.T), axis=1)[:, :10]
    direct = mean([ndcg_at_k([ids[j] for j in row], golden.judgments[qid]) for qid, row in zip(qids, top)])

    assert through_index == pytest.approx(direct, abs=0.005)
    assert direct == pytest.approx(reference, abs=0.02)  # the dataset README's reference figure


def test_sample_corpus_golden_queries_find_their_documents(settings) -> None:
    """The project's own demo corpus and golden queries, through ingest and Index.search."""
    from conftest import EXAMPLES

    ingest(settings, "demo", EXAMPLES / "corpus" / "docs.jsonl")
    idx = Index("demo", settings)
    queries = [json.loads(line) for line in (EXAMPLES / "queries.jsonl").read_text().splitlines()]
    recalls = [
        recall_at_k([h.id for h in idx.search(q["query"], k=3)], {r: 1.0 for r in q["relevant"]}, k=3)
        for q in queries
    ]
    assert len(queries) >= 10
    assert mean(recalls) >= 0.9  # all 12 measured at 1.0 with local-minilm


def test_read_golden_accepts_lists_grades_and_mappings(tmp_path: Path) -> None:
    from embedpipe.evaluation import read_golden

    path = tmp_path / "golden.jsonl"
    path.write_text(
        '{"query": "wing flutter", "relevant": ["12", "7"], "grades": [3, 1]}\n\n'
        '{"query": "boundary layer", "relevant": ["4"]}\n'
        '{"query": "shock waves", "relevant": {"9": 2, "10": 0}}\n', encoding="utf-8")
    golden = read_golden(path)
    assert [g.query for g in golden] == ["wing flutter", "boundary layer", "shock waves"]
    assert [g.gains for g in golden] == [{"12": 3.0, "7": 1.0}, {"4": 1.0}, {"9": 2.0, "10": 0.0}]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", ":1: not a JSON object"),
        ('{"relevant": ["1"]}', "'query' must be a non-empty string"),
        ('{"query": "q", "relevant": "1"}', "'relevant' must be a list"),
        ('{"query": "q", "relevant": ["1", "2"], "grades": [1]}', "'grades' must be a list as long"),
        ('{"query": "q", "relevant": {"1": "high"}}', "must be a number"),
        ('{"query": "q", "relevant": {"1": 0}}', "no relevant document with a positive grade"),
        ('{"query": "q", "relevant": {"1": 2, "2": -1}}', "must be a number >= 0"),
    ],
)
def test_read_golden_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    from embedpipe.errors import InputError
    from embedpipe.evaluation import read_golden

    path = tmp_path / "golden.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_golden(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_read_golden_missing_or_empty_file(tmp_path: Path) -> None:
    from embedpipe.errors import InputError
    from embedpipe.evaluation import read_golden

    with pytest.raises(InputError, match="does not exist"):
        read_golden(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no queries"):
        read_golden(tmp_path / "empty.jsonl")


def test_first_sentence_and_overlap() -> None:
    from embedpipe.evaluation import first_sentence, overlap_at_k

    text = "Shock waves form ahead of blunt bodies. Their stand-off distance grows with Mach number."
    assert first_sentence(text) == "Shock waves form ahead of blunt bodies."
    assert first_sentence("Dr. Smith wrote it. Then more.") == "Dr. Smith wrote it. Then more."
    assert first_sentence(" ".join(["word"] * 50)) == " ".join(["word"] * 32)
    assert overlap_at_k(list("abcdefghij"), list("abcxyzwvut"), 10) == 0.3
