"""The LiteRT (TensorFlow Lite) runtime with the XNNPACK delegate: fp32, fp16 and int8.

Conversion uses TensorFlow's converter on the same graph the TensorFlow runtime runs
(``tensorflow.feature_function``), with dynamic batch and size. Running needs only the
``ai-edge-litert`` package (no TensorFlow in the worker).

Precisions: ``fp32`` as is; ``fp16`` stores weights in half precision (half the file; XNNPACK
computes in fp32 on CPUs without fp16 arithmetic); ``int8`` quantizes weights (per channel) and
activations (ranges from the calibration sample), keeping float input and output.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.native_logs import filtered_stderr
from retrieval.runtimes.spec import require

if TYPE_CHECKING:
    from retrieval.backbones import Backbone
    from retrieval.runtimes.calibration import CalibrationSample

# Interpreters kept ready, one per input shape (the most recently used ones). A shape not among
# them resizes the least recently used interpreter instead of building a new one: building one
# loads the model and packs its weights for XNNPACK again (measured ~26 ms for int8, ~67 ms for
# fp32 per new shape on this machine), while resizing an existing one only re-plans its memory
# (~1-4 ms). Photos at a fixed longer side come in dozens of shapes (27 in the first 160
# oxford-dev images), so this is paid on about one image in four.
MAX_READY_SHAPES = 4


def convert_to_tflite(
    backbone: Backbone, precision: str, calibration: CalibrationSample | None = None
) -> bytes:
    import tensorflow as tf

    from retrieval.runtimes.tensorflow import feature_function

    concrete = feature_function(backbone).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], None)
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if calibration is None:
            raise ValueError("int8 conversion needs a calibration sample")
        images = calibration.images()

        def representative_dataset():
            for pixels in images:
                yield [pixels[np.newaxis].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
    elif precision != "fp32":
        raise ValueError(f"LiteRT precision must be fp32, fp16 or int8, not {precision!r}")
    with filtered_stderr():  # the converter prints its quantizer settings ("fully_quantize: ...")
        return converter.convert()


class TFLiteRunner:
    """Runs a converted ``.tflite`` backbone with XNNPACK on ``threads`` threads."""

    def __init__(self, path: Path | str, *, name: str, threads: int | None = None):
        self._interpreter_cls = require(
            "ai_edge_litert.interpreter", "ai-edge-litert", name
        ).Interpreter
        self.name = name
        self.path = str(path)
        self.threads = threads
        self._ready: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.interpreters_built = 0
        with filtered_stderr():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate for CPU."
            probe = self._interpreter((1, 64, 64, 3))
        self.dim = int(probe.get_output_details()[0]["shape"][-1])

    def _interpreter(self, shape: tuple[int, ...]):
        interpreter = self._ready.get(shape)
        if interpreter is not None:
            self._ready.move_to_end(shape)
            return interpreter
        if len(self._ready) >= MAX_READY_SHAPES:
            _, interpreter = self._ready.popitem(last=False)  # resize the least recently used
        else:
            interpreter = self._interpreter_cls(model_path=self.path, num_threads=self.threads)
            self.interpreters_built += 1
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(shape))
        interpreter.allocate_tensors()
        self._ready[shape] = interpreter
        return interpreter

    def features(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        interpreter = self._interpreter(tuple(pixels.shape))
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
        interpreter.invoke()
        # get_tensor copies, so the next invoke cannot overwrite what we return.
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
