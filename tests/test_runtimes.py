"""Runtimes, batching and the worker plan.

* batched descriptors equal one-at-a-time descriptors (real images of several shapes);
* every runtime stays within a stated tolerance of TensorFlow fp32 on real photos;
* int8 calibration is deterministic (same sample -> byte-identical model);
* a runtime whose package is missing fails with an error naming the package;
* the runtime is part of the model fingerprint; converted models are cached;
* the GPU worker path (plan + placement) runs on a CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from retrieval import runtimes
from retrieval.descriptors.gem import GeMConfig, GeMExtractor, model_info
from retrieval.images import DecodedImage, decode_image
from retrieval.runtimes import (
    RUNTIMES,
    RuntimeNotInstalledError,
    load_runner,
    model_cache,
    parse_runtime,
)
from retrieval.runtimes import calibration as calibration_module
from retrieval.runtimes.batching import max_batch_images, plan_batches
from retrieval.runtimes.calibration import (
    BUILTIN_CALIBRATION,
    SCIKIT_IMAGE_PHOTOS,
    builtin_calibration_sample,
    calibration_sample,
    resolve_calibration,
)
from retrieval.runtimes.device import plan_worker


@pytest.fixture(scope="module")
def photos(oxford_images) -> list[DecodedImage]:
    """Real photos at the default size: several share a shape, some do not (portrait, 3:2)."""
    decoded = [decode_image(p.read_bytes(), max_side=362) for p in oxford_images[:40]]
    by_shape: dict[tuple[int, ...], list[DecodedImage]] = {}
    for image in decoded:
        by_shape.setdefault(image.pixels.shape, []).append(image)
    shapes = sorted(by_shape, key=lambda s: -len(by_shape[s]))
    assert len(shapes) >= 2, "the sample should hold at least two shapes"
    others = [by_shape[s][0] for s in shapes[2:4]]
    return by_shape[shapes[0]][:4] + by_shape[shapes[1]][:2] + others


@pytest.fixture(scope="module")
def calibration():
    """The int8 runtimes' default: the built-in sample (scikit-image's photos), at 362 px."""
    return resolve_calibration(None, image_size=362)


@pytest.fixture(scope="module")
def tf_reference(default_backbone, photos) -> np.ndarray:
    extractor = GeMExtractor(GeMConfig(runtime="tensorflow"), backbone=default_backbone)
    return np.stack([extractor.describe(image) for image in photos])


# --- batching ----------------------------------------------------------------------------------


def test_plan_batches_groups_by_shape_within_budget():
    shapes = [(272, 362), (362, 272), (272, 362), (272, 362), (241, 362), (272, 362)]
    per_image = 272 * 362 * 100
    batches = plan_batches(shapes, budget_bytes=2 * per_image + 1, bytes_per_pixel=100)
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))
    for batch in batches:
        assert len({shapes[i] for i in batch}) == 1
        assert len(batch) <= 2
    assert batches[0] == [0, 2]  # groups in order of first appearance, in input order
    assert [3, 5] in batches
    # a single image over the budget still runs, alone
    assert max_batch_images(4000, 3000, budget_bytes=1) == 1


@pytest.mark.parametrize("runtime", ["tensorflow", "tflite-fp32"])
def test_batched_equals_one_at_a_time(default_backbone, photos, runtime):
    extractor = GeMExtractor(
        GeMConfig(runtime=runtime), backbone=default_backbone, threads=2, batch_bytes=1 << 30
    )
    one_by_one = np.stack([extractor.describe(image) for image in photos])
    batched = extractor.describe_batch(photos)
    assert batched.shape == (len(photos), 1280)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4, rtol=0)
    # the batch really ran as one tensor: record the shapes the runner was given
    seen: list[tuple[int, ...]] = []
    real = extractor.runner.features

    def spy(pixels):
        seen.append(pixels.shape)
        return real(pixels)

    extractor.runner.features = spy
    extractor.describe_batch(photos)
    assert seen[0][0] == 4 and len(seen) < len(photos)


def test_multi_scale_batched_equals_one_at_a_time(tiny_backbone, photos):
    config = GeMConfig(backbone="test:tiny", runtime="tensorflow", scales=(0.5, 1.0))
    extractor = GeMExtractor(config, backbone=tiny_backbone)
    one_by_one = np.stack([extractor.describe(image) for image in photos])
    np.testing.assert_allclose(extractor.describe_batch(photos), one_by_one, atol=1e-5, rtol=0)


# --- runtimes against TensorFlow fp32 ----------------------------------------------------------

# (max |difference| of L2-normalized descriptors, min cosine) per runtime, on real photos.
TOLERANCE = {
    "tflite-fp32": (1e-4, 0.99999),
    "onnx-fp32": (1e-4, 0.99999),
    "tflite-fp16": (5e-3, 0.9999),
    "tflite-int8": (0.06, 0.98),
    "onnx-int8": (0.2, 0.85),
}


@pytest.mark.parametrize("runtime", sorted(TOLERANCE))
def test_runtime_close_to_tensorflow(default_backbone, photos, tf_reference, calibration, runtime):
    runner = load_runner(
        runtime, "efficientnet-lite0", backbone=default_backbone, threads=2, calibration=calibration
    )
    assert runner.name == runtime and runner.dim == 1280
    extractor = GeMExtractor(GeMConfig(runtime=runtime), backbone=default_backbone, runner=runner)
    got = extractor.describe_batch(photos)
    max_diff, min_cos = TOLERANCE[runtime]
    assert np.abs(got - tf_reference).max() <= max_diff
    assert (got * tf_reference).sum(axis=1).min() >= min_cos


# --- int8 calibration --------------------------------------------------------------------------


def test_calibration_sample_is_seeded(oxford_images):
    source = str(oxford_images[0].parent)
    a = calibration_sample(source, image_size=64, count=5, seed=0)
    b = calibration_sample(source, image_size=64, count=5, seed=0)
    c = calibration_sample(source, image_size=64, count=5, seed=1)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert len(a.uris) == 5 and a.uris != c.uris and a.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("runtime", ["tflite-int8", "onnx-int8"])
def test_int8_conversion_is_deterministic(tiny_backbone, oxford_images, runtime):
    sample = calibration_sample(str(oxford_images[0].parent), image_size=64, count=4, seed=0)
    spec = parse_runtime(runtime)
    convert = runtimes._convert
    first = convert(spec, tiny_backbone, sample)
    second = convert(spec, tiny_backbone, sample)
    assert first == second
    other = calibration_sample(str(oxford_images[0].parent), image_size=64, count=4, seed=3)
    assert convert(spec, tiny_backbone, other) != first  # the sample really is used


def test_builtin_calibration_sample_is_the_documented_one():
    """The default int8 sample: scikit-image's public-domain / CC0 photos, in their documented
    order, with the documented digests (the files are checked when their pixels are read)."""
    sample = resolve_calibration(None, image_size=64)
    assert sample == resolve_calibration(BUILTIN_CALIBRATION, image_size=64)
    assert sample.source == BUILTIN_CALIBRATION
    assert [Path(uri).name for uri in sample.uris] == [p.file for p in SCIKIT_IMAGE_PHOTOS]
    assert {p.licence for p in SCIKIT_IMAGE_PHOTOS} <= {"public domain", "CC0"}
    pixels = sample.images()
    assert len(pixels) == len(SCIKIT_IMAGE_PHOTOS) >= 8
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in pixels)
    assert all(max(p.shape[:2]) == 64 for p in pixels)
    # the fingerprint is of the bytes (pinned digests) and the size, not of where they live
    assert sample.fingerprint() != resolve_calibration(None, image_size=362).fingerprint()


def test_changed_calibration_image_is_refused(tmp_path):
    """A file whose bytes differ from the digest it was sampled (or documented) with would be
    another model under the same fingerprint: refused, naming the file."""
    sample = resolve_calibration(None, image_size=64)
    changed = tmp_path / "chelsea.png"
    data = bytearray(Path(sample.uris[1]).read_bytes())
    data[-20] ^= 0xFF
    changed.write_bytes(bytes(data))
    tampered = replace(sample, uris=(sample.uris[0], str(changed), *sample.uris[2:]))
    with pytest.raises(ValueError, match=r"chelsea\.png changed"):
        tampered.images()


def test_builtin_calibration_names_its_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "skimage" else real_find_spec(name, *a),
    )
    with pytest.raises(RuntimeNotInstalledError, match="'scikit-image'"):
        builtin_calibration_sample(image_size=64)


@pytest.mark.parametrize("runtime", ["tflite-int8", "onnx-int8"])
def test_builtin_int8_conversion_is_deterministic(tiny_backbone, oxford_images, runtime):
    sample = resolve_calibration(None, image_size=64)
    spec = parse_runtime(runtime)
    first = runtimes._convert(spec, tiny_backbone, sample)
    assert runtimes._convert(spec, tiny_backbone, sample) == first
    other = calibration_sample(str(oxford_images[0].parent), image_size=64, count=4, seed=0)
    assert runtimes._convert(spec, tiny_backbone, other) != first


def test_int8_without_calibration_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="calibration"):
        load_runner("tflite-int8", "test:tiny", backbone=tiny_backbone)


# --- missing packages, fingerprints, cache -----------------------------------------------------


@pytest.mark.parametrize(
    ("runtime", "modules", "package"),
    [
        ("tflite-fp32", ["ai_edge_litert", "ai_edge_litert.interpreter"], "ai-edge-litert"),
        ("onnx-fp32", ["onnxruntime"], "onnxruntime"),
    ],
)
def test_missing_runtime_package_is_named(tiny_backbone, monkeypatch, runtime, modules, package):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(RuntimeNotInstalledError, match=f"'{package}'"):
        load_runner(runtime, "test:tiny", backbone=tiny_backbone)


def test_runtime_is_part_of_the_fingerprint():
    hashes = {GeMConfig(runtime=r).config_hash() for r in RUNTIMES}
    ids = {GeMConfig(runtime=r).model_id for r in RUNTIMES}
    assert len(hashes) == len(ids) == len(RUNTIMES)
    with pytest.raises(ValueError, match="unknown runtime"):
        GeMConfig(runtime="tflite-int4")
    # the calibration set changes int8 models only
    assert (
        GeMConfig(runtime="tflite-fp32", calibration="a").config_hash()
        == GeMConfig(runtime="tflite-fp32", calibration="b").config_hash()
    )


def test_calibration_images_are_part_of_the_fingerprint(oxford_images, tmp_path):
    """int8 models are told apart by their calibration images' bytes, not only by the URI: the
    same folder with one changed image is another config hash; no URI means the built-in one."""
    builtin = GeMConfig(runtime="tflite-int8")
    assert builtin.config_hash() == (
        GeMConfig(runtime="tflite-int8", calibration=BUILTIN_CALIBRATION).config_hash()
    )
    folder = tmp_path / "calibration"
    folder.mkdir()
    for path in oxford_images[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    own = GeMConfig(runtime="tflite-int8", calibration=str(folder))
    before = own.config_hash()
    assert before != builtin.config_hash()
    info = model_info(own)
    assert info["config_hash"] == before and info["calibration"]["images"] == 3
    first = folder / oxford_images[0].name
    first.write_bytes(oxford_images[3].read_bytes())
    calibration_module._resolve.cache_clear()  # a new process would see the new bytes
    assert own.config_hash() != before


def test_converted_model_is_cached(tiny_backbone, monkeypatch, tmp_path):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    first = load_runner("tflite-fp32", "test:tiny", backbone=tiny_backbone)
    assert len(list(tmp_path.glob("*.tflite"))) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again despite a cached model")

    monkeypatch.setattr(runtimes, "_convert", no_conversion)
    again = load_runner("tflite-fp32", "test:tiny", backbone=tiny_backbone)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 40, 56, 3)).astype(np.float32)
    np.testing.assert_array_equal(first.features(pixels), again.features(pixels))
    # other weights -> another file
    with pytest.raises(AssertionError, match="converted again"):
        other = replace(tiny_backbone, weights_sha256="1" * 64)
        load_runner("tflite-fp32", "test:tiny", backbone=other)


def test_tflite_resizes_its_interpreters_instead_of_building_more(
    tiny_backbone, monkeypatch, tmp_path
):
    """More shapes than interpreters kept ready: the least recently used one is resized (no new
    model load), and every shape still gives what a fresh interpreter gives."""
    from retrieval.runtimes.tflite import MAX_READY_SHAPES, TFLiteRunner

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    runner = load_runner("tflite-fp32", "test:tiny", backbone=tiny_backbone)
    rng = np.random.default_rng(0)
    shapes = [(1, 40 + 4 * (i % 7), 56, 3) for i in range(3 * MAX_READY_SHAPES)]
    for shape in shapes:
        pixels = rng.uniform(0, 255, shape).astype(np.float32)
        fresh = TFLiteRunner(runner.path, name=runner.name).features(pixels)
        np.testing.assert_array_equal(runner.features(pixels), fresh)
    assert runner.interpreters_built == MAX_READY_SHAPES


# --- the GPU worker path, on a CPU -------------------------------------------------------------


def test_worker_plans():
    cpu = plan_worker("cpu", cores=2, workers=2)
    assert (cpu.device, cpu.inference_threads, cpu.decode_threads) == ("cpu", 1, 1)
    gpu = plan_worker("gpu", cores=16, gpu_memory=80 * 1024**3)
    assert gpu.device == "gpu" and gpu.decode_threads == 16
    assert gpu.batch_bytes == 40 * 1024**3
    assert gpu.max_batch_images >= 256 > cpu.max_batch_images
    with pytest.raises(ValueError):
        plan_worker("tpu")


def test_gpu_worker_path_runs_on_cpu(tiny_backbone, photos):
    """The GPU plan (big batches, decode fan-out) with GPU placement falls back to the CPU here
    and gives the CPU path's descriptors."""
    gpu = plan_worker("gpu", cores=2, gpu_memory=8 * 1024**3)
    config = GeMConfig(backbone="test:tiny", runtime="tensorflow")
    on_gpu = GeMExtractor(config, backbone=tiny_backbone, device="gpu", batch_bytes=gpu.batch_bytes)
    on_cpu = GeMExtractor(config, backbone=tiny_backbone)
    assert on_gpu.runner.device == "gpu"
    np.testing.assert_allclose(
        on_gpu.describe_batch(photos), on_cpu.describe_batch(photos), atol=1e-5, rtol=0
    )
