"""The sentence-transformers backend, on the real bundled all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe.backends import build_embedder
from embedpipe.errors import ConfigError, DimensionMismatch, ModelError


def test_documents_are_normalised_with_the_profile_dims(settings) -> None:
    embedder = build_embedder(settings.profile("local-minilm"), device="cpu")
    batch = embedder.embed_documents(["a cat sat on the mat", "stock markets fell"])
    assert batch.vectors.shape == (2, 384) and batch.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)
    assert batch.truncated == 0


def test_query_prompt_applies_to_queries_only(settings) -> None:
    plain = build_embedder(settings.profile("local-minilm"), device="cpu")
    prompted_profile = settings.profile("local-minilm").model_copy(
        update={"name": "prompted", "query_prompt": "Represent this sentence for searching: "}
    )
    prompted = build_embedder(prompted_profile, device="cpu")
    text = "jet engine noise at take-off"
    np.testing.assert_allclose(
        prompted.embed_documents([text]).vectors[0], plain.embed_documents([text]).vectors[0], atol=1e-6
    )
    assert float(prompted.embed_query(text) @ plain.embed_query(text)) < 0.999
    assert prompted.fingerprint != plain.fingerprint


def test_long_texts_are_truncated_and_counted(settings) -> None:
    embedder = build_embedder(settings.profile("local-minilm"), device="cpu")
    long_text = "supersonic flow over a wedge " * 200  # far beyond 256 tokens
    batch = embedder.embed_documents([long_text, "short", long_text + "!"])
    assert batch.truncated == 2
    assert np.isfinite(batch.vectors).all()


def test_dimension_mismatch_is_refused(settings) -> None:
    wrong = settings.profile("local-minilm").model_copy(update={"dims": 512})
    with pytest.raises(DimensionMismatch, match="dims = 512 but the model outputs 384"):
        build_embedder(wrong, device="cpu").embed_documents(["x"])


def test_pooling_mismatch_is_refused(settings) -> None:
    wrong = settings.profile("local-minilm").model_copy(update={"pooling": "cls"})
    with pytest.raises(ModelError, match="pools with 'mean'"):
        build_embedder(wrong, device="cpu").embed_documents(["x"])


def test_asking_for_a_device_this_machine_lacks_is_a_config_error() -> None:
    import torch

    from embedpipe.backends.local import pick_device

    assert pick_device("cpu") == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        pick_device("cuda")


def test_threads_can_share_one_model(settings) -> None:
    """A server answers searches from many threads with one loaded model: a Hugging Face
    fast tokenizer used by two threads at once fails ("Already borrowed") unless the
    embedder takes turns; every answer must also equal the one-thread answer."""
    import threading

    embedders = [build_embedder(settings.profile("local-minilm"), device="cpu") for _ in range(2)]
    texts = [" ".join(["wind tunnel"] * n) for n in (1, 40, 3, 300, 7, 120, 2, 500)]
    expected = [embedders[0].embed_query(t) for t in texts]
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def work(seed: int) -> None:
        try:
            for round_ in range(6):
                i = (seed + round_) % len(texts)
                embedder = embedders[(seed + round_) % 2]  # two embedders, one shared model
                if not np.allclose(embedder.embed_query(texts[i]), expected[i], atol=1e-5):
                    mismatches.append(i)
                embedder.count_tokens([texts[i]])
                embedder.embed_documents([texts[i], texts[(i + 1) % len(texts)]])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert not mismatches
