"""What a runtime is: the names ``--runtime`` takes, a name parsed into engine and precision,
the interface every engine's runner offers, and how a missing engine package is reported.

The engines (``tensorflow.py``, ``tflite.py``, ``onnx.py``), ``calibration.py`` and
``model_cache.py`` import these; the package's ``__init__`` builds a runner by name and so imports
the engines. Kept apart from it so that no engine imports the package that imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

RUNTIMES = ("tensorflow", "tflite-fp32", "tflite-fp16", "tflite-int8", "onnx-fp32", "onnx-int8")
# The fastest runtime whose oxford-dev mAP is within 0.5 points of TensorFlow fp32 (README,
# "Runtimes"); --runtime picks another.
DEFAULT_RUNTIME = "tflite-int8"


class RuntimeNotInstalledError(ImportError):
    """A runtime whose Python package is missing; the message names the package to install."""


@dataclass(frozen=True)
class RuntimeSpec:
    engine: str  # "tensorflow", "tflite", "onnx"
    precision: str  # "fp32", "fp16", "int8"

    @property
    def name(self) -> str:
        return "tensorflow" if self.engine == "tensorflow" else f"{self.engine}-{self.precision}"

    @property
    def needs_calibration(self) -> bool:
        return self.precision == "int8"


def parse_runtime(name: str) -> RuntimeSpec:
    """``tflite-int8`` -> RuntimeSpec("tflite", "int8"); unknown names are refused by name."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    if name == "tensorflow":
        return RuntimeSpec("tensorflow", "fp32")
    engine, _, precision = name.partition("-")
    return RuntimeSpec(engine, precision)


class BackboneRunner(Protocol):
    """What every runtime offers: run the backbone on a batch of same-sized images."""

    name: str
    dim: int

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) float32 RGB in [0, 255] -> (N, h, w, C) float32 feature map."""
        ...


def require(module: str, package: str, runtime: str) -> Any:
    """Import ``module`` or fail with an error that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeNotInstalledError(
            f"runtime {runtime!r} needs the Python package {package!r} "
            f"(pip install {package}), which is not installed: {exc}"
        ) from None
