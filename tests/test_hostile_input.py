"""Hostile input: every file is processed or becomes an error row with a clear reason.

Completes ``test_images.py`` (decoder cases) with the rest of the list: header-only JPEG, random
bytes, extreme aspect ratio, animated GIF, WebP, TIFF, broken EXIF, memory-bounded decoding of
large 16-bit images, EXIF orientations giving the upright image's descriptor, and a corpus run
with unicode names, spaces, the same bytes under two names and a manifest entry pointing at a
missing object.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from pipelines import stages
from pipelines.config import RunConfig
from retrieval.descriptors.gem import GeMConfig
from retrieval.evaluation.thumbnails import thumbnail_data_uri
from retrieval.images import DecodeLimits, ImageError, decode_image
from retrieval.shards import descriptor_shards


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    sink = io.BytesIO()
    image.save(sink, fmt, **options)
    return sink.getvalue()


def pattern(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric picture (so rotations and flips change it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.02, 0.08, 2)
    r = 127 + 120 * np.sin(a * x + 0.3 * b * y)
    g = 127 + 120 * np.cos(b * y)
    blue = 255 * x / w
    return np.stack([r, g, blue], axis=-1).clip(0, 255).astype(np.uint8)


def test_header_only_jpeg_is_truncated():
    data = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    header_end = data.index(b"\xff\xda")  # start of scan: everything before is header
    with pytest.raises(ImageError) as info:
        decode_image(data[: header_end + 2], max_side=64)
    assert info.value.kind == "truncated"
    assert "JPEG" in info.value.message


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError) as info:
        decode_image(data, max_side=64)
    assert info.value.kind == "not_an_image"


def test_corrupt_png_body():
    data = bytearray(encode(Image.fromarray(pattern(64, 48)), "PNG"))
    data[60:80] = b"\x00" * 20  # inside IDAT: the CRC no longer matches
    with pytest.raises(ImageError) as info:
        decode_image(bytes(data), max_side=64)
    assert info.value.kind in ("corrupt", "truncated")


def test_extreme_aspect_ratio():
    out = decode_image(encode(Image.new("RGB", (4000, 20), "blue"), "PNG"), max_side=400)
    assert out.pixels.shape == (2, 400, 3) or out.pixels.shape[1] == 400
    assert (out.width, out.height) == (4000, 20)
    with pytest.raises(ImageError) as info:  # too thin to describe
        decode_image(encode(Image.new("RGB", (4000, 4), "blue"), "PNG"), max_side=400)
    assert info.value.kind == "too_small"


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("WEBP", {"quality": 90}),
        ("TIFF", {}),
        ("GIF", {}),
        ("BMP", {}),
    ],
)
def test_other_formats(fmt, options):
    pixels = pattern(80, 60)
    out = decode_image(encode(Image.fromarray(pixels), fmt, **options), max_side=80)
    assert out.pixels.shape == (60, 80, 3) and out.pixels.dtype == np.uint8
    if fmt in ("TIFF", "BMP"):
        np.testing.assert_array_equal(out.pixels, pixels)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (48, 32), c) for c in ("red", "green", "blue")]
    sink = io.BytesIO()
    frames[0].save(sink, "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decode_image(sink.getvalue(), max_side=48)
    assert out.pixels.shape == (32, 48, 3)
    assert tuple(out.pixels[10, 10]) == (255, 0, 0)


def test_broken_exif_is_noted_not_fatal():
    exif = Image.Exif()
    exif[0x0112] = 42  # no such orientation
    data = encode(Image.fromarray(pattern(64, 48)), "JPEG", exif=exif)
    out = decode_image(data, max_side=64)
    assert out.pixels.shape == (48, 64, 3)
    assert out.notes and "orientation" in out.notes[0]
    clean = decode_image(encode(Image.fromarray(pattern(64, 48)), "JPEG"), max_side=64)
    assert clean.notes == ()


def broken_exif_jpeg(tiff: bytes) -> bytes:
    """A JPEG whose APP1 EXIF segment holds ``tiff`` (a damaged TIFF structure)."""
    return encode(Image.fromarray(pattern(64, 48)), "JPEG", exif=b"Exif\x00\x00" + tiff)


BROKEN_EXIF = {
    "no byte-order mark": b"XX*\x00\x08\x00\x00\x00",
    "directory outside": b"II*\x00\x00\xff\xff\x0f",
    "entries past the end": b"II*\x00\x08\x00\x00\x00\xf4\x01" + b"\x12\x01\x03\x00" * 3,
    "cut in an entry": b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12",
    "value outside": b"II*\x00\x08\x00\x00\x00\x01\x00\x0f\x01\x02\x00\x40\x00\x00\x00"
    + b"\x00\x10\x00\x00",
}


@pytest.mark.parametrize("damage", sorted(BROKEN_EXIF))
def test_corrupt_exif_block_is_noted(damage):
    """Pillow reads these without raising (a warning at most): the decoder must still say so."""
    out = decode_image(broken_exif_jpeg(BROKEN_EXIF[damage]), max_side=64)
    assert out.pixels.shape == (48, 64, 3)
    assert len(out.notes) == 1 and out.notes[0].startswith("broken EXIF block ("), out.notes


def test_sound_exif_has_no_notes():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "a maker name longer than four bytes"  # stored at an offset in the block
    out = decode_image(encode(Image.fromarray(pattern(64, 48)), "JPEG", exif=exif), max_side=64)
    assert out.notes == () and out.pixels.shape == (64, 48, 3)


def test_large_16bit_png_is_decoded_in_bounded_memory():
    values = (np.arange(3000 * 4000, dtype=np.uint32) % 65536).astype(np.uint16)
    data = encode(Image.fromarray(values.reshape(3000, 4000)), "PNG")
    tracemalloc.start()
    out = decode_image(data, max_side=362)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.pixels.shape[1] == 362 and (out.width, out.height) == (4000, 3000)
    # 12 MP: the float64 path took ~200 MB on top of PIL's own 24 MB (numpy allocations are
    # traced; PIL's are not). Now: one uint16 copy and one 8-bit copy.
    assert peak < 50 * 1024 * 1024, peak


def test_decoded_memory_limit():
    data = encode(Image.new("RGBA", (2000, 2000)), "PNG")
    with pytest.raises(ImageError, match="byte limit") as info:
        decode_image(data, max_side=100, limits=DecodeLimits(max_decoded_bytes=8_000_000))
    assert info.value.kind == "too_large"


def test_thumbnails_use_the_decode_limits(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (3000, 3000), "red"), "PNG"))
    assert thumbnail_data_uri(path, limits=DecodeLimits(max_pixels=1_000_000)) is None
    assert thumbnail_data_uri(path).startswith("data:image/jpeg;base64,")
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    assert thumbnail_data_uri(tmp_path / "bad.jpg") is None


# EXIF orientation -> how the stored pixels were derived from the upright picture.
STORED_FROM_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(STORED_FROM_UPRIGHT))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_gives_the_upright_descriptor(orientation, fmt, tiny_backbone):
    from retrieval.descriptors.gem import GeMExtractor

    upright = Image.fromarray(pattern(120, 80, seed=orientation))
    stored = upright.transpose(STORED_FROM_UPRIGHT[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    a = decode_image(encode(upright, fmt, **options), max_side=96)
    b = decode_image(encode(stored, fmt, exif=exif, **options), max_side=96)
    assert (b.width, b.height) == (a.width, a.height) == (120, 80)
    extractor = GeMExtractor(GeMConfig(backbone="test:tiny", image_size=96), backbone=tiny_backbone)
    da, db = extractor.describe(a), extractor.describe(b)
    tolerance = 1e-5 if fmt == "PNG" else 2e-2  # JPEG blocks fall differently once rotated
    assert float(np.dot(da, db)) > 1 - tolerance


def test_hostile_corpus_is_accounted_for(tmp_path, tiny_saved_model_path):
    folder = tmp_path / "hostile corpus"
    folder.mkdir()
    photo = encode(Image.fromarray(pattern(64, 48)), "JPEG")
    files = {
        "ünïcödé name.jpg": photo,
        "with space.jpg": photo,  # the same bytes under two names
        "photo.webp": encode(Image.fromarray(pattern(64, 48, 1)), "WEBP"),
        "photo.tiff": encode(Image.fromarray(pattern(64, 48, 2)), "TIFF"),
        "empty.jpg": b"",
        "page.jpg": b"<!doctype html><html></html>",
        "noise.png": np.random.default_rng(1).integers(0, 256, 999, dtype=np.uint8).tobytes(),
        "pixel.png": encode(Image.new("RGB", (1, 1)), "PNG"),
        "gray.png": encode(Image.fromarray(pattern(64, 48)[..., 0]), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (64, 48), (0, 90, 200, 5)), "JPEG"),
        "sixteen.png": encode(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "PNG"),
        "broken exif.jpg": broken_exif_jpeg(BROKEN_EXIF["entries past the end"]),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "uri\n"
        + "".join(f'"{folder / name}"\n' for name in files)
        + f"{folder / 'gone.jpg'}\n"  # points at a missing object
        + "../escape.jpg\n"  # leaves the manifest's folder
    )
    config = RunConfig(
        runner="local",
        shard_size=4,
        gem=GeMConfig(backbone=f"savedmodel:{tiny_saved_model_path}", image_size=64),
    )
    summary = stages.extract(str(manifest), str(tmp_path / "desc"), config)
    assert summary["inputs"] == summary["indexed"] + summary["failed"] == len(files) + 2
    assert summary["failures_by_kind"] == {
        "empty_file": 1,
        "not_an_image": 2,
        "too_small": 1,
        "missing": 1,
        "unsafe_uri": 1,
    }
    ids, _, vectors = descriptor_shards.read_all(str(tmp_path / "desc"))
    assert {"photo.webp", "photo.tiff"} <= {i.rsplit("/", 1)[-1] for i in ids}
    by_name = {i.rsplit("/", 1)[-1]: v for i, v in zip(ids, vectors, strict=True)}
    np.testing.assert_array_equal(by_name["ünïcödé name.jpg"], by_name["with space.jpg"])
    # The broken EXIF block is in the data (its row's `notes`) and counted, not only logged.
    assert summary["images_with_notes"] == 1
    notes = {}
    for manifest in descriptor_shards.list_shards(str(tmp_path / "desc")):
        notes |= descriptor_shards.read_notes(str(tmp_path / "desc"), manifest)
    [(noted_id, note)] = notes.items()
    assert noted_id.endswith("broken exif.jpg")
    assert note == "broken EXIF block (500 directory entries run past the end of the block)"


@pytest.fixture(scope="module")
def tiny_saved_model_path(tmp_path_factory):
    from support import save_tiny_saved_model

    return save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")
