"""RootSIFT extraction, local-feature shards (Parquet round trip, schema checks) and spatial
verification on real oxford-dev photos."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import OXFORD_IMAGES

import schemas
from retrieval import checksums, plan, shard_manifests, storage
from retrieval.corpus import ImageRef, ShardSpec
from retrieval.images import decode_image
from retrieval.local_features.features import (
    LocalFeatureConfig,
    LocalFeatures,
    decode_descriptors,
    encode_descriptors,
)
from retrieval.local_features.rootsift import RootSIFTExtractor, root_normalize
from retrieval.rerank.spatial import (
    VerificationConfig,
    count_inliers,
    match_features,
    rerank_by_inliers,
)
from retrieval.shards import local_feature_shards
from retrieval.shards.descriptor_shards import ErrorRow
from retrieval.shards.local_feature_shards import LocalFeatureRow, LocalFeatureStore

# Two photos of the Radcliffe Camera (the same building from nearby viewpoints) and one of
# Christ Church (another building): oxford-dev ground truth.
SAME_A, SAME_B = "radcliffe_camera_000093", "radcliffe_camera_000171"
OTHER = "christ_church_000179"


def _features(name: str, config: LocalFeatureConfig | None = None) -> LocalFeatures:
    path = OXFORD_IMAGES / f"{name}.jpg"
    if not path.exists():
        pytest.skip(f"{path} not available")
    config = config or LocalFeatureConfig()
    image = decode_image(path.read_bytes(), max_side=config.image_size)
    return RootSIFTExtractor(config).extract(image)


def test_rootsift_is_the_square_root_of_l1_normalized_sift():
    sift = np.abs(np.random.default_rng(0).normal(size=(5, 128))).astype(np.float32)
    root = root_normalize(sift)
    np.testing.assert_allclose(root**2, sift / sift.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(root, axis=1), 1.0, rtol=1e-5)


def test_rootsift_on_a_real_photo_keeps_the_strongest_features():
    config = LocalFeatureConfig(image_size=512, max_features=300, pca_dim=0)
    features = _features(SAME_A, config)
    assert 100 < len(features) <= 300
    assert max(features.image_width, features.image_height) == 512
    assert features.descriptors.shape == (len(features), 128)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, rtol=1e-4)
    x, y = features.locations.T
    assert x.min() >= 0 and x.max() < features.image_width
    assert y.min() >= 0 and y.max() < features.image_height


def test_ransac_inliers_separate_a_real_matching_pair_from_a_non_matching_one():
    config = VerificationConfig(workers=1)
    a, b, other = _features(SAME_A), _features(SAME_B), _features(OTHER)
    same = count_inliers(a, b, config)
    different = count_inliers(a, other, config)
    assert same >= 60, same  # measured: ~230
    assert different < config.min_inliers, different
    assert same > 4 * max(different, 1)


def _opencv_matches(a: LocalFeatures, b: LocalFeatures, ratio: float) -> np.ndarray:
    """The reference: OpenCV's brute-force matcher, two nearest neighbours, Lowe's ratio test."""
    import cv2

    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.descriptors, b.descriptors, k=2)
    kept = [(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < ratio * n.distance]
    return np.asarray(kept, np.int64).reshape(-1, 2)


def test_matching_finds_what_opencvs_brute_force_matcher_finds():
    """The BLAS matcher against cv2.BFMatcher: real photos (a matching and a non-matching
    pair), and random features, some of them noisy copies of the other image's."""
    pairs = [(_features(SAME_A), _features(SAME_B)), (_features(SAME_A), _features(OTHER))]
    rng = np.random.default_rng(0)
    base = rng.random((300, 128), np.float32)
    noisy = np.concatenate([base[:120] + rng.normal(0, 0.02, (120, 128)), rng.random((80, 128))])
    unit = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in (base, noisy)]
    a, b = (
        LocalFeatures(
            np.zeros((len(d), 2), np.float32),
            np.ones(len(d), np.float32),
            d.astype(np.float32),
            10,
            10,
        )
        for d in unit
    )
    pairs.append((a, b))
    for a, b in pairs:
        for ratio in (0.8, 0.9):
            np.testing.assert_array_equal(match_features(a, b, ratio), _opencv_matches(a, b, ratio))
    assert len(match_features(*pairs[0], 0.8)) > 150  # the matching photos match
    assert len(match_features(a, b, 0.8)) >= 110  # the noisy copies find their originals


