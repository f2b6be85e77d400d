"""Helpers shared by the flows' Prefect artifacts."""

from __future__ import annotations

import re


def slug(name: str) -> str:
    """An artifact key: lowercase letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
