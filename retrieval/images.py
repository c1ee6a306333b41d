"""Turning untrusted bytes into an RGB pixel array, or a clear reason why not.

Corpora of millions of web images contain everything: zero-byte files, truncated JPEGs, HTML
saved as .jpg, decompression bombs, CMYK scans, 16-bit PNGs, transparent logos, phone photos that
rely on EXIF rotation. Each of those must become either pixels the model can use or an
:class:`ImageError` with a machine-readable ``kind``; never a crash of the worker.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A reduced-DCT JPEG decode keeps at least this many times the target size (1: decode straight to
# the smallest scale that still covers it; measured on oxford-dev, README "Decoding").
JPEG_DRAFT_MARGIN = 1

# Truncated files must fail loudly, not decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodeLimits:
    """Inputs outside these limits are rejected with a reason instead of being decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000  # declared width x height, checked before decoding
    min_side: int = 16


class ImageError(Exception):
    """An input that cannot be turned into pixels. ``kind`` is stable, ``message`` is for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """RGB uint8 pixels (H, W, 3) and the size of the image as stored, after EXIF rotation."""

    pixels: np.ndarray
    width: int
    height: int


def decode_image(
    data: bytes, *, max_side: int | None, limits: DecodeLimits = DecodeLimits()
) -> DecodedImage:
    """Decode ``data`` to RGB, applying EXIF orientation, and shrink it to ``max_side`` pixels.

    The image is only ever shrunk (never enlarged), keeping its aspect ratio, as in the usual
    retrieval protocol. JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    leaves at least ``max_side * JPEG_DRAFT_MARGIN`` pixels on both sides, then resized: about twice
    as fast as a full decode, and the same oxford-dev mAP (README, "Decoding").
    """
    if not data:
        raise ImageError("empty_file", "the file is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_large", f"{len(data)} bytes is over the {limits.max_bytes}-byte limit"
        )
    try:
        with warnings.catch_warnings():
            # Our max_pixels check below is the limit (Pillow warns from 89.5 MP, under the
            # default 100 MP); Pillow's DecompressionBombError (2x that) stays as a ceiling.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            declared_w, declared_h = image.size
            if declared_w * declared_h > limits.max_pixels:
                raise ImageError(
                    "too_large",
                    f"declared size {declared_w}x{declared_h} is over the "
                    f"{limits.max_pixels}-pixel limit",
                )
            if max_side and image.format == "JPEG":
                side = JPEG_DRAFT_MARGIN * max_side
                image.draft("RGB", (side, side))
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageError(kind, f"cannot decode: {exc}") from None

    transposed = False
    try:
        # Orientations 5-8 swap width and height (read before transposing drops the tag).
        transposed = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost us the image
        transposed = False
    width, height = _stored_size(transposed, declared_w, declared_h)
    if min(width, height) < limits.min_side:
        raise ImageError(
            "too_small", f"{width}x{height} is below the {limits.min_side}-pixel minimum side"
        )

    rgb = shrink(to_rgb(image), max_side) if max_side else to_rgb(image)
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), width, height)


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Resize so the longer side is ``max_side`` (bilinear, aspect kept); never enlarges."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def _stored_size(transposed: bool, declared_w: int, declared_h: int) -> tuple[int, int]:
    # ``draft`` may have decoded at a reduced scale; report the full size, rotated like the pixels.
    # (Comparing aspect ratios fails when draft rounding makes a near-square image square.)
    if not transposed:
        return declared_w, declared_h
    return declared_h, declared_w


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a person would expect to see it.

    16/32-bit integer and float images are rescaled to 0-255 (PIL's own conversion clips them);
    transparent images are composited on white (transparent pixels often hold black garbage).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")