def test_rerank_by_inliers_moves_verified_images_first_by_inliers():
    ranked = [10, 11, 12, 13, 14]
    inliers = np.array([3, 50, 0, 25, 50])
    assert rerank_by_inliers(ranked, inliers, min_inliers=20) == [11, 14, 13, 10, 12]


def _random_features(rng: np.random.Generator, n: int) -> LocalFeatures:
    d = np.abs(rng.normal(size=(n, 128))).astype(np.float32)
    return LocalFeatures(
        rng.uniform(0, 600, size=(n, 2)).astype(np.float32),
        rng.uniform(1, 20, size=n).astype(np.float32),
        d / np.linalg.norm(d, axis=1, keepdims=True),
        640,
        480,
    )


@pytest.mark.parametrize("dtype", ["q15", "int8", "float16", "float32"])
def test_local_feature_shard_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    config = LocalFeatureConfig(dtype=dtype, pca_dim=0)
    info = RootSIFTExtractor(config).info()
    refs = tuple(ImageRef(f"img{i}", f"/x/img{i}.jpg") for i in range(4))
    spec = ShardSpec("part-00000", refs)
    plan.write_extraction_plan(str(tmp_path), [spec], source="/x", shard_size=4)
    written = {
        "img0": _random_features(rng, 50),
        "img1": _random_features(rng, 0),  # an image may have no features at all
        "img3": _random_features(rng, 7),
    }
    rows = [LocalFeatureRow(i, f"/x/{i}.jpg", f) for i, f in written.items()]
    errors = [ErrorRow("img2", "/x/img2.jpg", "decode", "truncated", "cut short")]
    manifest = local_feature_shards.write_shard(str(tmp_path), spec, rows, errors, info)
    assert manifest["rows"] == 3 and manifest["errors"] == 1 and manifest["features"] == 57

    table = pa.ipc.open_file(str(tmp_path / "part-00000.arrow")).read_all()  # any Arrow reader
    assert table.num_rows == 3
    element = {
        "q15": pa.uint8(),
        "int8": pa.int8(),
        "float16": pa.float16(),
        "float32": pa.float32(),
    }[dtype]
    assert table.schema.field("descriptors").type == pa.list_(element)
    schemas.check_schema("local_features", table.schema)

    read = local_feature_shards.read_shard(str(tmp_path), manifest)
    assert sorted(read) == ["img0", "img1", "img3"]
    tolerance = {"q15": 0.04, "int8": 0.01, "float16": 1e-3, "float32": 0}[
        dtype
    ]  # q15: half a step, rescaled
    for image_id, original in written.items():
        back = read[image_id]
        np.testing.assert_array_equal(back.locations, original.locations)
        np.testing.assert_array_equal(back.scales, original.scales)
        np.testing.assert_allclose(back.descriptors, original.descriptors, atol=tolerance)
        if len(back):
            np.testing.assert_allclose(np.linalg.norm(back.descriptors, axis=1), 1, rtol=1e-3)
        assert back.descriptors.shape == (len(original), 128)
        assert (back.image_width, back.image_height) == (640, 480)

    store = LocalFeatureStore(str(tmp_path))
    assert len(store) == 3 and "img2" not in store and store.get("img2") is None
    assert len(store.get("img3")) == 7
    assert local_feature_shards.read_errors(str(tmp_path), manifest)[0].error_kind == "truncated"


def test_local_feature_shard_refuses_lost_inputs(tmp_path):
    info = RootSIFTExtractor(LocalFeatureConfig(pca_dim=0)).info()
    spec = ShardSpec("part-00000", (ImageRef("a", "/a.jpg"), ImageRef("b", "/b.jpg")))
    rows = [LocalFeatureRow("a", "/a.jpg", _random_features(np.random.default_rng(0), 3))]
    with pytest.raises(RuntimeError, match="accounting"):
        local_feature_shards.write_shard(str(tmp_path), spec, rows, [], info)


def test_reader_refuses_another_schema_version():
    schema = schemas.arrow_schema("local_features", dim=128, element="float16")
    newer = schema.with_metadata({**schema.metadata, schemas.METADATA_VERSION: b"3"})
    with pytest.raises(schemas.SchemaMismatchError, match="version 3"):
        schemas.check_schema("local_features", newer)


