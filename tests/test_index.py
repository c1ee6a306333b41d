"""Codebook training, per-shard indexes, merging and loading, on random unit vectors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from support import D, write_descriptors

from pipelines import stages
from pipelines.config import RunConfig
from retrieval.index import factory as factories
from retrieval.index.codebook import (
    SAMPLE_FILE,
    apply_training_settings,
    pca_rotation,
    train_codebook,
    uniform_sample,
    with_id_map,
)
from retrieval.index.group_index import (
    build_group_index,
    build_index_groups,
    pending,
    plan_index_groups,
)
from retrieval.index.merge import IDMAP_FILE, INDEX_MANIFEST, merge_index_groups
from retrieval.index.search import load_index


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    directory = tmp_path_factory.mktemp("desc")
    ids, vectors = write_descriptors(directory, [120, 0, 150, 130], errors_per_shard=2)
    return directory, ids, vectors


def build_all(desc: Path, root: Path, factory: str) -> tuple[dict, Path]:
    codebook, shards, merged = root / "codebook", root / "shards", root / "index"
    cb = train_codebook(str(desc), str(codebook), factory=factory, seed=0)
    build_index_groups(str(desc), str(codebook), str(shards), group_vectors=100)
    merge_index_groups(str(shards), str(merged), fan_in=2)
    return cb, merged


@pytest.mark.parametrize(
    ("factory", "expected", "exact"),
    [
        ("auto", "IDMap2,Flat", True),
        ("IVF16,Flat", "IVF16,Flat", True),
        ("PQ8x4", "IDMap2,PQ8x4", False),
    ],
)
def test_build_merge_load(descriptors, tmp_path, factory, expected, exact):
    desc, ids, vectors = descriptors
    n = len(ids)
    codebook, merged = build_all(desc, tmp_path, factory)
    assert codebook["factory"] == expected and codebook["vectors"] == n and codebook["dim"] == D

    index = load_index(str(merged))
    assert index.ntotal == n == index.manifest["ntotal"]
    assert index.manifest["factory"] == expected and index.manifest["shards"] == 4
    assert index.manifest["groups"] == 3  # 120 | 0 + 150 | 130 with groups of >= 100 vectors
    assert list(index.ids) == ids  # (shard, row) order
    idmap = pq.read_table(merged / IDMAP_FILE)
    assert idmap.column("index_id").to_pylist() == list(range(n))
    assert idmap.column("shard").to_pylist() == (
        ["part-00000"] * 120 + ["part-00002"] * 150 + ["part-00003"] * 130
    )

    scores, found = index.search(vectors, 10)
    assert found.shape == (n, 10)
    if exact:
        np.testing.assert_array_equal(found[:, 0], np.arange(n))
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        assert index.ranked_ids(found[:3, :1]) == [[ids[0]], [ids[1]], [ids[2]]]
    else:  # 4-bit PQ is lossy: each vector should still rank itself among its first few hits
        assert (found == np.arange(n)[:, None]).any(axis=1).mean() > 0.9


def test_training_sample_is_uniform_and_seeded(tmp_path):
    desc = tmp_path / "desc"
    ids, _ = write_descriptors(desc, [100] * 10, seed=1)

    def sample(out: str, seed: int):
        train_codebook(
            str(desc), str(tmp_path / out), factory="IVF4,Flat", sample_size=200, seed=seed
        )
        return pq.read_table(tmp_path / out / SAMPLE_FILE)

    first = sample("a", 0)
    positions = np.asarray(first.column("position").to_pylist())
    assert len(positions) == len(set(positions)) == 200
    assert np.all(np.diff(positions) > 0)
    per_shard = np.bincount(positions // 100, minlength=10)
    assert (per_shard > 0).all()  # every shard contributes, not just the first rows
    assert per_shard.max() < 45  # expected 20 each
    assert first.column("id").to_pylist() == [ids[p] for p in positions]

    again = sample("b", 0)
    assert again.column("position").to_pylist() == positions.tolist()
    other = sample("c", 1)
    assert other.column("position").to_pylist() != positions.tolist()

    np.testing.assert_array_equal(uniform_sample(1000, 200, 7), uniform_sample(1000, 200, 7))
    assert len(uniform_sample(50, 200, 0)) == 50


def test_default_factory_rules():
    assert factories.default_factory(1, 1280) == "IDMap2,Flat"
    assert factories.default_factory(20_000, 1280) == "IDMap2,Flat"
    mid = factories.default_factory(20_001, 1280)
    assert mid.startswith("OPQ64_256,IVF") and mid.endswith(",PQ64") and "HNSW" not in mid
    assert factories.default_factory(2_000_000, 1280) == "OPQ64_256,IVF4096,PQ64"
    assert factories.default_factory(2_000_001, 1280) == "OPQ64_256,IVF4096_HNSW32,PQ64"
    assert factories.default_factory(100_000, 128) == "OPQ32_128,IVF1024,PQ32"
    assert factories.n_lists(10) == 64 and factories.n_lists(10**12) == 65536
    for d in (32, 100, 128, 1280):
        assert d % factories.pq_bytes(d) == 0
    for n, d in ((50_000, 128), (3_000_000, 96)):
        faiss.index_factory(d, factories.default_factory(n, d), faiss.METRIC_INNER_PRODUCT)
    assert with_id_map("Flat") == "IDMap2,Flat"
    assert with_id_map("IVF16,PQ8") == "IVF16,PQ8"
    assert factories.training_sample_size("IVF1024,PQ32", 10**7) == 65_536
    # 64 points per list, capped at 1 GiB of float32 vectors
    assert factories.training_sample_size("IVF8192,PQ64", 10**7, 128) == 64 * 8192
    assert factories.training_sample_size("IVF8192,PQ64", 10**7, 1280) == 2**30 // (4 * 1280)
    assert factories.training_sample_size("IVF16,Flat", 300) == 300


def _anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    """Vectors whose variance falls off over the dimensions, as real descriptors' does."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * np.linspace(3.0, 0.1, d)).astype(np.float32)


