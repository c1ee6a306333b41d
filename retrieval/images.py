"""Turning untrusted bytes into an RGB pixel array, or a clear reason why not.

Corpora of millions of web images contain everything: zero-byte files, truncated JPEGs, HTML
saved as .jpg, decompression bombs, CMYK scans, 16-bit PNGs, transparent logos, phone photos that
rely on EXIF rotation. Each of those must become either pixels the model can use or an
:class:`ImageError` with a machine-readable ``kind``; never a crash of the worker.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger(__name__)

# A reduced-DCT JPEG decode keeps at least this many times the target size (1: decode straight to
# the smallest scale that still covers it; measured on oxford-dev, README "Decoding").
JPEG_DRAFT_MARGIN = 1

# Truncated files must fail loudly, not decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Bytes per pixel of the decoded image, by PIL mode (what decoding it costs in memory).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3}
_BYTES_PER_PIXEL |= {"LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "CMYK": 4, "I": 4, "F": 4}
_BYTES_PER_PIXEL |= {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_EXIF_ORIENTATION = 0x0112
# Leading bytes of the formats we list, to tell a damaged image from something else.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class DecodeLimits:
    """Inputs outside these limits are rejected with a reason instead of being decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000  # declared width x height, checked before decoding
    min_side: int = 16
    # Memory the decoded pixels may take (after JPEG draft scaling), checked before decoding.
    max_decoded_bytes: int = 512 * 1024 * 1024
    # A progressive (or multi-scan) JPEG is decoded from a buffer of all its DCT coefficients at
    # full size, 2 bytes per pixel and component whatever the draft scale: libjpeg needs every
    # scan before any pixel. Checked before decoding; 128 MiB takes a 44 MP 4:2:0 photo.
    max_jpeg_buffer_bytes: int = 128 * 1024 * 1024