def _committed_shard(directory, n=6, seed=3, dtype="float16"):
    rng = np.random.default_rng(seed)
    info = RootSIFTExtractor(LocalFeatureConfig(dtype=dtype, pca_dim=0)).info()
    refs = tuple(ImageRef(f"img{i}", f"/x/img{i}.jpg") for i in range(n))
    spec = ShardSpec("part-00000", refs)
    plan.write_extraction_plan(str(directory), [spec], source="/x", shard_size=n)
    written = {r.id: _random_features(rng, 20 + 30 * i) for i, r in enumerate(refs)}
    rows = [LocalFeatureRow(i, f"/x/{i}.jpg", f) for i, f in written.items()]
    manifest = local_feature_shards.write_shard(str(directory), spec, rows, [], info)
    return manifest, written


def test_read_by_image_returns_what_the_shard_holds_reading_only_that_image(tmp_path):
    manifest, _ = _committed_shard(tmp_path)
    whole = local_feature_shards.read_shard(str(tmp_path), manifest)
    file_bytes = manifest["files"]["data"]["bytes"]
    for position, image_id in enumerate(manifest["ids"]):
        store = LocalFeatureStore(str(tmp_path))
        one = store.get(image_id)
        expected = whole[image_id]
        np.testing.assert_array_equal(one.locations, expected.locations)
        np.testing.assert_array_equal(one.scales, expected.scales)
        np.testing.assert_array_equal(one.descriptors, expected.descriptors)
        assert (one.image_width, one.image_height) == (expected.image_width, expected.image_height)
        start, end, _ = manifest["batches"][position]
        assert store.bytes_read == end - start < file_bytes / 2


def test_a_corrupted_image_is_detected_and_the_others_still_read(tmp_path):
    manifest, _ = _committed_shard(tmp_path)
    start, end, _ = manifest["batches"][2]
    path = tmp_path / "part-00000.arrow"
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store = LocalFeatureStore(str(tmp_path))
    with pytest.raises(checksums.ChecksumMismatchError, match="img2"):
        store.get("img2")
    assert len(store.get("img1")) == 50 and len(store.get("img3")) == 110


def test_a_truncated_file_is_detected(tmp_path):
    manifest, _ = _committed_shard(tmp_path)
    path = tmp_path / "part-00000.arrow"
    last_start = manifest["batches"][-1][0]
    path.write_bytes(path.read_bytes()[: last_start + 10])
    with pytest.raises(checksums.ChecksumMismatchError, match="shorter"):
        LocalFeatureStore(str(tmp_path)).get(manifest["ids"][-1])


def test_prefetch_reads_each_image_once_and_the_cache_is_bounded(tmp_path):
    manifest, written = _committed_shard(tmp_path, n=8)
    spans = {i: b - a for i, (a, b, _) in zip(manifest["ids"], manifest["batches"], strict=True)}
    store = LocalFeatureStore(str(tmp_path), threads=4)
    store.prefetch(["img1", "img5", "img7", "img1", "not-there"])
    assert store.bytes_read == spans["img1"] + spans["img5"] + spans["img7"]
    before = store.bytes_read
    assert len(store.get("img5")) == len(written["img5"])
    assert store.bytes_read == before  # served from the cache

    one_image = 4 * len(written["img7"]) * (2 + 1 + 128) + 64  # float32 in memory
    small = LocalFeatureStore(str(tmp_path), cache_bytes=one_image)
    small.get("img7")
    small.get("img6")  # evicts img7
    small.get("img7")
    assert small.bytes_read == 2 * spans["img7"] + spans["img6"]


def test_shards_of_the_parquet_layout_are_still_read(tmp_path):
    """Folders written before the one-batch-per-image layout keep working (read whole)."""
    manifest, written = _committed_shard(tmp_path)
    table = pa.ipc.open_file(str(tmp_path / "part-00000.arrow")).read_all()
    data = storage.write_parquet(str(tmp_path / "part-00000.parquet"), table)
    (tmp_path / "part-00000.arrow").unlink()
    legacy = {k: v for k, v in manifest.items() if k not in ("format", "batches", "checksum")}
    legacy["files"] = {
        **manifest["files"],
        "data": shard_manifests.file_entry(
            str(tmp_path / "part-00000.parquet"), data, manifest["rows"]
        ),
    }
    shard_manifests.commit(str(tmp_path), "part-00000", legacy)
    store = LocalFeatureStore(str(tmp_path))
    store.prefetch(list(written))  # nothing ahead for a shard read whole
    assert store.bytes_read == 0
    for image_id, original in written.items():
        np.testing.assert_allclose(store.get(image_id).descriptors, original.descriptors, atol=1e-3)
    assert store.bytes_read == len(data)  # the whole shard, once


