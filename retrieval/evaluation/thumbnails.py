"""Small JPEG thumbnails as ``data:`` URIs, so a report stays one self-contained file.

The same image often appears in several result rows, so thumbnails are cached per
``Thumbnails`` instance (one per report render, not globally, to bound memory).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.evaluation.ground_truth import Benchmark

THUMBNAIL_PX = 96
JPEG_QUALITY = 80


def thumbnail_data_uri(path: Path, size: int = THUMBNAIL_PX) -> str | None:
    """A JPEG thumbnail (longer side ``size`` px) of the image at ``path``, as a data URI;
    None when the file is missing or unreadable, so that one bad image does not stop a
    report from being written."""
    try:
        with Image.open(path) as image:
            # Let the JPEG decoder downscale while decoding: much faster on 1024 px photos.
            image.draft("RGB", (size * 2, size * 2))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    except (OSError, UnidentifiedImageError, ValueError):
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
