"""Small JPEG thumbnails for the HTML pages: embedded as ``data:`` URIs while they fit a byte
budget, so a report of a small benchmark stays one self-contained file; past the budget they
are written next to the page (``thumbnails/<id>.jpg``) and linked, so a page over a benchmark
of 10k+ images never grows without bound.

The same image often appears in several result rows, so thumbnails are cached per
``Thumbnails`` instance (one per page render, not globally, to bound memory).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from retrieval import storage
from retrieval.evaluation.ground_truth import Benchmark
from retrieval.images import DecodeLimits, ImageError, decode_image

THUMBNAIL_PX = 96
JPEG_QUALITY = 80
#: Embedded thumbnail bytes per page (base64 adds a third): ~2 MB is ~600 thumbnails of 96 px.
EMBED_BUDGET_BYTES = 2_000_000
LINK_DIRNAME = "thumbnails"
# The same limits as extraction: a hostile "image" in a report must not allocate gigabytes.
LIMITS = DecodeLimits()


def thumbnail_jpeg(
    path: Path | str, size: int = THUMBNAIL_PX, limits: DecodeLimits = LIMITS
) -> bytes | None:
    """A JPEG thumbnail (longer side ``size`` px) of the image at ``path``; None when the file
    is missing, unreadable or outside the decode limits, so that one bad image does not stop a
    report from being written.

    Decoding goes through :func:`retrieval.images.decode_image`, with the same limits as
    extraction (byte and pixel limits, memory bound, shrink first, EXIF orientation).
    """
    try:
        data = storage.read_bytes(str(path), max_bytes=limits.max_bytes)
        decoded = decode_image(data, max_side=size, limits=limits)
        buffer = io.BytesIO()
        Image.fromarray(decoded.pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    except (ImageError, OSError, ValueError):
        return None
    return buffer.getvalue()


def thumbnail_data_uri(
    path: Path | str, size: int = THUMBNAIL_PX, limits: DecodeLimits = LIMITS
) -> str | None:
    data = thumbnail_jpeg(path, size, limits)
    return None if data is None else _data_uri(data)


def _data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def link_name(image_id: str) -> str:
    """A file name for an image id that is safe in a URL and on any file system."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)[:80]
    if safe != image_id:
        safe += "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return f"{safe}.jpg"


class Thumbnails:
    """Thumbnails of a benchmark's images, by image id: data URIs up to ``budget_bytes`` of
    JPEG data, then (when ``write_file`` is given: relative name, bytes -> None) files under
    ``thumbnails/`` linked by relative URL; without ``write_file``, past the budget an image
    is shown as its id only."""

    def __init__(
        self,
        benchmark: Benchmark,
        size: int = THUMBNAIL_PX,
        *,
        budget_bytes: int = EMBED_BUDGET_BYTES,
        write_file: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self._benchmark = benchmark
        self._size = size
        self._budget = budget_bytes
        self._write_file = write_file
        self._cache: dict[str, str | None] = {}
        self.embedded_bytes = 0
        self.linked = 0

    def get(self, image_id: str) -> str | None:
        """The thumbnail's URI (data: or relative), or None if it cannot be shown."""
        if image_id not in self._cache:
            self._cache[image_id] = self._make(image_id)
        return self._cache[image_id]

    def _make(self, image_id: str) -> str | None:
        if self._benchmark.root is None or image_id not in self._benchmark:
            return None
        data = thumbnail_jpeg(self._benchmark.image_path(image_id), self._size)
        if data is None:
            return None
        if self.embedded_bytes + len(data) <= self._budget:
            self.embedded_bytes += len(data)
            return _data_uri(data)
        if self._write_file is None:
            return None
        name = f"{LINK_DIRNAME}/{link_name(image_id)}"
        self._write_file(name, data)
        self.linked += 1
        return name