def test_q15_codes_are_a_quarter_of_float16_and_match_the_same_features():
    """q15 keeps RootSIFT matching: the nearest neighbour of every feature (ratio test passed)
    under float32 is the same under q15, and codes take a byte each, before compression."""
    rng = np.random.default_rng(5)
    sift = rng.gamma(0.3, size=(300, 128)).astype(np.float32)  # sparse histograms, like SIFT
    a = root_normalize(
        np.minimum(np.round(sift / np.linalg.norm(sift, axis=1, keepdims=True) * 512), 255)
    )
    b = a[rng.permutation(300)] + rng.normal(scale=0.01, size=a.shape).astype(np.float32)
    b = np.abs(b) / np.linalg.norm(b, axis=1, keepdims=True)
    codes_a, codes_b = (encode_descriptors(x, "q15") for x in (a, b))
    assert codes_a.dtype == np.uint8 and codes_a.max() <= 15
    qa, qb = decode_descriptors(codes_a), decode_descriptors(codes_b)

    def matches(x, y):
        d = np.linalg.norm(x[:, None] - y[None], axis=2)
        first, second = np.sort(d, axis=1)[:, :2].T
        return {(i, j) for i, j in enumerate(d.argmin(axis=1)) if first[i] < 0.8 * second[i]}

    exact, quantised = matches(a, b), matches(qa, qb)
    assert len(exact & quantised) >= 0.95 * len(exact)


def test_q15_is_refused_for_signed_descriptors():
    assert LocalFeatureConfig(dtype="q15").dtype == "q15"
    with pytest.raises(ValueError, match="signed"):
        LocalFeatureConfig(method="delf:/models/delf", dtype="q15")


def test_version_1_tables_are_still_read_and_cannot_hold_codes():
    v1 = schemas.arrow_schema("local_features", dim=128, element="float16", version=1)
    schemas.check_schema("local_features", v1)
    with pytest.raises(ValueError, match="cannot hold q15"):
        schemas.arrow_schema("local_features", dim=128, element="q15", version=1)


def test_rootsift_projection_is_deterministic_orthonormal_and_fingerprinted():
    from retrieval.local_features.extractor import local_info_for
    from retrieval.local_features.rootsift import rootsift_pca

    basis = rootsift_pca()
    np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(64), atol=1e-5)
    rootsift_pca.cache_clear()
    again = rootsift_pca()
    assert again.sha256 == basis.sha256  # learned again, the same basis
    config = LocalFeatureConfig(pca_dim=40, dtype="int8")
    extractor = RootSIFTExtractor(config)
    image = decode_image(sorted(OXFORD_IMAGES.glob("*.jpg"))[0].read_bytes(), max_side=640)
    features = extractor.extract(image)
    assert features.descriptors.shape == (len(features), 40) and extractor.dim == 40
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1, rtol=1e-5)
    info = local_info_for(config)
    assert info["dim"] == 40 and basis.sha256[:16] in info["weights_sha256"]
    assert info == extractor.info()
    # Unprojected settings keep the fingerprint they had before projections existed.
    assert "pca_dim" not in LocalFeatureConfig(pca_dim=0, dtype="float16").as_dict()
    with pytest.raises(ValueError, match="RootSIFT only"):
        LocalFeatureConfig(method="delf:/m", pca_dim=40)


def test_the_default_projects_rootsift_to_56_int8_and_auto_follows_the_method():
    default = LocalFeatureConfig()
    assert (default.projection_dim, default.stored_dtype) == (56, "int8")
    assert default.model_id == "rootsift-pca56@448x1000"
    # "auto" hashes as the explicit settings it stands for: the same features, the same model.
    explicit = LocalFeatureConfig(pca_dim=56, dtype="int8")
    assert default.config_hash() == explicit.config_hash()
    assert default.as_dict() == explicit.as_dict()
    assert RootSIFTExtractor(default).dim == 56
    # q15 codes are for unprojected RootSIFT, DELF is projected by its own model: neither
    # gets the RootSIFT projection by default, and neither is refused for it.
    q15 = LocalFeatureConfig(dtype="q15")
    assert (q15.projection_dim, q15.stored_dtype) == (0, "q15")
    delf = LocalFeatureConfig(method="delf:/models/delf")
    assert (delf.projection_dim, delf.stored_dtype) == (0, "float16")
    unprojected = LocalFeatureConfig(pca_dim=0)
    assert (unprojected.stored_dtype, unprojected.model_id) == ("float16", "rootsift@448x1000")
