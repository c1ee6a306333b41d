"""DELF local features (Noh et al., ICCV 2017) through TensorFlow Hub.

The model is named by a TF-Hub handle (downloaded once into ``TFHUB_CACHE_DIR`` and read from
there afterwards), a local SavedModel folder, or a ``gs://`` / ``s3://`` folder, which is first
copied to a local temporary folder through fsspec (TensorFlow's own gs:// client ignores
emulators and s3:// support is gone). Its ``default`` signature is DELF's:

    inputs   image (H x W x 3; uint8, or float32 in [0, 1] as the public TF-Hub module),
             score_threshold (attention threshold), image_scales (image pyramid),
             max_feature_num
    outputs  locations (n x 2, row/column = y/x, in input-image pixels), descriptors (n x 40,
             after PCA), scales (n), attention (n)

Defaults are the DELF paper's configuration: 7 scales from 0.25 to 2.0, attention threshold
100, at most 1000 features.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np

from retrieval import storage
from retrieval.images import DecodedImage
from retrieval.local_features.features import (
    LocalFeatureConfig,
    LocalFeatures,
    local_model_info,
    shrink_to_side,
)

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DELF_SCORE_THRESHOLD = 100.0
SIGNATURE_INPUTS = ("image", "score_threshold", "image_scales", "max_feature_num")
SIGNATURE_OUTPUTS = ("locations", "descriptors", "scales", "attention")


def resolve_model_location(location: str) -> str:
    """A path or handle ``hub.load`` can read: remote folders are copied to local temp first."""
    if location.startswith(("gs://", "s3://")):
        return storage.local_copy(location, tempfile.mkdtemp(prefix="delf-"))
    return location


class DelfExtractor:
    """DELF features of an image shrunk to ``config.image_size`` on its longer side."""

    def __init__(
        self,
        config: LocalFeatureConfig,
        *,
        scales: tuple[float, ...] = DELF_SCALES,
        score_threshold: float = DELF_SCORE_THRESHOLD,
    ):
        import tensorflow as tf
        import tensorflow_hub as hub

        from retrieval.backbones import saved_model_variables, weights_fingerprint

        if not config.method.startswith("delf:"):
            raise ValueError(f"not a DELF method: {config.method!r}")
        self.config = config
        self.location = config.method.removeprefix("delf:")
        self._loaded = hub.load(resolve_model_location(self.location))
        signatures = getattr(self._loaded, "signatures", {})
        if "default" not in signatures:
            raise ValueError(f"{self.location}: no 'default' signature (is this a DELF model?)")
        self._fn = signatures["default"]
        _, inputs = self._fn.structured_input_signature
        missing = [name for name in SIGNATURE_INPUTS if name not in inputs]
        outputs = self._fn.structured_outputs
        missing += [name for name in SIGNATURE_OUTPUTS if name not in outputs]
        if missing:
            raise ValueError(f"{self.location}: the DELF signature lacks {missing}")
        self._image_dtype = inputs["image"].dtype
        self._tf = tf
        self.scales = tuple(scales)
        self.score_threshold = float(score_threshold)
        self.dim = int(outputs["descriptors"].shape[-1] or self._probe_dim())
        self._weights = weights_fingerprint(saved_model_variables(self._loaded))

    def _probe_dim(self) -> int:
        probe = np.zeros((64, 64, 3), np.uint8)
        return int(self._call(probe)["descriptors"].shape[-1])

    def info(self) -> dict[str, Any]:
        info = local_model_info(self.config, self.dim, self._weights)
        info["delf"] = {
            "model": self.location,
            "image_scales": list(self.scales),
            "score_threshold": self.score_threshold,
        }
        return info

    def _call(self, pixels: np.ndarray) -> dict[str, Any]:
        tf = self._tf
        image = tf.constant(pixels, tf.uint8)
        if self._image_dtype != tf.uint8:  # the public module takes float32 in [0, 1]
            image = tf.image.convert_image_dtype(image, self._image_dtype)
        return self._fn(
            image=image,
            score_threshold=tf.constant(self.score_threshold, tf.float32),
            image_scales=tf.constant(self.scales, tf.float32),
            max_feature_num=tf.constant(self.config.max_features, tf.int32),
        )

    def extract(self, image: DecodedImage) -> LocalFeatures:
        pixels = shrink_to_side(image.pixels, self.config.image_size)
        h, w = pixels.shape[:2]
        out = self._call(pixels)
        rows_cols = np.asarray(out["locations"], np.float32).reshape(-1, 2)
        descriptors = np.array(out["descriptors"], np.float32).reshape(len(rows_cols), -1)
        descriptors /= np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
        return LocalFeatures(
            rows_cols[:, ::-1].copy(),  # DELF gives (y, x); we store (x, y)
            np.asarray(out["scales"], np.float32).reshape(-1),
            descriptors,
            w,
            h,
        )
