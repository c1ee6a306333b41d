"""Runtimes that run the backbone: one interface, several engines.

A runtime maps a batch of RGB pixels (N, H, W, 3), float32 in [0, 255], to the backbone's feature
map (N, h, w, C), float32. GeM pooling happens after it, in NumPy (``descriptors/gem.py``), so
every runtime shares one pooling and only the backbone differs.

Names (``--runtime``):

``tensorflow``     the Keras/TF model as built (fp32; the reference; uses a GPU when one is visible)
``tflite-fp32``    LiteRT (TensorFlow Lite) with the XNNPACK delegate, fp32
``tflite-fp16``    LiteRT, weights stored as fp16 (XNNPACK computes in fp32 on CPUs without fp16)
``tflite-int8``    LiteRT, int8 weights and activations, calibrated on a sample (``calibration.py``)
``onnx-fp32``      ONNX Runtime (converted with tf2onnx), fp32; CUDA provider on a GPU if present
``onnx-int8``      ONNX Runtime, static QDQ int8 quantization, calibrated like ``tflite-int8``

Converted models are cached on disk keyed by the weights fingerprint, the runtime, the converter
versions and the calibration sample (``model_cache.py``); only a cold cache needs TensorFlow.
The names, the runner interface and the missing-package error are in ``spec.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.runtimes.spec import (
    DEFAULT_RUNTIME,
    RUNTIMES,
    BackboneRunner,
    RuntimeNotInstalledError,
    RuntimeSpec,
    parse_runtime,
    require,
)

if TYPE_CHECKING:
    from retrieval.backbones import Backbone
    from retrieval.runtimes.calibration import CalibrationSample

# What callers import from the package; the names, the runner interface and the missing-package
# error are defined in spec.py, which the engines import instead of this package.
__all__ = [
    "DEFAULT_RUNTIME",
    "RUNTIMES",
    "BackboneRunner",
    "RuntimeNotInstalledError",
    "converted_model",
    "load_runner",
    "parse_runtime",
]


def load_runner(
    runtime: str,
    backbone_spec: str,
    *,
    backbone: Backbone | None = None,
    threads: int | None = None,
    device: str = "cpu",
    calibration: CalibrationSample | None = None,
    weights_sha256: str | None = None,
) -> BackboneRunner:
    """Build the runner for ``runtime``, converting (and caching) the backbone if needed.

    ``backbone`` is the TensorFlow model when the caller already has it; converted runtimes only
    build it on a cold cache. ``weights_sha256`` keys the cache (read from the backbone spec when
    not given). ``device`` "gpu" asks for the GPU where the runtime has one (TF, ONNX CUDA).
    """
    spec = parse_runtime(runtime)
    if spec.engine == "tensorflow":
        from retrieval.runtimes.tensorflow import TensorFlowRunner

        return TensorFlowRunner(_backbone(backbone, backbone_spec), device=device)
    path = converted_model(
        runtime,
        backbone_spec,
        backbone=backbone,
        calibration=calibration,
        weights_sha256=weights_sha256,
    )
    if spec.engine == "tflite":
        from retrieval.runtimes.tflite import TFLiteRunner

        return TFLiteRunner(path, name=runtime, threads=threads)
    from retrieval.runtimes.onnx import OnnxRunner

    return OnnxRunner(path, name=runtime, threads=threads, device=device)


def converted_model(
    runtime: str,
    backbone_spec: str,
    *,
    backbone: Backbone | None = None,
    calibration: CalibrationSample | None = None,
    weights_sha256: str | None = None,
) -> Path:
    """The cached file of ``backbone_spec`` converted for ``runtime``, converting it on a miss.

    Launchers call this once before starting local workers, so they find a warm cache instead
    of each converting the same model.
    """
    spec = parse_runtime(runtime)
    if spec.engine == "tensorflow":
        raise ValueError("the tensorflow runtime runs the model as built: nothing to convert")
    if spec.needs_calibration and calibration is None:
        raise ValueError(
            f"runtime {runtime!r} quantizes activations and needs a calibration sample: "
            "give --calibration URI (a folder or manifest of representative images)"
        )
    # Check the runtime package first, so a missing one fails before any conversion work.
    if spec.engine == "tflite":
        require("ai_edge_litert.interpreter", "ai-edge-litert", runtime)
    else:
        require("onnxruntime", "onnxruntime", runtime)
    if weights_sha256 is None and backbone is not None:
        weights_sha256 = backbone.weights_sha256
    if weights_sha256 is None:
        from retrieval.backbones import backbone_identity

        weights_sha256 = backbone_identity(backbone_spec)["weights_sha256"]
    from retrieval.runtimes import model_cache

    key = model_cache.cache_key(backbone_spec, weights_sha256, spec, calibration)
    path = model_cache.cached_path(key, suffix=".tflite" if spec.engine == "tflite" else ".onnx")
    if not path.exists():
        model = _convert(spec, _backbone(backbone, backbone_spec), calibration)
        model_cache.store(path, model)
    return path


def _backbone(backbone: Backbone | None, spec: str) -> Backbone:
    if backbone is not None:
        return backbone
    from retrieval.backbones import load_backbone

    return load_backbone(spec)


def _convert(spec: RuntimeSpec, backbone: Backbone, calibration: CalibrationSample | None) -> bytes:
    if spec.engine == "tflite":
        from retrieval.runtimes.tflite import convert_to_tflite

        return convert_to_tflite(backbone, spec.precision, calibration)
    from retrieval.runtimes.onnx import convert_to_onnx

    return convert_to_onnx(backbone, spec.precision, calibration)
