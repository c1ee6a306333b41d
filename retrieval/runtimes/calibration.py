"""The calibration sample for int8 runtimes: which images, chosen how, and its fingerprint.

int8 quantization needs the range of every activation, measured on representative inputs. The
sample is ``count`` images drawn with ``seed`` from the sorted listing of ``source`` (a folder,
prefix or manifest, like ``--input``), decoded and resized exactly as extraction does. Same source,
count, seed and size -> same images in the same order -> the same quantized model (the tests check
the conversion is byte-for-byte repeatable). The fingerprint hashes the chosen images' bytes, so a
changed file is a new model. The README documents the sample used for the published figures.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from retrieval import storage
from retrieval.corpus import list_corpus
from retrieval.images import decode_image

DEFAULT_CALIBRATION_COUNT = 32
DEFAULT_CALIBRATION_SEED = 0


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
        """The sample's pixels (H, W, 3) uint8, decoded and shrunk as for extraction."""
        return [
            decode_image(storage.read_bytes(uri), max_side=self.image_size).pixels
            for uri in self.uris
        ]


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
            data = storage.read_bytes(refs[i].uri)
            decode_image(data, max_side=image_size)
        except Exception:  # a broken calibration image is skipped, deterministically
            continue
        uris.append(refs[i].uri)
        digests.append(storage.sha256_bytes(data))
    return CalibrationSample(source, tuple(uris), tuple(digests), image_size, seed)