class ImageError(Exception):
    """An input that cannot be turned into pixels. ``kind`` is stable, ``message`` is for people."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """RGB uint8 pixels (H, W, 3) and the size of the image as stored, after EXIF rotation.

    ``notes`` says what was odd but not fatal (an unreadable EXIF block: orientation ignored).
    """

    pixels: np.ndarray
    width: int
    height: int
    notes: tuple[str, ...] = field(default=())
    # Smaller copies by longer side, each resized once from the decoded image (``also_sides``).
    copies: dict[int, np.ndarray] = field(default_factory=dict)

    def at_side(self, side: int) -> np.ndarray:
        """The pixels with the longer side at most ``side`` (never enlarged): the copy decoding
        made for that side if there is one, else these pixels shrunk."""
        if side in self.copies:
            return self.copies[side]
        if max(self.pixels.shape[:2]) <= side:
            return self.pixels
        return np.asarray(shrink(Image.fromarray(self.pixels), side))


def decode_image(
    data: bytes,
    *,
    max_side: int | None,
    limits: DecodeLimits = DecodeLimits(),
    also_sides: Iterable[int] = (),
) -> DecodedImage:
    """Decode ``data`` to RGB, applying EXIF orientation, and shrink it to ``max_side`` pixels.

    ``also_sides``: smaller longer sides another model wants (GeM's 362 px beside the local
    features' 448 px); each gets its own copy in ``copies``, resized from the decoded image
    rather than from the ``max_side`` copy, so no model sees an image resampled twice.

    The image is only ever shrunk (never enlarged), keeping its aspect ratio, as in the usual
    retrieval protocol. JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    leaves at least ``max_side * JPEG_DRAFT_MARGIN`` pixels on both sides, then resized: about twice
    as fast as a full decode, with no loss of oxford-dev mAP (README, "Decoding").
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
            if image.format == "JPEG":
                buffer_bytes = jpeg_coefficient_buffer_bytes(data)
                if buffer_bytes > limits.max_jpeg_buffer_bytes:
                    raise ImageError(
                        "too_large",
                        f"progressive JPEG {declared_w}x{declared_h}: decoding it needs a "
                        f"{buffer_bytes}-byte coefficient buffer, over the "
                        f"{limits.max_jpeg_buffer_bytes}-byte limit",
                    )
            if max_side and image.format == "JPEG":
                side = JPEG_DRAFT_MARGIN * max_side
                image.draft("RGB", (side, side))
            decoded_bytes = image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 4)
            if decoded_bytes > limits.max_decoded_bytes:
                raise ImageError(
                    "too_large",
                    f"decoding {declared_w}x{declared_h} ({image.mode}) needs "
                    f"{decoded_bytes} bytes, over the {limits.max_decoded_bytes}-byte limit",
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        known = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        if known:  # the right magic bytes, but not even the header parses: cut short
            raise ImageError(
                "truncated", f"starts like a {known} but its header cannot be read"
            ) from None
        raise ImageError("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageError(kind, f"cannot decode: {exc}") from None

    notes: list[str] = []
    broken = exif_problem(image.info.get("exif"))
    if broken:  # Pillow only warns (or says nothing) and reads what it can
        notes.append(f"broken EXIF block ({broken})")
    orientation = 1
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception as exc:  # a broken EXIF block costs the orientation, not the image
        notes.append(f"unreadable EXIF ({type(exc).__name__}); orientation ignored")
    if orientation not in (1, *_TRANSPOSE):
        notes.append(f"invalid EXIF orientation {orientation}; ignored")
        orientation = 1
    transposed = orientation in (5, 6, 7, 8)  # these swap width and height
    width, height = _stored_size(transposed, declared_w, declared_h)
    if min(width, height) < limits.min_side:
        raise ImageError(
            "too_small", f"{width}x{height} is below the {limits.min_side}-pixel minimum side"
        )
    if notes:
        log.warning("image decoded with notes: %s", "; ".join(notes))

    # Shrink first (cheap integer box reduction), then convert and rotate the small image.
    image = reduce_early(image, max_side)
    rgb = to_rgb(image)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    copies = {
        side: np.asarray(shrink(rgb, side), dtype=np.uint8)
        for side in sorted(set(also_sides))
        if max_side and side < max_side
    }
    rgb = shrink(rgb, max_side) if max_side else rgb
    return DecodedImage(np.asarray(rgb, dtype=np.uint8), width, height, tuple(notes), copies)


# Start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC) and the progressive ones among them.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Markers without a length field.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, _JPEG_EOI})


def jpeg_coefficient_buffer_bytes(data: bytes) -> int:
    """Bytes of the whole-image DCT coefficient buffer that libjpeg allocates to decode this
    JPEG, or 0 when it decodes row by row (a baseline JPEG whose first scan holds every
    component). Read from the headers up to the first scan, before anything is decoded.

    A progressive JPEG (or one whose components come in separate scans) cannot be decoded
    until its last scan arrives, so libjpeg keeps every 8x8 block of every component at full
    resolution (2-byte coefficients: 128 bytes a block), and ``draft`` scaling does not shrink
    it. Measured: a 6000x6000 4:4:4 progressive JPEG adds ~210 MB to the decoding process
    at any draft scale, a baseline one ~6 MB.
    """
    frame: tuple[int, int, list[tuple[int, int]]] | None = None
    progressive = False
    at = 2 if data.startswith(b"\xff\xd8") else len(data)
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return 0  # not where a marker should be: leave it to the decoder
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            if marker == _JPEG_EOI:
                return 0
            at += 2
            continue
        (length,) = struct.unpack_from(">H", data, at + 2)
        segment = data[at + 4 : at + 2 + length]
        if marker in _JPEG_SOF and frame is None and len(segment) >= 6:
            progressive = marker in _JPEG_PROGRESSIVE_SOF
            height, width = struct.unpack_from(">HH", segment, 1)
            count = segment[5]
            sampling = [
                (segment[6 + 3 * i + 1] >> 4, segment[6 + 3 * i + 1] & 0x0F)
                for i in range(count)
                if 6 + 3 * i + 2 < len(segment)
            ]
            frame = (width, height, sampling)
        elif marker == _JPEG_SOS:
            if frame is None or not segment:
                return 0
            width, height, sampling = frame
            if not sampling or not (progressive or segment[0] < len(sampling)):
                return 0
            return _coefficient_bytes(width, height, sampling)
        at += 2 + length
    return 0


def _coefficient_bytes(width: int, height: int, sampling: list[tuple[int, int]]) -> int:
    """libjpeg's whole-image coefficient buffer (jdcoefct.c): per component, its blocks (its
    sampled size in 8x8 blocks, rounded up to whole MCUs) x 64 coefficients x 2 bytes."""
    max_h = max(max(h for h, _ in sampling), 1)
    max_v = max(max(v for _, v in sampling), 1)
    total = 0
    for h, v in sampling:
        h, v = max(h, 1), max(v, 1)
        columns = -(-width * h // (8 * max_h))
        rows = -(-height * v // (8 * max_v))
        total += (-(-columns // h) * h) * (-(-rows // v) * v)
    return total * 64 * 2


# Bytes per value of each TIFF field type (an unknown type is skipped, as readers do).
_TIFF_TYPE_BYTES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}


def exif_problem(raw: bytes | None) -> str | None:
    """What is structurally wrong with an EXIF block (a TIFF header and its first directory,
    where the orientation lives), or None when it is absent or sound.

    Pillow reads a broken block without raising: it warns ("Corrupt EXIF data") or quietly
    returns fewer tags, so the orientation may be lost without a trace. This check is
    deterministic and thread-safe (no global warning filters), so the image's row can say so.
    """
    if not raw:
        return None
    data = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    if len(data) < 8:
        return f"{len(data)}-byte TIFF header"
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(bytes(data[:4]))
    if order is None:
        return "no TIFF byte-order mark"
    (offset,) = struct.unpack_from(f"{order}I", data, 4)
    if not 8 <= offset <= len(data) - 2:
        return f"first directory at byte {offset}, outside the {len(data)}-byte block"
    (count,) = struct.unpack_from(f"{order}H", data, offset)
    if offset + 2 + 12 * count > len(data):
        return f"{count} directory entries run past the end of the block"
    for entry in range(count):
        tag, field_type, values, where = struct.unpack_from(
            f"{order}HHII", data, offset + 2 + 12 * entry
        )
        size = _TIFF_TYPE_BYTES.get(field_type, 0) * values
        if size > 4 and where + size > len(data):  # stored elsewhere: it must be inside
            return f"tag 0x{tag:04x} points outside the block"
    return None


def reduce_early(image: Image.Image, max_side: int | None) -> Image.Image:
    """Box-reduce by an integer factor while the longer side stays >= 2 x ``max_side``.

    Colour conversion, rotation and the final resize then work on the small image: a 100 MP
    PNG no longer becomes several full-size copies. (JPEGs are already reduced by ``draft``.)
    """
    if not max_side or image.format == "JPEG":  # JPEGs were already scaled by draft()
        return image
    factor = max(image.size) // (2 * max_side)
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = _sixteen_to_eight_bit(image)
    elif image.mode in ("1", "P", "PA"):
        return image  # palette indices cannot be averaged; to_rgb converts them first
    return image.reduce(factor)


def _sixteen_to_eight_bit(image: Image.Image, rows_per_block: int = 256) -> Image.Image:
    """16-bit grayscale -> 8-bit (0..65535 -> 0..255, rounded), a strip of rows at a time, so
    the extra memory is the 8-bit result plus one strip, not a float64 copy of the image."""
    order = ">" if image.mode == "I;16B" else "<" if image.mode != "I;16N" else "="
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, rows_per_block):
        bottom = min(height, top + rows_per_block)
        strip = image.crop((0, top, width, bottom)).tobytes()
        values = np.frombuffer(strip, dtype=f"{order}u2").astype(np.uint32)
        out[top:bottom] = ((values * 255 + 32767) // 65535).reshape(bottom - top, width)
    return Image.fromarray(out, mode="L")


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
    if image.mode.startswith("I;16"):
        return _sixteen_to_eight_bit(image).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)  # reduced first: small
        top = max(float(values.max()), 1.0)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")
