"""Local open-weight models through sentence-transformers, on GPU when present.

The model is loaded on first use. On CUDA it runs in fp16. Texts longer than the
model's input limit are truncated by the model and counted, so the ingest report
can say how many documents were cut.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.backends.base import EmbedBatch
from embedpipe.errors import ConfigError, DimensionMismatch, ModelError
from embedpipe.profiles import Profile, fingerprint, resolve_weights

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["LocalEmbedder", "pick_device"]

log = logging.getLogger(__name__)

# Loaded models shared within a process (an app that ingests and searches loads once).
_MODELS: dict[tuple[str, str, int | None], SentenceTransformer] = {}
# One caller at a time per model: a Hugging Face fast tokenizer is not thread-safe (two
# threads encoding at once fail with "RuntimeError: Already borrowed" as one of them
# resets its truncation), and on a CPU one encode already uses every core.
_IN_USE: dict[tuple[str, str, int | None], threading.RLock] = {}
_LOADING = threading.Lock()


def pick_device(requested: str = "auto") -> str:
    """``cuda`` when a GPU is present, then Apple ``mps``, else ``cpu``; or what was asked.

    Asking for a device this machine lacks is a ``ConfigError``, not a torch traceback.
    """
    import torch

    mps = getattr(torch.backends, "mps", None)
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": mps is not None and mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(requested, False):
        raise ConfigError(
            f"device {requested!r} is not available on this machine; set device = \"auto\" "
            "(or EMBEDPIPE_DEVICE=auto) to use the best one present"
        )
    return requested


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports while loading; they are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


class LocalEmbedder:
    """A sentence-transformers model described by a local profile."""

    def __init__(self, profile: Profile, device: str = "auto") -> None:
        if not profile.is_local:
            raise ModelError(f"profile {profile.name!r} is not a local model")
        self.profile = profile
        self._requested_device = device

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.profile)

    @property
    def concurrency(self) -> int:
        return 1  # one model, already parallel inside; callers feed it large windows

    @cached_property
    def device(self) -> str:
        return pick_device(self._requested_device)

    @cached_property
    def model(self) -> SentenceTransformer:
        location = resolve_weights(self.profile)
        key = (str(location.path), self.device, self.profile.max_tokens)
        with _LOADING:  # threads asking at once load it once
            model = _MODELS.get(key) or self._load(key, location.path)
        self._in_use = _IN_USE[key]
        self._check_against_profile(model)
        return model

    def _load(self, key: tuple[str, str, int | None], path: Path) -> SentenceTransformer:
        # The weights are on disk; never let a missing file turn into a hub download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        log.info("loading %s from %s on %s", self.profile.name, path, self.device)
        try:
            with _quiet_transformers():
                model = SentenceTransformer(str(path), device=self.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"cannot load weights for profile {self.profile.name!r} from {path}: {exc}"
            ) from exc
        if self.device == "cuda":
            model.half()
        limit = self.profile.max_tokens
        if limit and _finite(model.max_seq_length) > limit:
            model.max_seq_length = limit
        _MODELS[key] = model
        _IN_USE[key] = threading.RLock()
        return model

    @contextlib.contextmanager
    def _using(self) -> Iterator[SentenceTransformer]:
        """The model, for this thread alone while the block runs."""
        model = self.model
        with self._in_use:
            yield model

    def check(self) -> None:
        """Load the model and check it against the profile (dims, pooling)."""
        self.model  # noqa: B018 - loading is the check

    @property
    def max_tokens(self) -> int | None:
        """The input limit in tokens (None for models without one, e.g. static embeddings)."""
        limit = _finite(self.model.max_seq_length)
        return None if math.isinf(limit) else int(limit)

    def _check_against_profile(self, model: SentenceTransformer) -> None:
        dims = _output_dims(model)
        if dims != self.profile.dims:
            raise DimensionMismatch(
                f"profile {self.profile.name!r} says dims = {self.profile.dims} but the model "
                f"outputs {dims}; fix dims under [profiles.{self.profile.name}]"
            )
        pooling = _pooling_mode(model)
        if self.profile.pooling and pooling and pooling != self.profile.pooling:
            raise ModelError(
                f"profile {self.profile.name!r} says pooling = {self.profile.pooling!r} but the "
                f"model pools with {pooling!r}; fix pooling under [profiles.{self.profile.name}]"
            )

    def embed_documents(self, texts: Sequence[str]) -> EmbedBatch:
        """Embed documents, returning float32 vectors in input order and a truncation count."""
        texts = list(texts)
        if not texts:
            return EmbedBatch(np.zeros((0, self.profile.dims), dtype=np.float32), 0)
        prompt = self.profile.document_prompt
        vectors = self._encode(texts, prompt)
        truncated, tokens = self._count(texts, prompt)
        return EmbedBatch(vectors, truncated, tokens=tokens)

    def _count(self, texts: list[str], prompt: str) -> tuple[int, int | None]:
        """(texts cut at the limit, tokens the model saw). A transformer's encode costs far
        more than tokenizing, so its tokens are counted; a static model's (no limit, and
        tokenizing is most of its work) are not."""
        tokenizer = getattr(self.model, "tokenizer", None)
        limit = self.max_tokens
        if limit is None or tokenizer is None:
            return 0, None
        with self._using():
            lengths = [len(ids) for ids in _token_ids(tokenizer, [prompt + t for t in texts])]
        return sum(1 for n in lengths if n > limit), sum(min(n, limit) for n in lengths)

    def embed_query(self, text: str) -> np.ndarray:
        """Embed one query with the profile's query prompt; a 1-D float32 vector."""
        return self._encode([text], self.profile.query_prompt)[0]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed many queries in one call (evaluation, validation): rows in input order."""
        if not texts:
            return np.zeros((0, self.profile.dims), dtype=np.float32)
        return self._encode(list(texts), self.profile.query_prompt)

    def _encode(self, texts: list[str], prompt: str) -> np.ndarray:
        # encode() sorts its input by length before batching, so handing it a large
        # window keeps padding (wasted work) low; see the measured facts in
        # docs/architecture.md.
        kwargs: dict[str, Any] = {
            "batch_size": self.profile.batch_size,
            "normalize_embeddings": self.profile.normalize,
            "convert_to_numpy": True,
            "show_progress_bar": False,
        }
        if prompt:
            kwargs["prompt"] = prompt
        with self._using() as model:
            vectors = model.encode(texts, **kwargs)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each document (with the document prompt) by the model's own tokenizer,
        before truncation; 0s for a model without a tokenizer."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not texts:
            return [0] * len(texts)
        prompt = self.profile.document_prompt
        with self._using():
            return [len(ids) for ids in _token_ids(tokenizer, [prompt + t for t in texts])]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of the model tokenizer's tokens (words for a model without one)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            return [m.span() for m in re.finditer(r"\S+", text)]
        with self._using():
            if hasattr(tokenizer, "encode_batch"):  # a bare `tokenizers.Tokenizer` (static models)
                return [tuple(o) for o in tokenizer.encode(text, add_special_tokens=False).offsets]
            with _quiet_transformers():
                enc = tokenizer(text, add_special_tokens=False, truncation=False,
                                return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # a bare `tokenizers.Tokenizer` (static models)
        return [enc.ids for enc in tokenizer.encode_batch(texts)]
    with _quiet_transformers():
        return list(tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"])


def _finite(value: Any) -> float:
    return float("inf") if value is None else float(value)


def _output_dims(model: SentenceTransformer) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or getattr(
        model, "get_sentence_embedding_dimension"
    )
    dims = getter()
    if dims is None:  # some modules do not declare it: measure
        dims = int(model.encode(["dimension probe"], convert_to_numpy=True).shape[1])
    return int(dims)


def _pooling_mode(model: SentenceTransformer) -> str | None:
    for module in model:
        mode = getattr(module, "pooling_mode", None)
        if isinstance(mode, str):
            return mode
    return None
