"""One input image of a corpus, as the listing names it.

Its own module, below both :mod:`retrieval.corpus` (which lists a corpus into these) and
:mod:`retrieval.external_sort` (which sorts them for the listing), so neither imports the other
back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRef:
    """One input image. ``problem`` is set when the listing itself rejects it (duplicate id)."""

    id: str
    uri: str
    problem: str | None = None
