"""Backbone specs: SavedModel / TF-Hub folders, Keras applications, and the default's identity."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import TINY_CHANNELS, save_tiny_saved_model, tiny_kernel

from retrieval.backbones import backbone_identity, load_backbone, weights_fingerprint
from retrieval.descriptors.gem import GeMConfig, GeMExtractor
from retrieval.descriptors.pooling import gem, l2_normalize
from retrieval.images import DecodedImage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory) -> Path:
    return save_tiny_saved_model(tmp_path_factory.mktemp("savedmodel") / "tiny")


def _image(height: int = 40, width: int = 56, seed: int = 1) -> DecodedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedImage(pixels, width, height)


# --- SavedModel / TF-Hub -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["savedmodel:", "hub:"])
def test_saved_model_backbone(tiny_saved_model: Path, prefix: str):
    spec = prefix + str(tiny_saved_model)
    backbone = load_backbone(spec)
    again = load_backbone(spec)
    assert backbone.spec == spec
    assert backbone.dim == TINY_CHANNELS
    assert len(backbone.weights_sha256) == 64
    assert backbone.weights_sha256 == again.weights_sha256
    assert backbone.weights_sha256 == hashlib.sha256(tiny_kernel().tobytes()).hexdigest()
    assert backbone.preprocessing == {"color": "RGB", "scale": "x/255"}

    # fp32 LiteRT: a conversion that keeps the model's arithmetic, so the descriptor can be
    # checked against the SavedModel's own output (the int8 default is checked in test_runtimes)
    config = GeMConfig(backbone=spec, image_size=64, runtime="tflite-fp32")
    extractor = GeMExtractor(config, backbone=backbone)
    image = _image()
    descriptor = extractor.describe(image)
    assert descriptor.shape == (TINY_CHANNELS,) and descriptor.dtype == np.float32
    assert np.linalg.norm(descriptor) == pytest.approx(1.0, abs=1e-5)

    features = backbone.model(image.pixels[np.newaxis].astype(np.float32) / 255.0).numpy()
    assert features.shape == (1, 20, 28, TINY_CHANNELS)
    expected = l2_normalize(gem(features, p=3.0))[0]
    np.testing.assert_allclose(descriptor, expected, atol=1e-5)


def test_saved_model_extractor_builds_its_own_backbone(tiny_saved_model: Path):
    spec = "savedmodel:" + str(tiny_saved_model)
    extractor = GeMExtractor(GeMConfig(backbone=spec, image_size=64))
    assert extractor.dim == TINY_CHANNELS
    info = extractor.info()
    assert info["dim"] == TINY_CHANNELS
    assert info["weights_sha256"] == load_backbone(spec).weights_sha256
    assert backbone_identity(spec)["weights_sha256"] == info["weights_sha256"]
    assert np.linalg.norm(extractor.describe(_image())) == pytest.approx(1.0, abs=1e-5)


def test_saved_models_with_other_weights_have_other_fingerprints(tmp_path: Path):
    # A plain tf.Module exports no ``variables`` attribute: the fingerprint must still see them.
    other = load_backbone("savedmodel:" + str(save_tiny_saved_model(tmp_path / "o", seed=1)))
    assert other.weights_sha256 == hashlib.sha256(tiny_kernel(1).tobytes()).hexdigest()
    assert other.weights_sha256 != weights_fingerprint([])


def test_saved_model_without_feature_map_is_refused(tmp_path: Path):
    path = save_tiny_saved_model(tmp_path / "pooled", feature_map=False)
    with pytest.raises(ValueError, match="feature map"):
        load_backbone("savedmodel:" + str(path))


# --- Keras applications ------------------------------------------------------------------------


def test_keras_application_with_random_weights():
    backbone = load_backbone("keras:MobileNetV3Small@none")
    assert backbone.dim == 576
    assert len(backbone.weights_sha256) == 64
    extractor = GeMExtractor(
        GeMConfig(backbone="keras:MobileNetV3Small@none", image_size=64), backbone=backbone
    )
    descriptor = extractor.describe(_image(48, 64))
    assert descriptor.shape == (576,)
    assert np.isfinite(descriptor).all()
    assert np.linalg.norm(descriptor) == pytest.approx(1.0, abs=1e-5)


def test_keras_application_from_weights_file(tmp_path: Path):
    import tensorflow as tf

    model = tf.keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(None, None, 3)
    )
    weights = tmp_path / "w.weights.h5"
    model.save_weights(str(weights))
    backbone = load_backbone(f"keras:MobileNetV3Small@{weights}")
    assert backbone.dim == 576
    assert backbone.weights_sha256 == weights_fingerprint(model.weights)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("keras:NoSuchNet@none", "tf.keras.applications has no model 'NoSuchNet'"),
        ("torch:resnet50", "unknown backbone 'torch:resnet50'.*'savedmodel:<path>'"),
        ("keras:", "unknown backbone 'keras:'"),
        ("savedmodel:", "unknown backbone"),
    ],
)
def test_unknown_backbones_are_refused(spec: str, message: str):
    with pytest.raises(ValueError, match=message):
        load_backbone(spec)


# --- the default backbone's identity -----------------------------------------------------------


def test_default_identity_matches_the_built_backbone(default_backbone):
    identity = backbone_identity("efficientnet-lite0")
    assert identity["dim"] == default_backbone.dim == 1280
    assert identity["weights_sha256"] == default_backbone.weights_sha256
    assert identity["preprocessing"] == default_backbone.preprocessing


def test_default_identity_does_not_import_tensorflow():
    code = (
        "import json, sys\n"
        "from retrieval.backbones import backbone_identity\n"
        "identity = backbone_identity('efficientnet-lite0')\n"
        "print(json.dumps(identity))\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    identity_line, imported = result.stdout.strip().splitlines()[-2:]
    assert imported == "False"
    assert json.loads(identity_line) == backbone_identity("efficientnet-lite0")
