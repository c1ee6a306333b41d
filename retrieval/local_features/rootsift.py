"""RootSIFT local features (Arandjelović and Zisserman, CVPR 2012) through OpenCV.

SIFT keypoints and descriptors, each descriptor L1-normalized and square-rooted: comparing
RootSIFT vectors with the Euclidean distance is comparing SIFT histograms with the Hellinger
kernel, which matches better. Works offline (no weights), on any image size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.images import DecodedImage
from retrieval.local_features.features import (
    LocalFeatureConfig,
    LocalFeatures,
    local_model_info,
    shrink_to_side,
)

ROOTSIFT_DIM = 128


def rootsift_identity() -> str:
    """RootSIFT has no weights; the OpenCV version stands in for them in the fingerprint."""
    import cv2

    return f"opencv-{cv2.__version__}-sift"


def root_normalize(descriptors: np.ndarray) -> np.ndarray:
    """SIFT -> RootSIFT: L1-normalize, then square root (the result has unit L2 norm)."""
    d = np.asarray(descriptors, np.float32)
    d = d / np.maximum(np.abs(d).sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(d)


class RootSIFTExtractor:
    """Up to ``max_features`` RootSIFT features (strongest first) of an image shrunk to
    ``image_size`` on its longer side."""

    dim = ROOTSIFT_DIM

    def __init__(self, config: LocalFeatureConfig | None = None):
        import cv2

        self.config = config or LocalFeatureConfig()
        self._sift = cv2.SIFT_create(nfeatures=self.config.max_features)

    def info(self) -> dict[str, Any]:
        return local_model_info(self.config, self.dim, rootsift_identity())

    def extract(self, image: DecodedImage) -> LocalFeatures:
        import cv2

        gray = cv2.cvtColor(
            shrink_to_side(image.pixels, self.config.image_size), cv2.COLOR_RGB2GRAY
        )
        h, w = gray.shape
        keypoints, descriptors = self._sift.detectAndCompute(gray, None)
        if descriptors is None or not keypoints:
            return LocalFeatures.empty(self.dim, w, h)
        # OpenCV may return a few more than nfeatures (ties); keep the strongest.
        order = np.argsort([-k.response for k in keypoints], kind="stable")
        order = order[: self.config.max_features]
        return LocalFeatures(
            np.asarray([keypoints[i].pt for i in order], np.float32).reshape(-1, 2),
            np.asarray([keypoints[i].size for i in order], np.float32),
            root_normalize(descriptors[order]),
            w,
            h,
        )