def test_opq_starts_from_balanced_principal_axes():
    x = _anisotropic(4_000, 64, seed=1)
    rotation = pca_rotation(x, 32, 8)
    assert rotation.shape == (32, 64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(32), atol=1e-4)  # orthonormal
    # the 32 highest-variance axes, dealt so every sub-space of 4 gets a similar share
    variance = np.var((x - x.mean(0)) @ rotation.T, axis=0).reshape(8, 4)
    log_product = np.log(variance).sum(1)
    assert log_product.max() - log_product.min() < 0.5
    projected = np.var(x @ rotation.T, axis=0).sum()
    assert projected > 0.85 * np.var(x, axis=0)[:32].sum() * (32 / 32)

    def trained(settings: dict) -> tuple[faiss.Index, faiss.OPQMatrix, float]:
        index = faiss.index_factory(64, "OPQ8_32,PQ8", faiss.METRIC_INNER_PRODUCT)
        apply_training_settings(index, settings, x)
        opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
        assert (opq.niter, opq.max_train_points) == (settings["opq_niter"], 3_000)
        index.train(x)
        held = _anisotropic(1_000, 64, seed=2)
        error = float(np.mean(np.sum((held - index.sa_decode(index.sa_encode(held))) ** 2, 1)))
        return index, opq, error  # the index owns the OPQ matrix: keep it alive with it

    # OPQ started from the balanced principal axes, 2 iterations, encodes held-out vectors
    # better than faiss's random start after the same 2 iterations.
    _, _, from_pca = trained({"opq_niter": 2, "opq_points": 3_000, "opq_init": "pca"})
    _, _, from_random = trained({"opq_niter": 2, "opq_points": 3_000, "opq_init": "random"})
    assert from_pca < 0.95 * from_random
    # with no iteration, the rotation is the start itself
    index, opq, _ = trained({"opq_niter": 0, "opq_points": 3_000, "opq_init": "pca"})
    start = pca_rotation(x[:3_000], 32, 8)
    np.testing.assert_allclose(faiss.vector_to_array(opq.A).reshape(32, 64), start, atol=1e-6)
    assert index.is_trained


