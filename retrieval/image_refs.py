"""One input image of a corpus, as the listing names it.

Its own module, below both :mod:`retrieval.corpus` (which lists a corpus into these) and
:mod:`retrieval.external_sort` (which sorts them for the listing), so neither imports the other
back.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.redaction import seal_if_secret, unseal


@dataclass(frozen=True)
class ImageRef:
    """One input image. ``problem`` is set when the listing itself rejects it (duplicate id).

    ``uri`` is the URI as recorded (plan, shards, results): secrets masked. When masking changed
    it (a signed URL), ``sealed`` holds the real URI, sealed with the run's key (see
    ``retrieval.redaction``), and :attr:`location` opens it for the one read that needs it.
    """

    id: str
    uri: str
    problem: str | None = None
    sealed: str | None = None

    @property
    def location(self) -> str:
        """Where the image is read from (the real URI; only in memory, never recorded)."""
        return unseal(self.sealed) if self.sealed else self.uri


def listed_ref(image_id: str, uri: str, problem: str | None = None) -> ImageRef:
    """The reference the listing records for the input at ``uri``: its URI with secrets masked,
    the real one sealed when they differ (only for an input that will be read)."""
    recorded, sealed = seal_if_secret(uri)
    return ImageRef(image_id, recorded, problem, sealed if problem is None else None)
