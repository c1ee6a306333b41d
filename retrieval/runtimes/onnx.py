"""The ONNX Runtime runtime: fp32 and int8 (static QDQ quantization).

Conversion: tf2onnx on the graph the TensorFlow runtime runs (``tensorflow.feature_function``,
dynamic batch and size, opset 17); int8 then quantizes weights per channel and activations with
ranges from the calibration sample (ONNX Runtime's ``quantize_static``, MinMax). Running needs
only ``onnxruntime``; with ``device="gpu"`` the CUDA provider is used when it is available.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.runtimes.spec import require

if TYPE_CHECKING:
    from retrieval.backbones import Backbone
    from retrieval.runtimes.calibration import CalibrationSample

OPSET = 17
INPUT_NAME = "image"


def convert_to_onnx(
    backbone: Backbone, precision: str, calibration: CalibrationSample | None = None
) -> bytes:
    import tensorflow as tf

    from retrieval.runtimes.tensorflow import feature_function

    name = f"onnx-{precision}"
    tf2onnx = require("tf2onnx", "tf2onnx", name)
    require("onnx", "onnx", name)
    spec = [tf.TensorSpec([None, None, None, 3], tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_function(
        feature_function(backbone), input_signature=spec, opset=OPSET
    )
    model = _canonical_names(proto).SerializeToString()
    if precision == "fp32":
        return model
    if precision != "int8":
        raise ValueError(f"ONNX precision must be fp32 or int8, not {precision!r}")
    if calibration is None:
        raise ValueError("int8 conversion needs a calibration sample")
    return _quantize_int8(model, calibration)


def _canonical_names(model):
    """Rename nodes, internal tensors and dynamic dimensions by position, and drop the graph's
    doc string: tf2onnx numbers the names it makes from a process-wide counter, so the same model
    would convert to different bytes on a second call (int8 calibration must be repeatable)."""
    graph = model.graph
    graph.doc_string = ""
    keep = {t.name for t in graph.input} | {t.name for t in graph.output}
    dims: dict[str, str] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = dims.setdefault(dim.dim_param, f"d{len(dims)}")
    renamed: dict[str, str] = {}
    for i, tensor in enumerate(graph.initializer):
        renamed[tensor.name] = f"w{i}"
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        for j, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = f"t{i}_{j}"
    for tensor in graph.initializer:
        tensor.name = renamed[tensor.name]
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    return model


def _quantize_int8(model: bytes, calibration: CalibrationSample) -> bytes:
    quantization = require("onnxruntime.quantization", "onnxruntime", "onnx-int8")
    images = calibration.images()

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(images)

        def get_next(self):
            pixels = next(self._next, None)
            if pixels is None:
                return None
            return {INPUT_NAME: pixels[np.newaxis].astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="onnx-int8-") as tmp:
        source, target = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(model)
        quantization.quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        return target.read_bytes()


class OnnxRunner:
    """Runs a converted ``.onnx`` backbone in ONNX Runtime on ``threads`` threads (or a GPU)."""

    def __init__(
        self, path: Path | str, *, name: str, threads: int | None = None, device: str = "cpu"
    ):
        ort = require("onnxruntime", "onnxruntime", name)
        self.name = name
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self.dim = int(self.features(np.zeros((1, 64, 64, 3), np.float32)).shape[-1])

    def features(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self._session.run(None, {self._input: pixels})[0]
