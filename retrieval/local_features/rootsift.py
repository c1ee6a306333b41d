"""RootSIFT local features (Arandjelović and Zisserman, CVPR 2012) through OpenCV.

SIFT keypoints and descriptors, each descriptor L1-normalized and square-rooted: comparing
RootSIFT vectors with the Euclidean distance is comparing SIFT histograms with the Hellinger
kernel, which matches better. Works offline (no weights), on any image size.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.images import DecodedImage
from retrieval.local_features.features import (
    DEFAULT_LOCAL_IMAGE_SIZE,
    DEFAULT_MAX_FEATURES,
    LocalFeatureConfig,
    LocalFeatures,
    local_model_info,
    shrink_to_side,
)
from retrieval.runtimes.calibration import builtin_calibration_sample

ROOTSIFT_DIM = 128
PCA_COMPONENTS = 64  # the most a projection keeps


@dataclass(frozen=True)
class RootSIFTBasis:
    """A PCA of RootSIFT: the mean, the first ``PCA_COMPONENTS`` components (rows), and the
    SHA-256 of both (it goes into the local model's fingerprint)."""

    mean: np.ndarray
    components: np.ndarray
    sha256: str

    def project(self, descriptors: np.ndarray, dim: int) -> np.ndarray:
        """(n, 128) RootSIFT -> (n, dim) unit vectors.

        Through ``einsum``'s own loop, not BLAS: ~1.4 ms an image on one thread, where a BLAS
        product (0.2 ms) leaves OpenBLAS's threads spinning on the cores SIFT then needs
        (measured: +60 ms of CPU per image, the workers' extraction slower than unprojected)."""
        projected = np.einsum("ij,kj->ik", descriptors - self.mean, self.components[:dim])
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        return (projected / np.maximum(norms, 1e-12)).astype(np.float32)


@functools.cache
def rootsift_pca() -> RootSIFTBasis:
    """The PCA of the RootSIFT descriptors of scikit-image's public-domain photos (the int8
    runtimes' calibration sample, their digests checked), at the default image size and
    feature count: learned from photos no benchmark contains, the same on every machine with
    the same OpenCV, in a second or two (once per process). Component signs are fixed (the
    largest entry positive) so the basis is deterministic."""
    import cv2

    sift = cv2.SIFT_create(nfeatures=DEFAULT_MAX_FEATURES)
    blocks = []
    for pixels in builtin_calibration_sample(image_size=DEFAULT_LOCAL_IMAGE_SIZE).images():
        _, descriptors = sift.detectAndCompute(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), None)
        if descriptors is not None:
            blocks.append(root_normalize(descriptors).astype(np.float64))
    sample = np.concatenate(blocks)
    mean = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    components = vt[:PCA_COMPONENTS]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = (components * signs[:, None]).astype(np.float32)
    mean = mean.astype(np.float32)
    digest = hashlib.sha256(mean.tobytes() + components.tobytes()).hexdigest()
    return RootSIFTBasis(mean, components, digest)


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
    ``image_size`` on its longer side; with ``pca_dim``, projected onto that many components of
    :func:`rootsift_pca`."""

    def __init__(self, config: LocalFeatureConfig | None = None):
        import cv2

        self.config = config or LocalFeatureConfig()
        self._sift = cv2.SIFT_create(nfeatures=self.config.max_features)
        self.dim = self.config.projection_dim or ROOTSIFT_DIM
        self._basis = rootsift_pca() if self.config.projection_dim else None

    def info(self) -> dict[str, Any]:
        identity = rootsift_identity()
        if self._basis is not None:
            identity += f"+pca-{self._basis.sha256[:16]}"
        return local_model_info(self.config, self.dim, identity)

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
            self._describe(descriptors[order]),
            w,
            h,
        )

    def _describe(self, sift: np.ndarray) -> np.ndarray:
        root = root_normalize(sift)
        return root if self._basis is None else self._basis.project(root, self.dim)
