"""Pooling a CNN feature map into one global descriptor.

GeM (generalized mean, Radenović et al., TPAMI 2018): ``(mean(x^p))^(1/p)`` per channel. p=1 is
average pooling, p→∞ max pooling; p=3 is the usual off-the-shelf choice. The NumPy functions are
the reference; the TensorFlow ones run inside the model graph so only C floats leave it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf


def gem(features: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """GeM over the spatial axes of a (..., H, W, C) feature map -> (..., C)."""
    clamped = np.maximum(features.astype(np.float64), eps)
    return np.power(np.mean(np.power(clamped, p), axis=(-3, -2)), 1.0 / p)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale rows (last axis) to unit L2 norm; all-zero rows stay zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)


def gem_tf(features: tf.Tensor, p: float = 3.0, eps: float = 1e-6) -> tf.Tensor:
    """GeM over the spatial axes of a (N, H, W, C) tensor -> (N, C), in the graph."""
    import tensorflow as tf

    clamped = tf.maximum(features, eps)
    return tf.pow(tf.reduce_mean(tf.pow(clamped, p), axis=[1, 2]), 1.0 / p)
