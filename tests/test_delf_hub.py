"""DELF through TensorFlow Hub: the real loading and calling code, on a small SavedModel built
here with DELF's signature (the hub itself cannot be reached from the test machines)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from support import DELF_TEST_DIM, save_tiny_delf

from retrieval.images import DecodedImage
from retrieval.local_features.delf_hub import DELF_SCALES, DelfExtractor
from retrieval.local_features.extractor import LocalFeatureConfig, build_local_extractor


@pytest.fixture(scope="module")
def tiny_delf(tmp_path_factory):
    return save_tiny_delf(tmp_path_factory.mktemp("delf") / "tiny_delf")


def _image(seed: int = 0, h: int = 96, w: int = 160) -> DecodedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    pixels[:, : w // 2] //= 4  # a dark left half: low attention there
    return DecodedImage(pixels, w, h)


def test_local_savedmodel_is_loaded_and_called_with_the_delf_signature(tiny_delf):
    config = LocalFeatureConfig(method=f"delf:{tiny_delf}", image_size=160, max_features=12)
    extractor = build_local_extractor(config)
    assert isinstance(extractor, DelfExtractor) and extractor.dim == DELF_TEST_DIM
    features = extractor.extract(_image())
    assert len(features) == 12  # max_feature_num is passed through
    assert features.descriptors.shape == (12, DELF_TEST_DIM)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-5)
    x, y = features.locations.T  # DELF's (y, x) turned into (x, y)
    assert x.max() < 160 and y.max() < 96 and x.max() > 96  # width is the longer side here
    assert (x >= 80).all()  # attention threshold 100 drops the dark half
    assert np.isclose(features.scales[:, None], DELF_SCALES, atol=1e-4).any(axis=1).all()
    info = extractor.info()
    assert info["delf"]["image_scales"] == list(DELF_SCALES)
    assert info["delf"]["score_threshold"] == 100.0 and len(info["weights_sha256"]) == 64


def test_hub_handle_is_read_from_the_hub_cache(tiny_delf, tmp_path, monkeypatch):
    """A handle already in TFHUB_CACHE_DIR (a sha1 of the handle) loads without a download."""
    handle = "https://tfhub.dev/google/delf/1"
    cache = tmp_path / "hub-cache"
    shutil.copytree(tiny_delf, cache / hashlib.sha1(handle.encode()).hexdigest())
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    extractor = DelfExtractor(LocalFeatureConfig(method=f"delf:{handle}", max_features=5))
    assert len(extractor.extract(_image(1))) == 5
    assert extractor.info()["delf"]["model"] == handle


def test_a_model_without_the_delf_signature_is_refused(tmp_path):
    from support import save_tiny_saved_model

    path = save_tiny_saved_model(tmp_path / "not_delf")
    with pytest.raises(ValueError, match="signature"):
        DelfExtractor(LocalFeatureConfig(method=f"delf:{path}"))
