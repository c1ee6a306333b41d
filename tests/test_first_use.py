"""Local features on first use (``--local-at first-use``, the default): computed only for the
images something asks for, equal to the ones the extract stage makes up front, never computed
twice, and a job built this way answers exactly as one that extracted them all."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import OXFORD_IMAGES
from cryptography.fernet import Fernet
from support import require_benchmark

from pipelines import cli, stages
from pipelines.config import RunConfig
from pipelines.job import Bundle, run_index_job
from retrieval import local_feature_cache, storage
from retrieval.image_refs import ImageRef
from retrieval.learning.mining import MiningConfig
from retrieval.local_feature_cache import FirstUse, Inherited
from retrieval.shards import descriptor_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore

PHOTOS = [
    "radcliffe_camera_000093",
    "radcliffe_camera_000171",
    "christ_church_000179",
    "christ_church_000311",
    "all_souls_000183",
    "oriel_000072",
]
LOCAL = RunConfig(runner="local", shard_size=4)


@pytest.fixture(scope="module")
def upfront(tmp_path_factory):
    """Six photos described with their local features extracted up front (shards of 4)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(OXFORD_IMAGES / f"{name}.jpg", folder / f"{name}.jpg")
    out = tmp_path_factory.mktemp("upfront")
    stages.extract(str(folder), str(out / "descriptors"), LOCAL, local_output=str(out / "local"))
    return folder, out


def same_features(a, b) -> bool:
    return (
        np.array_equal(a.locations, b.locations)
        and np.array_equal(a.scales, b.scales)
        and np.array_equal(a.descriptors, b.descriptors)
        and (a.image_width, a.image_height) == (b.image_width, b.image_height)
    )


def test_first_use_features_equal_those_extracted_up_front_and_are_computed_once(upfront, tmp_path):
    _, out = upfront
    ids, _, _ = descriptor_shards.read_all(str(out / "descriptors"))
    root = str(tmp_path / "first_use")
    where = FirstUse(root)
    descriptors = str(out / "descriptors")

    first = stages.complete_local_features(where, descriptors, ids[:4], LOCAL, label="t")
    assert (first["requested"], first["computed"], first["cached"]) == (4, 4, 0)
    up_front = LocalFeatureStore(str(out / "local"))
    computed = LocalFeatureStore(local_feature_cache.layers(root))
    assert len(computed) == 4 and ids[4] not in computed
    for image_id in ids[:4]:
        assert same_features(computed.get(image_id), up_front.get(image_id)), image_id

    # Asked again with more: only the new ones are computed, in a layer of their own.
    second = stages.complete_local_features(where, descriptors, ids, LOCAL, label="t")
    assert (second["computed"], second["cached"]) == (len(ids) - 4, 4)
    both = local_feature_cache.layers(root)
    assert len(both) == 2 and local_feature_cache.layers(root, skip=both[:1]) == both[1:]
    computed = LocalFeatureStore(both)
    for image_id in ids:
        assert same_features(computed.get(image_id), up_front.get(image_id)), image_id

    # Everything there: nothing to compute, no new layer.
    third = stages.complete_local_features(where, descriptors, ids, LOCAL, label="t")
    assert third["computed"] == 0 and "layer" not in third
    assert len(local_feature_cache.layers(root)) == 2


def test_inherited_layers_are_read_less_what_they_exclude(upfront, tmp_path):
    """A re-index version's view: layers of an earlier version, read less the images that
    changed since. Those are computed again (into the version's own root); the rest are not."""
    _, out = upfront
    ids, _, _ = descriptor_shards.read_all(str(out / "descriptors"))
    descriptors = str(out / "descriptors")
    earlier = FirstUse(str(tmp_path / "v1"))
    stages.complete_local_features(earlier, descriptors, ids, LOCAL, label="t")
    (layer,) = local_feature_cache.layers(earlier.root)
    later = FirstUse(str(tmp_path / "v2"), (Inherited(layer, frozenset({ids[0]})),))
    store = later.store()
    assert ids[0] not in store and all(i in store for i in ids[1:])
    record = stages.complete_local_features(later, descriptors, ids, LOCAL, label="t")
    assert (record["computed"], record["cached"]) == (1, len(ids) - 1)
    later.refresh(store)
    assert ids[0] in store and local_feature_cache.layers(later.root)
    assert same_features(store.get(ids[0]), LocalFeatureStore(layer).get(ids[0]))