def test_index_type_from_a_memory_budget():
    n, d = 1_000_000, 1280
    assert factories.choose_factory(n, d) == factories.default_factory(n, d)
    roomy = factories.choose_factory(n, d, max_index_memory=factories.parse_bytes("1G"))
    assert roomy == "OPQ128_512,IVF4096,PQ128"  # up to twice the default code when it fits
    tight = factories.choose_factory(n, d, max_index_memory=factories.parse_bytes("30M"))
    assert tight == "OPQ16_64,IVF4096,PQ16"  # 24 bytes per vector: the largest code that fits
    assert factories.estimated_bytes(tight, n, d) <= factories.parse_bytes("30M")
    assert factories.choose_factory(n, d, max_index_memory=2**30, pretransform="pca") == (
        "PCAR512,IVF4096,PQ128"
    )
    assert factories.choose_factory(n, 128, max_index_memory=2**30, pretransform="none") == (
        "IVF4096,PQ64"
    )
    # 100k x 1280-d in 16 MB: 128-byte codes, not the 64 of the default; they fit once the
    # rotation keeps 2 dimensions per byte (256) instead of 4: the rotation narrows first
    sixteen = factories.choose_factory(100_000, d, max_index_memory=factories.parse_bytes("16M"))
    assert sixteen == "OPQ128_256,IVF1024,PQ128"
    assert factories.estimated_bytes(sixteen, 100_000, d) == (
        100_000 * (128 + 8) + 4 * (1024 * 256 + 256 * 256 + d * 256)
    )
    # codes in steps of 16 bytes: 112 fits in 130M at 1M vectors where 128 does not
    assert factories.choose_factory(n, d, max_index_memory=factories.parse_bytes("130M")) == (
        "OPQ112_448,IVF4096,PQ112"
    )
    assert factories.choose_factory(n, d, max_index_memory=factories.parse_bytes("150M")) == (
        "OPQ128_512,IVF4096,PQ128"
    )
    # small sets stay exact while they fit, and compress when they do not
    assert factories.choose_factory(5_000, d, max_index_memory=2**30) == "IDMap2,Flat"
    assert factories.choose_factory(5_000, d, max_index_memory=2**20).endswith("x4")
    with pytest.raises(ValueError, match="need at least"):
        factories.choose_factory(n, d, max_index_memory=10 * n)
    assert factories.parse_bytes("16M") == 16 * 2**20 and factories.parse_bytes("2GiB") == 2**31
    assert factories.parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        factories.parse_bytes("lots")
    for factory in (roomy, tight, sixteen, "PCAR512,IVF4096,PQ128"):
        faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)


def test_index_stage_rerun_skips_and_beam_matches_local(descriptors, tmp_path):
    desc, ids, _ = descriptors
    config = RunConfig(runner="local", workers=1, index_factory="IVF16,Flat")
    codebook = tmp_path / "codebook"
    stages.train(str(desc), str(codebook), config)

    config = replace(config, group_vectors=100, fan_in=2)
    local = stages.index(str(desc), str(codebook), str(tmp_path / "shards-local"), config)
    assert local["groups"] == 3 and local["groups_skipped"] == 0 and local["shards"] == 4
    assert local["inputs"] == local["indexed"] == len(ids)
    again = stages.index(str(desc), str(codebook), str(tmp_path / "shards-local"), config)
    assert again["groups_skipped"] == again["groups"] == 3

    beam = stages.index(
        str(desc), str(codebook), str(tmp_path / "shards-beam"), replace(config, runner="beam")
    )
    assert beam["groups_skipped"] == 0 and beam["indexed"] == len(ids)

    merged_local = stages.merge(
        str(tmp_path / "shards-local"), str(tmp_path / "index-local"), config
    )
    merged_beam = stages.merge(
        str(tmp_path / "shards-beam"), str(tmp_path / "index-beam"), replace(config, runner="beam")
    )
    assert merged_beam["ntotal"] == merged_local["ntotal"] == len(ids)
    # the same bytes
    assert (
        merged_beam["pieces"][0]["index"]["sha256"] == merged_local["pieces"][0]["index"]["sha256"]
    )
    assert not (tmp_path / "index-beam" / "rounds").exists()  # intermediate rounds cleaned up
    assert pq.read_table(tmp_path / "index-beam" / IDMAP_FILE).equals(
        pq.read_table(tmp_path / "index-local" / IDMAP_FILE)
    )


