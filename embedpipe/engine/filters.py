"""Filters in embedpipe's own terms, translated by each engine.

Above the storage boundary a filter is a :class:`Where`: conditions on payload paths
(``id``, ``metadata.lang``). ``where_from`` makes one from what callers pass:

* a mapping ``{"lang": "en", "year": [2023, 2024]}`` matches ``metadata.<key>``:
  strings, integers and booleans exactly, a list any of its strings or integers, a
  float that number (a range of one point, since Qdrant has no float equality), a
  :class:`Typed` value the text or what it spells (in JSON, ``{"typed": "2024"}``: what
  a command line's value becomes on its way to ``embedpipe serve``);
* a ``qdrant_client.models.Filter`` made of field matches and ranges (what
  applications wrote before the engine layer), converted condition by condition;
* a :class:`Where` as it is.

Anything else is refused with an ``InputError`` naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from embedpipe.errors import InputError

__all__ = ["Match", "MatchAny", "Range", "Typed", "Where", "where_from"]

Scalar = Union[str, int, bool]


@dataclass(frozen=True)
class Match:
    """The payload value at ``key`` equals ``value`` (or, for a list, holds it)."""

    key: str
    value: Scalar


@dataclass(frozen=True)
class MatchAny:
    """The payload value at ``key`` is one of ``values`` (all strings or all integers)."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A number at ``key`` within the bounds given (None: unbounded)."""

    key: str
    gte: float | None = None
    lte: float | None = None
    gt: float | None = None
    lt: float | None = None


Condition = Union[Match, MatchAny, Range, "Where"]


@dataclass(frozen=True)
class Where:
    """Every ``must`` condition, at least one ``should`` (when any), no ``must_not``."""

    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


class Typed(str):
    """A filter value as typed on a command line, where ``2024`` could mean the number
    (JSONL, Parquet) or the text (every CSV cell is text): it matches metadata stored
    either way. ``true``/``false`` match the booleans and the words, a number matches the
    number and its spelling; anything else matches the text only."""


def where_from(filter: Mapping[str, Any] | Where | Any | None) -> Where | None:
    """The :class:`Where` for what a caller passed as a filter (see the module docstring)."""
    if filter is None or isinstance(filter, Where):
        return filter
    if isinstance(filter, Mapping):
        return Where(must=tuple(_metadata_condition(k, v) for k, v in filter.items()))
    if type(filter).__name__ == "Filter" and type(filter).__module__.startswith("qdrant_client"):
        return _from_qdrant(filter)
    raise InputError(
        f"unsupported filter {type(filter).__name__}; pass a mapping of metadata fields to values"
    )


def _metadata_condition(key: str, value: Any) -> Condition:
    path = f"metadata.{key}"
    if isinstance(value, Typed):
        return _typed(path, value)
    if isinstance(value, Mapping) and list(value) == ["typed"] and isinstance(value["typed"], str):
        return _typed(path, Typed(value["typed"]))
    if isinstance(value, (str, bool, int)):
        return Match(path, value)
    if isinstance(value, float) and value == value:  # not NaN
        return Range(path, gte=value, lte=value)
    if isinstance(value, (list, tuple, set)) and value and (
        all(isinstance(v, str) for v in value)
        or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return MatchAny(path, tuple(value))
    raise InputError(
        f"filter {key}={value!r}: match a string, integer, boolean, number, a "
        'non-empty list of strings or of integers, or {"typed": "text"}'
    )


def _typed(path: str, value: Typed) -> Condition:
    text = Match(path, str(value))
    try:
        parsed = json.loads(value)
    except ValueError:
        return text
    if isinstance(parsed, bool) or isinstance(parsed, int):
        return Where(should=(text, Match(path, parsed)))
    if isinstance(parsed, float) and parsed == parsed:
        return Where(should=(text, Range(path, gte=parsed, lte=parsed)))
    return text


def _from_qdrant(flt: Any) -> Where:
    """A qdrant_client ``models.Filter`` of field matches, ranges and nested filters."""
    def convert(conditions: Any) -> tuple[Condition, ...]:
        if conditions is None:
            return ()
        items = conditions if isinstance(conditions, list) else [conditions]
        return tuple(_qdrant_condition(c) for c in items)

    return Where(must=convert(flt.must), should=convert(flt.should), must_not=convert(flt.must_not))


def _qdrant_condition(cond: Any) -> Condition:
    kind = type(cond).__name__
    if kind == "Filter":
        return _from_qdrant(cond)
    if kind == "FieldCondition":
        match, rng = cond.match, cond.range
        if match is not None and type(match).__name__ == "MatchValue":
            return Match(cond.key, match.value)
        if match is not None and type(match).__name__ == "MatchAny":
            return MatchAny(cond.key, tuple(match.any))
        if match is None and rng is not None and type(rng).__name__ == "Range":
            return Range(cond.key, gte=rng.gte, lte=rng.lte, gt=rng.gt, lt=rng.lt)
    raise InputError(
        f"filter condition {kind} is not supported by embedpipe's engines; use field "
        "matches (MatchValue, MatchAny), ranges and nested filters"
    )
