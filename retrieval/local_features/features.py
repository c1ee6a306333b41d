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
DEFAULT_LOCAL_IMAGE_SIZE = 448
DEFAULT_MAX_FEATURES = 1000
# How descriptors are stored. ``q15``: each value rounded to a multiple of 1/15 and kept as a
# uint8 code (RootSIFT values lie in [0, 0.34]: codes 0-5, which zstd packs into ~2 bits), read
# back L2-normalised: 40.7 KB an image on oxford-dev against float16's 183 KB, for -0.3 mAP of
# spatial verification alone. It is not the default: coarser descriptors make the ratio test
# reject more matches, so pair mining verifies fewer pairs (90 against 112 on oxford-dev), the
# whitening learned from them is weaker and the default pipeline loses 1.7 mAP (64.13 against
# 65.81); finer steps (1/22, 1/30) keep more pairs but cost more bytes than the 45 KiB budget
# (benchmarks/README.md, "Compact local features"). Only for non-negative descriptors
# (RootSIFT): DELF's PCA-projected descriptors are signed.
Q15 = 15.0
# ``int8``: each value of a unit vector (signed: a PCA projection's) x127, rounded, as int8.
INT8 = 127.0
DESCRIPTOR_DTYPES = ("float16", "float32", "q15", "int8")
# The default: RootSIFT projected onto its first 56 principal components, stored as int8 codes:
# 41.9 KB an image on oxford-dev (161 KB as 128 float16 values), default pipeline 66.00 against
# 66.47, spatial verification's gain 0.52 lower (benchmarks/README.md, "The local features'
# cost"); 40 and 48 components lost more (-0.66, -0.60 on verification; 48: default 65.04).
DEFAULT_ROOTSIFT_PCA_DIM = 56
AUTO = "auto"


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
    # How descriptors are stored; "auto": int8 codes when projected, else float16 (half of
    # float32's bytes, the same matches). See :attr:`stored_dtype`.
    dtype: str = AUTO
    # RootSIFT projected onto its first N principal components (0: not projected), learned on
    # scikit-image's public-domain photos (``rootsift.rootsift_pca``), as DELF keeps 40 of its.
    # None: DEFAULT_ROOTSIFT_PCA_DIM for RootSIFT (unless stored as q15), 0 for the others.
    # See :attr:`projection_dim`.
    pca_dim: int | None = None

    @property
    def projection_dim(self) -> int:
        """The principal components RootSIFT is projected onto (0: not projected)."""
        if self.pca_dim is not None:
            return self.pca_dim
        return DEFAULT_ROOTSIFT_PCA_DIM if self.method == "rootsift" and self.dtype != "q15" else 0

    @property
    def stored_dtype(self) -> str:
        """How descriptors are stored, "auto" resolved."""
        if self.dtype != AUTO:
            return self.dtype
        return "int8" if self.projection_dim else "float16"

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
        if self.dtype != AUTO and self.dtype not in DESCRIPTOR_DTYPES:
            raise ValueError(
                f"local descriptor dtype must be {AUTO!r} or one of {DESCRIPTOR_DTYPES}"
            )
        if self.dtype == "q15" and (self.method.startswith("delf:") or self.projection_dim):
            raise ValueError(
                "local descriptor dtype q15 stores non-negative descriptors (RootSIFT); DELF's "
                "and projected ones are signed: use int8, float16 or float32"
            )
        dim = self.projection_dim
        if dim and (self.method != "rootsift" or not 1 <= dim <= 64):
            raise ValueError("local pca_dim projects RootSIFT only, onto 1 to 64 components")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def model_id(self) -> str:
        projected = f"-pca{self.projection_dim}" if self.projection_dim else ""
        return f"{self.method}{projected}@{self.image_size}x{self.max_features}"

    def as_dict(self) -> dict[str, Any]:
        """The settings as the features were made ("auto" resolved: what the config hash and
        the shards record; an explicit value hashes as its automatic twin)."""
        settings = asdict(self)
        settings["dtype"], settings["pca_dim"] = self.stored_dtype, self.projection_dim
        if not self.projection_dim:  # unprojected: the settings (and hash) of before pca_dim
            del settings["pca_dim"]
        return settings

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def encode_descriptors(descriptors: np.ndarray, dtype: str) -> np.ndarray:
    """Descriptors as stored: float16/float32 values, or q15 codes (uint8)."""
    if dtype == "q15":
        return np.clip(np.rint(descriptors * Q15), 0, 255).astype(np.uint8)
    if dtype == "int8":
        return np.clip(np.rint(descriptors * INT8), -127, 127).astype(np.int8)
    return descriptors.astype(dtype, copy=False)


def decode_descriptors(stored: np.ndarray) -> np.ndarray:
    """Stored descriptors (n, d) as float32; q15 (uint8) and int8 codes back to unit-length
    vectors."""
    if stored.dtype not in (np.uint8, np.int8):
        return stored.astype(np.float32)
    values = stored.astype(np.float32) / (Q15 if stored.dtype == np.uint8 else INT8)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return values / np.maximum(norms, 1e-12)


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
