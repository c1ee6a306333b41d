"""GeM global descriptors: backbone feature map -> generalized-mean pooling -> L2 norm.

Single- or multi-scale. Multi-scale follows cnnimageretrieval-pytorch: each scale's descriptor is
L2-normalized, the p-th powers are averaged, the p-th root is taken, and the result normalized.

The backbone runs in a runtime (``retrieval/runtimes``: TensorFlow, LiteRT or ONNX Runtime) on
real batches: images of the same resized shape go through it as one tensor
(``runtimes/batching.py``); pooling is NumPy, the same for every runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from retrieval.backbones import (
    DEFAULT_BACKBONE,
    Backbone,
    backbone_identity,
    load_backbone,
)
from retrieval.descriptors.pooling import gem, l2_normalize
from retrieval.images import DecodedImage
from retrieval.redaction import redact
from retrieval.runtimes import (
    DEFAULT_RUNTIME,
    BackboneRunner,
    converted_model,
    load_runner,
    parse_runtime,
)
from retrieval.runtimes.batching import DEFAULT_CPU_BATCH_BYTES, plan_batches
from retrieval.runtimes.calibration import BUILTIN_CALIBRATION, CalibrationSample

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
    runtime: str = DEFAULT_RUNTIME  # see retrieval/runtimes; part of the hash: shards never mix
    # images the int8 runtimes calibrate on (calibration.py); None: the built-in sample
    calibration: str | None = None

    def __post_init__(self) -> None:
        parse_runtime(self.runtime)
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
        return f"gem-p{self.p:g}/{self.backbone}@{self.image_size}{scales}/{self.runtime}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        if parse_runtime(self.runtime).needs_calibration:
            d["calibration"] = self.calibration or BUILTIN_CALIBRATION
        else:
            del d["calibration"]  # only int8 depends on it
        return d

    def config_hash(self) -> str:
        """Hash of the config and, for int8 runtimes, of the calibration images' bytes (so the
        same ``--calibration`` URI over changed images is another model)."""
        described = self.as_dict()
        sample = _calibration(self)
        if sample is not None:
            described["calibration_sha256"] = sample.fingerprint()
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def model_info(config: GeMConfig, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What manifests record about the model: id, config and its hash, weights checksum.

    Without ``identity`` it is read from the backbone spec (cheap for the default backbone).
    """
    identity = identity or backbone_identity(config.backbone)
    info = {
        # Recorded in every manifest and summary: a URI in the spec is masked (redaction).
        "id": redact(config.model_id),
        "config": {k: redact(v) if isinstance(v, str) else v for k, v in config.as_dict().items()},
        "config_hash": config.config_hash(),
        "weights_sha256": identity["weights_sha256"],
        "preprocessing": {
            **identity["preprocessing"],
            "resize": "longer side to image_size x scale, once from the decoded image, "
            "bilinear, shrink only",
        },
        "dim": identity["dim"],
        "runtime": config.runtime,
    }
    sample = _calibration(config)
    if sample is not None:
        info["calibration"] = {
            "source": redact(sample.source),
            "images": len(sample.uris),
            "sha256": sample.fingerprint(),
        }
    return info


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
    """GeM descriptors over a backbone run by a runtime; build one per worker (it holds the model).

    ``backbone`` (a TensorFlow model) is needed by the ``tensorflow`` runtime and to convert on a
    cold cache; converted runtimes otherwise load the cached file. ``runner`` overrides both.
    ``batch_bytes`` is the activation memory budget of one batch (``runtimes/batching.py``).
    """

    config: GeMConfig = field(default_factory=GeMConfig)
    backbone: Backbone | None = None
    runner: BackboneRunner | None = None
    threads: int | None = None
    device: str = "cpu"
    batch_bytes: int = DEFAULT_CPU_BATCH_BYTES

    def __post_init__(self) -> None:
        runtime = parse_runtime(self.config.runtime)
        if self.backbone is None and runtime.engine == "tensorflow":
            self.backbone = load_backbone(self.config.backbone)
        identity = (
            {
                "dim": self.backbone.dim,
                "weights_sha256": self.backbone.weights_sha256,
                "preprocessing": self.backbone.preprocessing,
            }
            if self.backbone is not None
            else backbone_identity(self.config.backbone)
        )
        self._identity = identity
        if self.runner is None:
            self.runner = load_runner(
                self.config.runtime,
                self.config.backbone,
                backbone=self.backbone,
                threads=self.threads,
                device=self.device,
                calibration=_calibration(self.config),
                weights_sha256=identity["weights_sha256"],
            )

    @property
    def dim(self) -> int:
        return int(self._identity["dim"])

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def info(self) -> dict[str, Any]:
        """Model description for manifests and reports."""
        return model_info(self.config, self._identity)

    def describe(self, image: DecodedImage) -> np.ndarray:
        """The L2-normalized float32 descriptor of one image."""
        return self.describe_batch([image])[0]

    def describe_batch(self, images: list[DecodedImage]) -> np.ndarray:
        """Descriptors of several images as an (n, dim) float32 array, rows in input order.

        Images of the same resized shape run through the backbone as one tensor, in batches that
        fit ``batch_bytes``; the result equals describing them one at a time (within float
        rounding: tested to 1e-4).
        """
        if not images:
            return np.zeros((0, self.dim), np.float32)
        p = self.config.p
        if len(self.config.scales) == 1:
            size = round(self.config.image_size * self.config.scales[0])
            pooled = self._pool([image.at_side(size) for image in images])
            return l2_normalize(pooled).astype(np.float32)
        acc = np.zeros((len(images), self.dim), np.float64)
        for scale in self.config.scales:
            size = round(self.config.image_size * scale)
            pooled = self._pool([image.at_side(size) for image in images])
            acc += np.power(l2_normalize(pooled), p)
        return l2_normalize(np.power(acc / len(self.config.scales), 1.0 / p)).astype(np.float32)

    def _pool(self, pixels: list[np.ndarray]) -> np.ndarray:
        """GeM (not yet normalized) of each image, float64 (n, dim)."""
        assert self.runner is not None
        out = np.empty((len(pixels), self.dim), np.float64)
        for batch in plan_batches([a.shape[:2] for a in pixels], self.batch_bytes):
            stacked = np.stack([pixels[i] for i in batch]).astype(np.float32)
            out[batch] = gem(self.runner.features(stacked), self.config.p)
        return out


def prepare_runtime(config: GeMConfig) -> None:
    """Convert the backbone for ``config.runtime`` into the local cache if it is not there yet
    (launchers call this once, so local workers all find a warm cache)."""
    if parse_runtime(config.runtime).engine != "tensorflow":
        converted_model(config.runtime, config.backbone, calibration=_calibration(config))


def _calibration(config: GeMConfig) -> CalibrationSample | None:
    if not parse_runtime(config.runtime).needs_calibration:
        return None
    from retrieval.runtimes.calibration import resolve_calibration

    return resolve_calibration(config.calibration, image_size=config.image_size)
