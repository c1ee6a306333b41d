"""The TensorFlow runtime: the Keras/TF backbone as built, fp32 (the reference for the others).

Also the export point for conversion: :func:`feature_function` is the one graph (preprocessing +
backbone, dynamic batch and size) that LiteRT and ONNX convert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

    from retrieval.backbones import Backbone


def feature_function(backbone: Backbone) -> tf.types.experimental.PolymorphicFunction:
    """``pixels (N, H, W, 3) float32 in [0, 255] -> features (N, h, w, C)`` as a tf.function.

    Dynamic N, H and W: one graph for every batch size and aspect ratio (no retrace per shape).
    """
    import tensorflow as tf

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="image")],
        reduce_retracing=True,
    )
    def features(pixels: tf.Tensor) -> tf.Tensor:
        return backbone.model(backbone.preprocess(pixels))

    return features


class TensorFlowRunner:
    """Runs the backbone in TensorFlow; on ``device="gpu"`` ops are placed on the first GPU
    (soft placement: on a machine without one they run on the CPU, which is how the GPU worker
    path is exercised in tests)."""

    def __init__(self, backbone: Backbone, device: str = "cpu"):
        import tensorflow as tf

        self.name = "tensorflow"
        self.dim = backbone.dim
        self.device = device
        self._features = feature_function(backbone)
        gpus = tf.config.list_logical_devices("GPU") if device == "gpu" else []
        self._placement = gpus[0].name if gpus else "/CPU:0"

    def features(self, pixels: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        with tf.device(self._placement):
            return self._features(np.asarray(pixels, np.float32)).numpy()
