"""Is a trained codebook still good for the vectors it is asked to encode?

The measure is the mean squared quantization error (‖x − decode(encode(x))‖², the codebook's
own standalone codec) of the new vectors, against the same error on the training sample, which
``retrieval train`` records in ``codebook.json``. A codebook fitted to other data (a new kind of
images, a changed model) encodes the new vectors worse than its training sample.

``DRIFT_THRESHOLD``: retrain when the new vectors' error exceeds 1.5x the training sample's. On
held-out vectors from the training distribution the ratio stays near 1 (k-means/PQ generalize at
these sample sizes: ~1.0-1.1 in ``tests/test_reindex.py``), while vectors from another
distribution sit well above 2; 1.5 leaves room for sampling noise without retraining nightly.
Exact (flat) indexes have no quantization error and never drift.
"""

from __future__ import annotations

import faiss
import numpy as np

DRIFT_THRESHOLD = 1.5


def _codec(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index


def quantization_error(index: faiss.Index, vectors: np.ndarray) -> float:
    """Mean squared error of encoding then decoding ``vectors`` with the trained ``index``."""
    if len(vectors) == 0:
        return 0.0
    codec = _codec(index)
    if isinstance(codec, faiss.IndexFlat):
        return 0.0
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    decoded = codec.sa_decode(codec.sa_encode(x))
    return float(np.mean(np.sum((x - decoded) ** 2, axis=1)))


def drift_ratio(new_error: float, training_error: float) -> float:
    if training_error <= 0:
        return 1.0 if new_error <= 0 else float("inf")
    return new_error / training_error
