"""GeM global descriptors: backbone feature map -> generalized-mean pooling -> L2 norm.

Single- or multi-scale. Multi-scale follows cnnimageretrieval-pytorch: each scale's descriptor is
L2-normalized, the p-th powers are averaged, the p-th root is taken, and the result normalized.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from retrieval.descriptors.backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    backbone_identity,
    load_backbone,
)
from retrieval.descriptors.pooling import gem_tf, l2_normalize
from retrieval.images import DecodedImage, shrink

log = logging.getLogger(__name__)

# Chosen by measurement on oxford-dev (see README, "Choosing the defaults").
DEFAULT_IMAGE_SIZE = 362


@dataclass(frozen=True)
class GeMConfig:
    """Everything that changes the descriptor; its hash goes into every shard manifest."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = DEFAULT_IMAGE_SIZE  # longer side, in pixels, at scale 1
    scales: tuple[float, ...] = (1.0,)
    p: float = 3.0

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32 pixels")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError("scales must be positive")
        if self.p <= 0:
            raise ValueError("GeM p must be positive")

    @property
    def max_side(self) -> int:
        """Longest side an image must be decoded at to serve every scale."""
        return round(self.image_size * max(self.scales))

    @property
    def model_id(self) -> str:
        scales = "" if self.scales == (1.0,) else "x" + "-".join(f"{s:g}" for s in self.scales)
        return f"gem-p{self.p:g}/{self.backbone}@{self.image_size}{scales}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def model_info(config: GeMConfig, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What manifests record about the model: id, config and its hash, weights checksum.

    Without ``identity`` it is read from the backbone spec (cheap for the default backbone).
    """
    identity = identity or backbone_identity(config.backbone)
    return {
        "id": config.model_id,
        "config": config.as_dict(),
        "config_hash": config.config_hash(),
        "weights_sha256": identity["weights_sha256"],
        "preprocessing": {
            **identity["preprocessing"],
            "resize": "longer side to image_size x scale, bilinear, shrink only",
        },
        "dim": identity["dim"],
    }


def configure_tf_threads(threads: int | None) -> None:
    """Pin TensorFlow's thread pools (only possible before TF runs its first op in a process)."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1 if threads <= 2 else 2)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            log.warning(
                "TensorFlow already initialised with %s threads; wanted %s", current, threads
            )


@dataclass
class GeMExtractor:
    """GeM descriptors over a backbone; build one per worker (it holds the model)."""

    config: GeMConfig = field(default_factory=GeMConfig)
    backbone: Backbone | None = None

    def __post_init__(self) -> None:
        import tensorflow as tf

        if self.backbone is None:
            self.backbone = load_backbone(self.config.backbone)
        backbone = self.backbone
        p = self.config.p

        # One graph for any image size: dynamic H and W avoid a retrace per aspect ratio.
        @tf.function(
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)], reduce_retracing=True
        )
        def describe_one(pixels: tf.Tensor) -> tf.Tensor:
            batch = backbone.preprocess(tf.cast(pixels, tf.float32)[tf.newaxis])
            return gem_tf(backbone.model(batch), p)[0]

        self._describe_one = describe_one

    @property
    def dim(self) -> int:
        assert self.backbone is not None
        return self.backbone.dim

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def info(self) -> dict[str, Any]:
        """Model description for manifests and reports."""
        assert self.backbone is not None
        return model_info(
            self.config,
            {
                "dim": self.dim,
                "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing,
            },
        )

    def describe(self, image: DecodedImage) -> np.ndarray:
        """The L2-normalized float32 descriptor of one image."""
        pixels = image.pixels
        if len(self.config.scales) == 1 and max(pixels.shape[:2]) <= self.config.image_size:
            return l2_normalize(self._describe_one(pixels).numpy()).astype(np.float32)
        p = self.config.p
        acc = np.zeros(self.dim, np.float64)
        for scale in self.config.scales:
            scaled = _shrink(pixels, round(self.config.image_size * scale))
            acc += np.power(l2_normalize(self._describe_one(scaled).numpy().astype(np.float64)), p)
        return l2_normalize(np.power(acc / len(self.config.scales), 1.0 / p)).astype(np.float32)

    def describe_batch(self, images: list[DecodedImage]) -> np.ndarray:
        """Descriptors of several images as an (n, dim) array.

        Images keep their own size and aspect ratio (padding would leak into GeM), so a batch is
        a loop; on CPU the convolutions already use every thread given to TensorFlow.
        """
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.describe(image) for image in images])


def _shrink(pixels: np.ndarray, max_side: int) -> np.ndarray:
    if max(pixels.shape[:2]) <= max_side:
        return pixels
    return np.asarray(shrink(Image.fromarray(pixels), max_side))
