"""Converted models on local disk, keyed by everything that changes them.

The key covers the backbone spec and its weights fingerprint, the runtime and precision, the
converter versions, and for int8 the calibration sample's digest; a change to any of them is a new
file, so a stale conversion is never reused. Files are written to a temporary name and renamed,
so worker processes converting at the same time never read half a file.

Location: ``$RETRIEVAL_MODEL_CACHE`` or ``~/.cache/cbir-retrieval/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.runtimes.calibration import CalibrationSample
    from retrieval.runtimes.spec import RuntimeSpec

CACHE_ENV = "RETRIEVAL_MODEL_CACHE"
# Version of the conversion code itself: bump when convert_to_* changes what it writes.
CONVERSION_VERSION = 1
_CONVERTERS = {"tflite": ("tensorflow",), "onnx": ("tensorflow", "tf2onnx", "onnx", "onnxruntime")}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "cbir-retrieval", "models"
    )
    return Path(root)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def cache_key(
    backbone_spec: str,
    weights_sha256: str,
    runtime: RuntimeSpec,
    calibration: CalibrationSample | None,
) -> str:
    """A short hash naming one converted model."""
    parts = {
        "backbone": backbone_spec,
        "weights_sha256": weights_sha256,
        "runtime": runtime.name,
        "conversion": CONVERSION_VERSION,
        "converters": {p: _version(p) for p in _CONVERTERS[runtime.engine]},
        "calibration": calibration.fingerprint()
        if runtime.needs_calibration and calibration
        else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_path(key: str, suffix: str) -> Path:
    return cache_dir() / f"{key}{suffix}"


def store(path: Path, model: bytes) -> None:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
