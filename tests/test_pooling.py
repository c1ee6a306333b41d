"""GeM pooling against a direct reference, and the extractor's single- and multi-scale output."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from retrieval.descriptors.gem import GeMConfig, GeMExtractor
from retrieval.descriptors.pooling import gem, gem_tf, l2_normalize
from retrieval.images import DecodedImage


def gem_reference(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    """(N, H, W, C) -> (N, C), one number at a time, in float64."""
    n, h, w, c = x.shape
    out = np.zeros((n, c), np.float64)
    for i in range(n):
        for k in range(c):
            total = 0.0
            for y in range(h):
                for z in range(w):
                    total += max(float(x[i, y, z, k]), eps) ** p
            out[i, k] = (total / (h * w)) ** (1.0 / p)
    return out


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 2.0, size=(2, 5, 4, 3))
    x[0, 0, 0, 0] = -1.0  # negative activations are clamped to eps, as in the paper's code
    x[1, :, :, 2] = 0.0  # an all-zero channel pools to eps
    return x


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_matches_reference(features, p):
    expected = gem_reference(features, p)
    np.testing.assert_allclose(gem(features, p), expected, rtol=1e-12)
    got_tf = gem_tf(tf.constant(features, tf.float32), p).numpy()
    assert got_tf.shape == (2, 3)
    np.testing.assert_allclose(got_tf, expected, rtol=2e-5, atol=1e-6)


def test_gem_p1_is_average_pooling(features):
    clamped = np.maximum(features, 1e-6)
    np.testing.assert_allclose(gem(features, 1.0), clamped.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(
        gem_tf(tf.constant(features, tf.float32), 1.0).numpy(), clamped.mean(axis=(1, 2)), rtol=1e-5
    )


def test_gem_large_p_approaches_max_pooling():
    # Positive activations only: eps**p underflows to 0 for large p, as in any float GeM.
    features = np.random.default_rng(3).uniform(0.05, 2.0, size=(2, 5, 4, 3))
    top = features.max(axis=(1, 2))
    cells = features.shape[1] * features.shape[2]
    previous = None
    for p in (4.0, 16.0, 64.0):
        pooled = gem(features, p)
        # mean(x^p)^(1/p) lies between max·(1/HW)^(1/p) and max.
        assert np.all(pooled <= top * (1 + 1e-12))
        assert np.all(pooled >= top * (1.0 / cells) ** (1.0 / p) * (1 - 1e-12))
        if previous is not None:
            assert np.all(pooled >= previous - 1e-12)  # power means grow with p
        previous = pooled
    np.testing.assert_allclose(gem(features, 64.0), top, rtol=0.05)
    np.testing.assert_allclose(
        gem_tf(tf.constant(features, tf.float32), 64.0).numpy(), top, rtol=0.05
    )


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]])
    out = l2_normalize(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]])
    v = np.random.default_rng(2).standard_normal(17)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(v)), 1.0, rtol=1e-12)


def _image(width: int, height: int, seed: int = 0) -> DecodedImage:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return DecodedImage(pixels, width, height)


# The pooling formulas are checked on the fp32 LiteRT runtime, whose conversion keeps the model's
# arithmetic (the int8 default's distance to it is test_runtimes' business).
FP32 = "tflite-fp32"


def test_single_scale_descriptor(tiny_backbone):
    config = GeMConfig(backbone="test:tiny", image_size=64, runtime=FP32)
    extractor = GeMExtractor(config, backbone=tiny_backbone)
    image = _image(64, 40)
    d = extractor.describe(image)
    assert d.dtype == np.float32 and d.shape == (8,) == (extractor.dim,)
    assert np.linalg.norm(d) == pytest.approx(1.0, abs=1e-6)

    fmap = tiny_backbone.model(
        tiny_backbone.preprocess(tf.constant(image.pixels[np.newaxis], tf.float32))
    ).numpy()
    np.testing.assert_allclose(d, l2_normalize(gem_reference(fmap, 3.0))[0], atol=1e-5)

    batch = extractor.describe_batch([image, _image(50, 50, seed=1)])
    assert batch.shape == (2, 8) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], d, atol=1e-6)
    assert extractor.describe_batch([]).shape == (0, 8)

    info = extractor.info()
    assert info["dim"] == 8 and info["weights_sha256"] == "0" * 64
    assert info["config_hash"] == config.config_hash()


def test_single_scale_shrinks_larger_images(tiny_backbone):
    config = GeMConfig(backbone="test:tiny", image_size=48)
    extractor = GeMExtractor(config, backbone=tiny_backbone)
    image = _image(96, 60)
    small = np.asarray(Image.fromarray(image.pixels).resize((48, 30), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(
        extractor.describe(image), extractor.describe(DecodedImage(small, 96, 60)), atol=1e-6
    )


def test_multi_scale_matches_cnnimageretrieval_formula(tiny_backbone):
    scales, size, p = (0.5, 1.0, 1.414), 64, 3.0
    multi = GeMExtractor(
        GeMConfig(backbone="test:tiny", image_size=size, scales=scales, p=p, runtime=FP32),
        backbone=tiny_backbone,
    )
    assert multi.config.max_side == round(size * 1.414) == 90
    image = _image(90, 70)  # decoded at max_side, as the pipeline does

    # cnnimageretrieval-pytorch extract_ms: v = sum_s l2n(d_s)^p / S; v = v^(1/p); v /= ||v||,
    # with d_s the single-scale descriptor of the image resized to image_size * s.
    single = GeMExtractor(
        GeMConfig(backbone="test:tiny", image_size=1000, p=p, runtime=FP32), backbone=tiny_backbone
    )
    acc = np.zeros(8, np.float64)
    for s in scales:
        target = round(size * s)
        pixels = image.pixels
        if max(pixels.shape[:2]) > target:
            factor = target / max(pixels.shape[:2])
            new = (round(pixels.shape[1] * factor), round(pixels.shape[0] * factor))
            pixels = np.asarray(Image.fromarray(pixels).resize(new, Image.Resampling.BILINEAR))
        d_s = single.describe(DecodedImage(pixels, image.width, image.height)).astype(np.float64)
        assert np.linalg.norm(d_s) == pytest.approx(1.0, abs=1e-6)
        acc += d_s**p
    v = (acc / len(scales)) ** (1.0 / p)
    expected = v / np.linalg.norm(v)

    got = multi.describe(image)
    assert got.dtype == np.float32 and np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # ... and it is not simply the scale-1 descriptor.
    assert not np.allclose(
        got,
        single.describe(
            DecodedImage(
                np.asarray(
                    Image.fromarray(image.pixels).resize((64, 50), Image.Resampling.BILINEAR)
                ),
                90,
                70,
            )
        ),
        atol=1e-4,
    )
    assert multi.config.model_id.endswith(f"@64x0.5-1-1.414/{multi.config.runtime}")


@pytest.mark.parametrize(
    "bad", [dict(image_size=16), dict(scales=()), dict(scales=(1.0, -1.0)), dict(p=0.0)]
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GeMConfig(**bad)


def test_gem_input_is_resized_once_from_the_decode_shared_with_local_features(
    tiny_backbone, tmp_path
):
    """With local features on, one decode serves both models at 640 px; GeM's 362 px input is
    resized from the decoded image, not again from the 640 px copy, so GeM gets the same pixels
    and descriptor as when it decodes alone."""
    from retrieval.corpus import ImageRef
    from retrieval.extraction import decode_sides, load_image
    from retrieval.images import DecodeLimits

    # 700 px, textured: no DCT scaling (PNG) and no box reduction for either decode (< 2 x 362)
    pixels = (np.random.default_rng(0).random((500, 700, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    ref = ImageRef("x", str(tmp_path / "x.png"))
    config = GeMConfig(backbone="test:tiny", image_size=362, runtime=FP32)
    extractor = GeMExtractor(config, backbone=tiny_backbone)

    alone = load_image(ref, max_side=config.max_side, limits=DecodeLimits())
    side, also = decode_sides(config, 640)
    assert (side, also) == (640, (362,))
    shared = load_image(ref, max_side=side, also_sides=also, limits=DecodeLimits())
    assert shared.image.pixels.shape == (457, 640, 3)  # the local features' copy
    np.testing.assert_array_equal(shared.image.at_side(362), alone.image.pixels)
    np.testing.assert_allclose(
        extractor.describe(shared.image), extractor.describe(alone.image), atol=1e-6
    )
    assert decode_sides(config, None) == (362, ())  # GeM alone: no extra copy
    assert decode_sides(config, 300) == (362, ())  # the larger side is GeM's own
