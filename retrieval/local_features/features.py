"""What every local-feature extractor returns, its settings, and the image it works on.

The extractors (``rootsift.py``, ``delf_hub.py``) build on this module and ``extractor.py``
picks one of them by name, so the types live here, below all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from retrieval.images import DecodedImage

# Chosen by measured cost and gain on oxford-dev and ukbench-56 (README, "Re-ranking").
DEFAULT_LOCAL_IMAGE_SIZE = 640
DEFAULT_MAX_FEATURES = 1000
DESCRIPTOR_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints of one image: (n, 2) x/y pixel locations in the image the features were taken
    from (``image_width`` x ``image_height``), (n,) scales and (n, d) L2-normalized descriptors."""

    locations: np.ndarray
    scales: np.ndarray
    descriptors: np.ndarray
    image_width: int
    image_height: int

    def __len__(self) -> int:
        return len(self.locations)

    @classmethod
    def empty(cls, dim: int, width: int = 0, height: int = 0) -> LocalFeatures:
        return cls(
            np.zeros((0, 2), np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, dim), np.float32),
            width,
            height,
        )


@dataclass(frozen=True)
class LocalFeatureConfig:
    """Everything that changes the local features; its hash goes into every shard manifest.

    ``method``: ``rootsift`` (OpenCV, offline default), ``delf:<hub handle | SavedModel folder |
    gs:// or s3:// path>``, or ``none`` (no local features, no spatial verification).
    """

    method: str = "rootsift"
    image_size: int = DEFAULT_LOCAL_IMAGE_SIZE  # longer side in pixels
    max_features: int = DEFAULT_MAX_FEATURES
    dtype: str = "float16"  # how descriptors are stored (float16 halves the bytes, same matches)

    def __post_init__(self) -> None:
        if (
            self.method != "none"
            and self.method != "rootsift"
            and not self.method.startswith("delf:")
        ):
            raise ValueError(
                f"local features must be 'rootsift', 'delf:<model>' or 'none', not {self.method!r}"
            )
        if self.image_size < 32:
            raise ValueError("local-feature image_size must be at least 32 pixels")
        if self.max_features < 1:
            raise ValueError("max_features must be at least 1")
        if self.dtype not in DESCRIPTOR_DTYPES:
            raise ValueError(f"local descriptor dtype must be one of {DESCRIPTOR_DTYPES}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def model_id(self) -> str:
        return f"{self.method}@{self.image_size}x{self.max_features}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


class LocalFeatureExtractor(Protocol):
    config: LocalFeatureConfig
    dim: int

    def extract(self, image: DecodedImage) -> LocalFeatures: ...

    def info(self) -> dict[str, Any]: ...


def local_model_info(config: LocalFeatureConfig, dim: int, weights_sha256: str) -> dict[str, Any]:
    """What local-feature manifests record about the extractor (as ``model_info`` for GeM)."""
    return {
        "id": config.model_id,
        "config": config.as_dict(),
        "config_hash": config.config_hash(),
        "weights_sha256": weights_sha256,
        "dim": dim,
    }


def shrink_to_side(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """``pixels`` with the longer side at most ``max_side`` (never enlarged, area interpolation,
    OpenCV's choice for shrinking): the image every local extractor takes its features from."""
    import cv2

    h, w = pixels.shape[:2]
    if max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