def test_carry_over_keeps_only_readable_shared_layers_that_live_images_read(upfront, tmp_path):
    _, out = upfront
    ids, _, _ = descriptor_shards.read_all(str(out / "descriptors"))
    data = tmp_path / "data"
    where = FirstUse(str(data / "v1" / "local_features"))
    stages.complete_local_features(where, str(out / "descriptors"), ids, LOCAL, label="t")
    (layer,) = local_feature_cache.layers(where.root)
    visible = [
        Inherited(str(tmp_path / "elsewhere" / "first-use-0")),  # pruning would not keep it
        Inherited(str(data / "v0" / "local_features" / "first-use-gone")),  # unreadable
        Inherited(layer, frozenset({ids[0]})),
    ]
    kept = local_feature_cache.carry_over(visible, {ids[1]}, set(ids), shared_under=str(data))
    assert kept == [Inherited(layer, frozenset({ids[0], ids[1]}))]
    # A layer whose images all changed or left is not inherited.
    assert not local_feature_cache.carry_over(kept, set(ids), set(ids), shared_under=str(data))
    assert not local_feature_cache.carry_over(kept, set(), set(), shared_under=str(data))


def test_compaction_copies_inherited_layers_into_one(upfront, tmp_path):
    """Many inherited layers become one layer of the version's own: each image's stored bytes
    as they were (less what a layer excludes), failures kept as failures, resumable, and a
    damaged source is refused, not copied."""
    from retrieval.checksums import ChecksumMismatchError
    from retrieval.local_features.extractor import local_info_for
    from retrieval.shards import local_feature_shards

    folder, _ = upfront
    corpus = tmp_path / "corpus"
    shutil.copytree(folder, corpus)
    descriptors = str(tmp_path / "descriptors")
    stages.extract(str(corpus), descriptors, LOCAL)
    ids, uris, _ = descriptor_shards.read_all(descriptors)
    storage.write_bytes(uris[0], b"\xff\xd8 no longer a photo")  # fails for good
    v1 = FirstUse(str(tmp_path / "data" / "v1" / "local_features"))
    for part in (ids[:2], ids[2:4], ids[4:]):
        stages.complete_local_features(v1, descriptors, part, LOCAL, label="t")
    layers = local_feature_cache.layers(v1.root)
    assert len(layers) == 3
    changed = frozenset({ids[-1]})  # changed since: read from no inherited layer
    inherited = tuple(Inherited(layer, changed) for layer in layers)
    v2 = FirstUse(str(tmp_path / "data" / "v2" / "local_features"), inherited)
    before = v2.store()
    local_info = local_info_for(LOCAL.local)
    compacted, record = local_feature_cache.compact(v2, local_info, LOCAL.shard_size)
    assert compacted.inherited == () and len(local_feature_cache.layers(v2.root)) == 1
    assert (record["layers"], record["images"], record["failed"]) == (3, len(ids) - 2, 1)
    after = compacted.store()
    assert len(after) == len(before) == len(ids) - 2 and ids[-1] not in after
    for image_id in ids[1:-1]:
        assert same_features(after.get(image_id), before.get(image_id)), image_id
    have, failed = compacted.known()
    assert failed == {ids[0]} and ids[-1] not in have  # not asked for again; asked for again
    # Interrupted and run again: the committed shards are kept, the same layer comes back.
    again, _ = local_feature_cache.compact(v2, local_info, LOCAL.shard_size)
    assert local_feature_cache.layers(again.root) == local_feature_cache.layers(v2.root)
    # A source whose bytes no longer match its manifest stops the compaction.
    (manifest,) = local_feature_shards.list_shards(layers[1])
    arrow = Path(layers[1]) / f"{manifest['shard']}.arrow"
    start, end, _ = manifest["batches"][0]
    data = bytearray(arrow.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    v3 = FirstUse(str(tmp_path / "data" / "v3" / "local_features"), inherited)
    with pytest.raises(ChecksumMismatchError):
        local_feature_cache.compact(v3, local_info, LOCAL.shard_size)


def test_an_image_that_fails_for_good_is_not_asked_for_again(upfront, tmp_path):
    folder, _ = upfront
    corpus = tmp_path / "corpus"
    shutil.copytree(folder, corpus)
    config = LOCAL
    stages.extract(str(corpus), str(tmp_path / "descriptors"), config)
    ids, uris, _ = descriptor_shards.read_all(str(tmp_path / "descriptors"))
    storage.write_bytes(uris[0], b"\xff\xd8 no longer a photo")  # replaced since described
    root = str(tmp_path / "first_use")
    record = stages.complete_local_features(
        FirstUse(root), str(tmp_path / "descriptors"), ids[:2], config, label="t"
    )
    assert (record["computed"], record["failed"]) == (1, 1)
    again = stages.complete_local_features(
        FirstUse(root), str(tmp_path / "descriptors"), ids[:2], config, label="t"
    )
    assert (again["cached"], again["failed_before"], again["computed"]) == (1, 1, 0)


def test_a_url_sealed_by_another_run_is_reported_unavailable_not_retried():
    other_run = Fernet(Fernet.generate_key())
    sealed = other_run.encrypt(b"https://example.com/a.jpg?X-Amz-Signature=abc").decode()
    ref = ImageRef("a", "https://example.com/a.jpg?X-Amz-Signature=***", sealed=sealed)
    opened = local_feature_cache.openable(ref)
    assert opened.sealed is None and opened.problem.startswith("unavailable: ")
    plain = ImageRef("b", "https://example.com/b.jpg")
    assert local_feature_cache.openable(plain) is plain


def test_the_default_job_computes_features_only_for_mined_images(tmp_path):
    """A corpus larger than the mining sample: only the sample and its proposed neighbours get
    local features; the rest never pay for them."""
    folder = require_benchmark("ukbench-56") / "images"
    out = tmp_path / "job"
    mining = MiningConfig(sample_size=4, neighbours=3, min_pairs=1)
    run_index_job(str(folder), str(out), replace(LOCAL, mining=mining))
    bundle = Bundle.read(str(out))
    assert bundle.record["local_features"] is None
    assert bundle.first_use_root == storage.join(str(out), "local_features")
    mining = bundle.record["learning"]["mining"]
    made = LocalFeatureStore(bundle.local_features)
    assert len(made) == mining["images_proposed"] <= 4 * 4 < 56
    assert mining["local_features_first_use"]["computed"] == len(made)


def test_first_use_answers_exactly_like_extracting_up_front(ukbench_run, tmp_path):
    """The default (first use, Beam) and ``--local-at extract`` (local runner) give the same
    rankings for every row of the report, and the same figures."""
    folder = require_benchmark("ukbench-56")
    out = tmp_path / "extract"
    argv = ["evaluate", "--benchmark", str(folder), "--out", str(out), "--runner", "local"]
    assert cli.main([*argv, "--local-at", "extract", "--shard-size", "16"]) == 0
    upfront = storage.read_json(str(out / "report.json"))
    first_use = storage.read_json(str(ukbench_run / "report.json"))
    assert upfront["local_features"].get("at") is None
    assert first_use["local_features"]["at"] == "first-use"
    assert [(r["name"], r["mAP"]) for r in first_use["results"]] == [
        (r["name"], r["mAP"]) for r in upfront["results"]
    ]
    assert pq.read_table(ukbench_run / "rankings.parquet").equals(
        pq.read_table(out / "rankings.parquet")
    )


def test_two_runs_asking_for_the_same_images_compute_them_once(upfront, tmp_path):
    """Two searches at once that need the same images: one computes them, the other waits for
    its layer's lease and then finds them there (it does not stop, nor compute them again)."""
    from concurrent.futures import ThreadPoolExecutor

    _, out = upfront
    ids, _, _ = descriptor_shards.read_all(str(out / "descriptors"))
    root = str(tmp_path / "first_use")

    def request(_: int) -> dict:
        return stages.complete_local_features(
            FirstUse(root), str(out / "descriptors"), ids, LOCAL, label="t"
        )

    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(request, range(2)))
    # The second either waited for the first's lease or asked after it had finished.
    assert sorted(r["computed"] for r in records) == [0, len(ids)]
    assert len(local_feature_cache.layers(root)) == 1