def test_stale_shard_index_is_rebuilt_after_new_codebook(descriptors, tmp_path):
    desc, _, _ = descriptors
    train_codebook(str(desc), str(tmp_path / "cb1"), factory="IVF16,Flat", seed=0)
    tasks = plan_index_groups(str(desc), str(tmp_path / "cb1"), group_vectors=100)
    for task in tasks:
        build_group_index(task, str(tmp_path / "shards"))
    assert pending(tasks, str(tmp_path / "shards")) == []
    # (Another seed would not do: when the sample is every vector, the codebook is the same.)
    train_codebook(str(desc), str(tmp_path / "cb2"), factory="IVF8,Flat", seed=0)
    tasks2 = plan_index_groups(str(desc), str(tmp_path / "cb2"), group_vectors=100)
    assert len(pending(tasks2, str(tmp_path / "shards"))) == 3


def test_training_is_skipped_when_the_codebook_is_up_to_date(descriptors, tmp_path):
    desc, _, _ = descriptors
    first = train_codebook(str(desc), str(tmp_path / "cb"), factory="IVF8,Flat", seed=0)
    codebook_file = tmp_path / "cb" / "codebook.faissindex"
    stamp = codebook_file.stat().st_mtime_ns
    again = train_codebook(str(desc), str(tmp_path / "cb"), factory="IVF8,Flat", seed=0)
    assert again == first and codebook_file.stat().st_mtime_ns == stamp
    other = train_codebook(str(desc), str(tmp_path / "cb"), factory="IVF16,Flat", seed=0)
    assert other["factory"] == "IVF16,Flat" and codebook_file.stat().st_mtime_ns != stamp


def test_spark_index_and_merge_rounds_match_local(spark, descriptors, tmp_path):
    """`index` and `merge` on Spark (the session's real local[2]): groups built by tasks from
    the one codebook, the merge tree in rounds of tasks; the same bytes as the local loop, and
    each runner skips the groups the other committed."""
    from pipelines import cli

    desc, ids, _ = descriptors
    config = RunConfig(runner="local", workers=1, index_factory="IVF16,Flat")
    codebook = tmp_path / "codebook"
    stages.train(str(desc), str(codebook), config)
    config = replace(config, group_vectors=100, fan_in=2)
    local = stages.index(str(desc), str(codebook), str(tmp_path / "shards-local"), config)
    assert local["groups"] == 3

    run = ["--runner", "spark", "--workers", "2"]
    argv = ["index", "--descriptors", str(desc), "--codebook", str(codebook)]
    argv += ["--output", str(tmp_path / "shards-spark"), "--group-size", "100", *run]
    assert cli.main(argv) == 0
    spark_summary = stages.index(
        str(desc), str(codebook), str(tmp_path / "shards-spark"), replace(config, runner="spark")
    )
    assert spark_summary["groups_skipped"] == spark_summary["groups"] == 3  # the CLI run's
    assert spark_summary["inputs"] == spark_summary["indexed"] == len(ids)
    for name in ("group-00000", "group-00001", "group-00002"):
        for suffix in (".codes", ".idmap.parquet"):
            spark_file = tmp_path / "shards-spark" / f"{name}{suffix}"
            assert (
                spark_file.read_bytes()
                == (tmp_path / "shards-local" / spark_file.name).read_bytes()
            )

    merged_local = stages.merge(
        str(tmp_path / "shards-local"), str(tmp_path / "index-local"), config
    )
    argv = ["merge", "--shards", str(tmp_path / "shards-spark")]
    argv += ["--output", str(tmp_path / "index-spark"), "--fan-in", "2", *run]
    assert cli.main(argv) == 0
    merged_spark = json.loads((tmp_path / "index-spark" / INDEX_MANIFEST).read_text())
    summaries = [
        json.loads((tmp_path / f"index-{runner}" / "summary.json").read_text())
        for runner in ("local", "spark")
    ]
    assert [s["rounds"] for s in summaries] == [2, 2]  # 3 groups -> 2 -> 1
    assert merged_spark["ntotal"] == merged_local["ntotal"] == len(ids)
    assert (
        merged_spark["pieces"][0]["index"]["sha256"] == merged_local["pieces"][0]["index"]["sha256"]
    )
    assert pq.read_table(tmp_path / "index-spark" / IDMAP_FILE).equals(
        pq.read_table(tmp_path / "index-local" / IDMAP_FILE)
    )

    # Spark over the local run's committed groups: nothing left to build.
    over_local = stages.index(
        str(desc), str(codebook), str(tmp_path / "shards-local"), replace(config, runner="spark")
    )
    assert over_local["groups_skipped"] == 3
