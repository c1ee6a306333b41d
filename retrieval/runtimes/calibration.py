"""The calibration sample for int8 runtimes: which images, chosen how, and its fingerprint.

int8 quantization needs the range of every activation, measured on representative inputs.

* **Built in** (the default, ``builtin:scikit-image``): the public-domain and CC0 photographs that
  the ``scikit-image`` wheel ships in ``skimage/data`` (``SCIKIT_IMAGE_PHOTOS``: file, SHA-256,
  licence and credit of each), all of them, in that fixed order. They come from the package
  registry with the project's dependencies, so the default int8 model needs no user data and is
  the same everywhere; a file whose digest differs from the documented one is refused (it would
  be another model under the same name).
* **From ``--calibration URI``**: ``count`` images drawn with ``seed`` from the sorted listing of
  ``URI`` (a folder, prefix or manifest, like ``--input``).

Either way the images are decoded and resized exactly as extraction does. Same sample and size ->
same images in the same order -> the same quantized model (the tests check the conversion is
byte-for-byte repeatable). The fingerprint hashes the images' bytes and the size; it keys the
model cache and is part of the model's config hash, so shards calibrated differently never mix.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval import storage
from retrieval.corpus import list_corpus
from retrieval.images import decode_image
from retrieval.runtimes.spec import RuntimeNotInstalledError

DEFAULT_CALIBRATION_COUNT = 32
DEFAULT_CALIBRATION_SEED = 0
BUILTIN_CALIBRATION = "builtin:scikit-image"


@dataclass(frozen=True)
class SamplePhoto:
    file: str  # in skimage/data
    sha256: str  # of the file as shipped by scikit-image 0.26.0
    licence: str  # as stated in scikit-image's skimage/data/_fetchers.py
    credit: str


# Every photograph in the scikit-image wheel whose licence scikit-image states as public domain or
# CC0. Left out: microscopy/medical/astronomy images (not photos of scenes), images with "no known
# copyright restrictions" but no stated licence (coins, ihc), and images with no licence stated
# (motorcycle stereo pair). Grey-scale photos are used as RGB, as extraction reads them.
SCIKIT_IMAGE_PHOTOS = (
    SamplePhoto(
        "astronaut.png",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "public domain",
        "NASA (Eileen Collins)",
    ),
    SamplePhoto(
        "chelsea.png",
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "CC0",
        "Stefan van der Walt",
    ),
    SamplePhoto(
        "coffee.png",
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "CC0",
        "Rachel Michetti",
    ),
    SamplePhoto(
        "rocket.jpg",
        "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
        "public domain",
        "SpaceX",
    ),
    SamplePhoto(
        "camera.png",
        "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
        "CC0",
        "Lav Varshney",
    ),
    SamplePhoto(
        "clock_motion.png",
        "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955",
        "public domain",
        "Stefan van der Walt",
    ),
    SamplePhoto(
        "brick.png",
        "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
        "CC0",
        "CC0Textures (Bricks25)",
    ),
    SamplePhoto(
        "grass.png",
        "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
        "CC0",
        "linolafett (DeviantArt, Grass 01)",
    ),
    SamplePhoto(
        "gravel.png",
        "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
        "CC0",
        "CC0Textures (Gravel04)",
    ),
)


@dataclass(frozen=True)
class CalibrationSample:
    source: str
    uris: tuple[str, ...]
    sha256: tuple[str, ...]
    image_size: int
    seed: int

    def fingerprint(self) -> str:
        return hashlib.sha256(
            json.dumps(
                {"sha256": list(self.sha256), "image_size": self.image_size}, sort_keys=True
            ).encode()
        ).hexdigest()

    def images(self) -> list[np.ndarray]:
        """The sample's pixels (H, W, 3) uint8, decoded and shrunk as for extraction.

        A file whose bytes no longer match the digest it was sampled with is refused: the model
        would not be the one its fingerprint names."""
        pixels = []
        for uri, digest in zip(self.uris, self.sha256, strict=True):
            data = storage.read_bytes(uri)
            if storage.sha256_bytes(data) != digest:
                raise ValueError(
                    f"calibration image {uri} changed since it was sampled (sha256 is not "
                    f"{digest}); for {BUILTIN_CALIBRATION}, install the pinned scikit-image "
                    "(requirements/constraints.txt) or give --calibration URI"
                )
            pixels.append(decode_image(data, max_side=self.image_size).pixels)
        return pixels


def resolve_calibration(source: str | None, *, image_size: int) -> CalibrationSample:
    """The sample for ``--calibration``: the built-in one when ``source`` is None or
    ``BUILTIN_CALIBRATION``, else ``calibration_sample(source)``. Cached per process: workers
    and manifests ask for the same sample several times."""
    return _resolve(source or BUILTIN_CALIBRATION, image_size)


@functools.lru_cache(maxsize=8)
def _resolve(source: str, image_size: int) -> CalibrationSample:
    if source == BUILTIN_CALIBRATION:
        return builtin_calibration_sample(image_size=image_size)
    return calibration_sample(source, image_size=image_size)


def builtin_calibration_sample(*, image_size: int) -> CalibrationSample:
    """``SCIKIT_IMAGE_PHOTOS`` from the installed scikit-image, in their documented order.

    Only locates the files (scikit-image is not imported); their digests are checked when the
    pixels are read (``CalibrationSample.images``), i.e. when a model is converted."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeNotInstalledError(
            f"the int8 runtimes' built-in calibration sample ({BUILTIN_CALIBRATION}) comes from "
            "the Python package 'scikit-image' (pip install scikit-image), which is not "
            "installed; or give --calibration URI"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    uris = tuple(str(folder / photo.file) for photo in SCIKIT_IMAGE_PHOTOS)
    missing = [uri for uri in uris if not Path(uri).is_file()]
    if missing:
        raise ValueError(
            f"scikit-image is installed without its sample photos ({', '.join(missing)}); "
            "install the pinned scikit-image wheel or give --calibration URI"
        )
    digests = tuple(photo.sha256 for photo in SCIKIT_IMAGE_PHOTOS)
    return CalibrationSample(BUILTIN_CALIBRATION, uris, digests, image_size, seed=0)


def calibration_sample(
    source: str,
    *,
    image_size: int,
    count: int = DEFAULT_CALIBRATION_COUNT,
    seed: int = DEFAULT_CALIBRATION_SEED,
) -> CalibrationSample:
    """Draw the calibration sample (see the module docstring); unreadable inputs are skipped."""
    refs = sorted((r for r in list_corpus(source) if not r.problem), key=lambda r: r.uri)
    if not refs:
        raise ValueError(f"calibration source {source!r} holds no images")
    order = np.random.default_rng(seed).permutation(len(refs))
    uris, digests = [], []
    for i in order:
        if len(uris) == count:
            break
        try:
            location = refs[i].location  # a signed URL's real URI: kept in memory only
            data = storage.read_bytes(location)
            decode_image(data, max_side=image_size)
        except Exception:  # a broken calibration image is skipped, deterministically
            continue
        uris.append(location)
        digests.append(storage.sha256_bytes(data))
    return CalibrationSample(source, tuple(uris), tuple(digests), image_size, seed)
