"""decode_image on the odd files real corpora contain, and the reasons it gives for refusing."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from retrieval.images import DecodeLimits, ImageError, decode_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    sink = io.BytesIO()
    image.save(sink, fmt, **kwargs)
    return sink.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose valid IHDR declares ``width`` x ``height`` RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def blocks(width: int, height: int) -> np.ndarray:
    """An image of four flat quadrants (survives JPEG), top-left red, top-right green,
    bottom-left blue, bottom-right white."""
    pixels = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w] = (255, 0, 0)
    pixels[:h, w:] = (0, 255, 0)
    pixels[h:, :w] = (0, 0, 255)
    pixels[h:, w:] = (255, 255, 255)
    return pixels


def test_rgb_jpeg_and_png():
    pixels = blocks(64, 48)
    for data in (
        encode(Image.fromarray(pixels), "PNG"),
        encode(Image.fromarray(pixels), "JPEG", quality=95),
    ):
        out = decode_image(data, max_side=None)
        assert (out.width, out.height) == (64, 48)
        assert out.pixels.shape == (48, 64, 3) and out.pixels.dtype == np.uint8
        np.testing.assert_allclose(out.pixels[10, 10], (255, 0, 0), atol=12)
        np.testing.assert_allclose(out.pixels[40, 50], (255, 255, 255), atol=12)


def test_cmyk_jpeg():
    image = Image.new("CMYK", (40, 32), (0, 255, 255, 0))  # full magenta + yellow = red
    out = decode_image(encode(image, "JPEG", quality=95), max_side=None)
    assert out.pixels.shape == (32, 40, 3)
    np.testing.assert_allclose(out.pixels[16, 20], (255, 0, 0), atol=8)


def test_16bit_grayscale_png_is_rescaled_not_clipped():
    values = (np.arange(32 * 40).reshape(32, 40) * 40).astype(np.uint16)  # 0 .. 51160
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = decode_image(encode(image, "PNG"), max_side=None)
    expected = np.round(values / 65535.0 * 255.0).astype(np.uint8)
    assert out.pixels.shape == (32, 40, 3)
    np.testing.assert_array_equal(out.pixels[..., 0], out.pixels[..., 1])
    assert np.abs(out.pixels[..., 0].astype(int) - expected).max() <= 1
    # Clipping would have saturated everything above 255 (all but the first few pixels).
    assert out.pixels.max() == 199 and (out.pixels[..., 0] == 255).sum() == 0
    assert len(np.unique(out.pixels[..., 0])) > 150


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((20, 30, 4), np.uint8)  # transparent black: the usual garbage
    rgba[:, 15:] = (255, 0, 0, 255)  # right half opaque red
    rgba[:10, 15:, 3] = 128  # top-right half-transparent red
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_side=None).pixels
    np.testing.assert_array_equal(out[5, 5], (255, 255, 255))
    np.testing.assert_array_equal(out[15, 20], (255, 0, 0))
    np.testing.assert_allclose(out[5, 20], (255, 127, 127), atol=1)


def test_palette_png_with_transparency():
    image = Image.new("P", (30, 20), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0 black, 1 blue
    image.paste(1, (15, 0, 30, 20))
    data = encode(image, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, max_side=None).pixels
    np.testing.assert_array_equal(out[10, 5], (255, 255, 255))  # transparent black -> white
    np.testing.assert_array_equal(out[10, 25], (0, 0, 255))


def test_grayscale_and_la():
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))
    out = decode_image(encode(Image.fromarray(gray, "L"), "PNG"), max_side=None).pixels
    assert out.shape == (20, 25, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)
    la = Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), "LA")
    out = decode_image(encode(la, "PNG"), max_side=None).pixels
    assert (out == 255).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates(fmt):
    pixels = blocks(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    options = {"quality": 95} if fmt == "JPEG" else {}
    data = encode(Image.fromarray(pixels), fmt, exif=exif, **options)
    out = decode_image(data, max_side=None)
    assert (out.width, out.height) == (32, 64)
    assert out.pixels.shape == (64, 32, 3)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored, unrotated
    np.testing.assert_array_equal(out.pixels, np.rot90(stored, k=-1))  # rotated clockwise
    # Top-left of the displayed image is the original bottom-left (blue).
    np.testing.assert_allclose(out.pixels[5, 5], (0, 0, 255), atol=12)


def test_exif_rotation_of_near_square_jpeg_decoded_at_reduced_scale():
    # 1000x999 decoded with draft at 1/4 becomes 250x250: the size must still come out rotated.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (1000, 999), "red"), "JPEG", exif=exif)
    out = decode_image(data, max_side=100)
    assert (out.width, out.height) == (999, 1000)
    assert max(out.pixels.shape[:2]) == 100


def test_max_side_shrinks_keeping_aspect_and_never_enlarges():
    image = Image.fromarray(blocks(400, 200))
    for fmt in ("PNG", "JPEG"):
        out = decode_image(encode(image, fmt), max_side=100)
        assert (out.width, out.height) == (400, 200)  # stored size, not the decoded size
        assert out.pixels.shape == (50, 100, 3)
    small = decode_image(encode(Image.fromarray(blocks(60, 30)), "PNG"), max_side=100)
    assert small.pixels.shape == (30, 60, 3)
    tall = decode_image(encode(Image.fromarray(blocks(90, 300)), "PNG"), max_side=100)
    assert tall.pixels.shape == (100, 30, 3)


def test_large_jpeg_draft_decoding_reports_full_size():
    data = encode(Image.fromarray(blocks(1600, 1200)), "JPEG", quality=90)
    out = decode_image(data, max_side=200)
    assert (out.width, out.height) == (1600, 1200)
    assert out.pixels.shape == (150, 200, 3)
    np.testing.assert_allclose(out.pixels[30, 30], (255, 0, 0), atol=12)


def expect_error(data: bytes, kind: str, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_side=kwargs.pop("max_side", 362), **kwargs)
    assert info.value.kind == kind, info.value.message
    assert info.value.message
    return info.value


def test_empty_file():
    expect_error(b"", "empty_file")


def test_truncated_jpeg():
    data = encode(Image.fromarray(blocks(256, 192) // 2 + 60), "JPEG", quality=90)
    expect_error(data[: len(data) // 2], "truncated")
    expect_error(data[: len(data) // 2], "truncated", max_side=None)


def test_text_is_not_an_image():
    expect_error(b"<html><body>404 Not Found</body></html>\n", "not_an_image")


def test_tiny_image():
    expect_error(encode(Image.new("RGB", (1, 1), "red"), "PNG"), "too_small")
    expect_error(encode(Image.new("RGB", (200, 15), "red"), "PNG"), "too_small")


def test_over_byte_limit():
    data = encode(Image.new("RGB", (64, 64), "red"), "PNG")
    expect_error(data, "too_large", limits=DecodeLimits(max_bytes=len(data) - 1))


def test_huge_declared_size_is_refused_without_decoding():
    data = png_declaring(100_000, 100_000)
    assert len(data) < 200
    tracemalloc.start()
    try:
        error = expect_error(data, "too_large")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "100000" in error.message
    assert peak < 5_000_000  # the pixels would be 30 GB


def test_declared_size_over_configured_limit():
    data = encode(Image.new("RGB", (200, 100), "red"), "PNG")
    error = expect_error(data, "too_large", limits=DecodeLimits(max_pixels=19_999))
    assert "200x100" in error.message
    decode_image(data, max_side=None, limits=DecodeLimits(max_pixels=20_000))


def test_configured_pixel_limit_applies_below_pillows_own():
    # 95 MP is over Pillow's warning threshold (89.5 MP) but under the default 100 MP limit:
    # the configured limit decides, with its own message (checked before any pixel is decoded).
    data = png_declaring(10_000, 9_500)
    error = expect_error(data, "too_large", limits=DecodeLimits(max_pixels=94_999_999))
    assert "declared size 10000x9500" in error.message
