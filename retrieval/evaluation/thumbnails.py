"""Small JPEG thumbnails as ``data:`` URIs, so a report stays one self-contained file.

The same image often appears in several result rows, so thumbnails are cached per
``Thumbnails`` instance (one per report render, not globally, to bound memory).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from retrieval import storage
from retrieval.evaluation.ground_truth import Benchmark
from retrieval.images import DecodeLimits, ImageError, decode_image

THUMBNAIL_PX = 96
LIMITS = DecodeLimits()
JPEG_QUALITY = 80


def thumbnail_data_uri(
    path: Path | str, size: int = THUMBNAIL_PX, limits: DecodeLimits = LIMITS
) -> str | None:
    """A JPEG thumbnail (longer side ``size`` px) of the image at ``path``, as a data URI;
    None when the file is missing, unreadable or outside the decode limits, so that one bad
    image does not stop a report from being written.

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
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Thumbnails:
    """Cached thumbnails of a benchmark's images, by image id."""

    def __init__(self, benchmark: Benchmark, size: int = THUMBNAIL_PX) -> None:
        self._benchmark = benchmark
        self._size = size
        self._cache: dict[str, str | None] = {}

    def get(self, image_id: str) -> str | None:
        """Data URI of the image's thumbnail, or None if it cannot be shown."""
        if image_id not in self._cache:
            uri = None
            if self._benchmark.root is not None and image_id in self._benchmark:
                uri = thumbnail_data_uri(self._benchmark.image_path(image_id), self._size)
            self._cache[image_id] = uri
        return self._cache[image_id]
