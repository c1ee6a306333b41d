"""``retrieval reindex``: only what changed is extracted, deletions disappear, the result agrees
with a full rebuild, versions roll back; and the drift measure behind retraining."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from support import save_tiny_saved_model

from pipelines import cli
from pipelines.config import build_config
from pipelines.reindex import reindex
from retrieval import versions
from retrieval.index.drift import DRIFT_THRESHOLD, drift_ratio, quantization_error
from retrieval.index.search import load_index
from retrieval.shards import descriptor_shards


def _image(path: Path, seed: int) -> None:
    """A small picture with its own colours and layout (distinct descriptors per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((48, 64, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, 40), rng.integers(0, 56)
        pixels[y : y + 12, x : x + 12] = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _answers(root: Path, queries: np.ndarray, k: int = 10) -> list[list[str]]:
    index = load_index(versions.resolve_index(str(root)))
    _, found = index.search(queries, k)
    return index.ranked_ids(found)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model = save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")
    return build_config(
        {
            "backbone": f"savedmodel:{model}",
            "image_size": 64,
            "runner": "local",
            "workers": 1,
            "shard_size": 8,
            # These tests follow local features extracted with the descriptors, layered over
            # the versions; first use (the default) is test_reindex_first_use_*.
            "local_at": "extract",
        }
    )


def test_reindex_extracts_only_changes_and_rolls_back(tmp_path: Path, config):
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i in range(40):
        _image(corpus / f"img{i:03d}.png", seed=i)
    first = reindex(str(corpus), str(root), config)
    assert (first["new"], first["changed"], first["deleted"], first["unchanged"]) == (40, 0, 0, 0)
    assert first["failed"] == 0 and versions.current(str(root)) == "v000001"
    v1_desc = root / "versions" / "v000001" / "descriptors"
    _, _, v1_vectors = descriptor_shards.read_all(str(v1_desc))
    before = _answers(root, v1_vectors)

    for i in range(40, 50):  # 10 new
        _image(corpus / f"img{i:03d}.png", seed=i)
    for i in (3, 4, 5):  # 3 changed
        _image(corpus / f"img{i:03d}.png", seed=1000 + i)
    deleted = [f"img{i:03d}.png" for i in (10, 11, 12, 13, 14)]
    for name in deleted:  # 5 deleted
        (corpus / name).unlink()
    (corpus / "img020.png").touch()  # a new modification time, the same bytes: unchanged

    second = reindex(str(corpus), str(root), config)
    counts = {k: second[k] for k in ("new", "changed", "deleted", "unchanged", "failed")}
    assert counts == {"new": 10, "changed": 3, "deleted": 5, "unchanged": 32, "failed": 0}
    v2 = root / "versions" / "v000002"
    on_disk = json.loads((v2 / "summary.json").read_text())
    assert on_disk["new"] == 10 and on_disk["extracted"] == 13
    batch = root / "data" / "v000002"  # this run's extraction
    extracted = json.loads((batch / "descriptors" / "summary.json").read_text())
    assert extracted["inputs"] == 13  # exactly the new and changed images went through the model
    local = extracted["local_features"]
    assert (local["rows"], local["failed"]) == (13, 0)  # and got local features, once
    bundle = json.loads((v2 / "bundle.json").read_text())
    layers = [str(root / "data" / v / "local_features") for v in ("v000001", "v000002")]
    assert bundle["local_features"] == layers  # v1's features shared, not copied
    assert second["indexed"] == 45 and versions.current(str(root)) == "v000002"

    index = load_index(versions.resolve_index(str(root)))
    assert not set(deleted) & set(index.ids)
    _, _, vectors = descriptor_shards.read_all(str(v2 / "descriptors"))
    after = _answers(root, vectors)
    assert not set(deleted) & {i for row in after for i in row}

    rebuilt = tmp_path / "rebuilt"
    full = reindex(str(corpus), str(rebuilt), config)
    assert full["new"] == 45
    reference = _answers(rebuilt, vectors)
    agree = sum(len(set(a) & set(b)) for a, b in zip(after, reference, strict=True))
    assert agree / sum(len(b) for b in reference) >= 0.99

    # search --index ROOT follows CURRENT; rollback moves it back and the old answers return
    assert cli.main(["rollback", "--root", str(root)]) == 0
    assert versions.current(str(root)) == "v000001"
    assert _answers(root, v1_vectors) == before
    assert (
        cli.main(
            [
                "search",
                "--index",
                str(root),
                "--queries",
                str(v1_desc),
                "--output",
                str(tmp_path / "search"),
                "--k",
                "10",
                "--qe",
                "0",
            ]
        )
        == 0
    )
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "search" / "results.parquet")
    assert set(table.column("id").to_pylist()) <= {f"img{i:03d}.png" for i in range(40)}
    assert any(i in deleted for i in table.column("id").to_pylist())  # v1 still had them


def test_reindex_first_use_computes_local_features_in_each_version(tmp_path: Path, config):
    """First use (the default): a re-index extracts only global descriptors of the changes;
    each version computes the local features its mining and searches need under its own batch
    folder, and searching the root computes only the shortlisted images' not yet there."""
    import pyarrow.parquet as pq

    from pipelines.job import Bundle

    first_use = replace(config, local_at="first-use")
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i in range(12):
        _image(corpus / f"img{i:03d}.png", seed=i)
    reindex(str(corpus), str(root), first_use)
    _image(corpus / "img100.png", seed=100)
    second = reindex(str(corpus), str(root), first_use)
    assert second["extracted"] == 1
    batch = root / "data" / "v000002"
    extracted = json.loads((batch / "descriptors" / "summary.json").read_text())
    assert extracted.get("local_features") is None  # nothing extracted but the descriptor
    v2 = root / "versions" / "v000002"
    bundle = Bundle.read(str(v2))
    assert bundle.record["local_features"] is None
    assert bundle.first_use_root == str(batch / "local_features")
    # Mining proposed every image (the sample is larger than the corpus): v1 computed its 12,
    # v2 inherits them and computes only the new image, whether or not it learned again.
    made = bundle.local_feature_store()
    assert "img100.png" not in made or second["whitening_reason"]
    queries = str(v2 / "descriptors")
    out = tmp_path / "search"
    argv = ["search", "--index", str(root), "--queries", queries, "--output", str(out)]
    assert cli.main([*argv, "--k", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    request = summary["local_features_first_use"]
    assert (request["requested"], request["cached"]) == (13, 13)
    assert pq.read_table(out / "results.parquet").num_rows == 13 * 5


def test_reindex_first_use_inherits_what_did_not_change(tmp_path: Path, config, monkeypatch):
    """A version reads the local features earlier versions computed for images whose bytes
    did not change, never those of a changed, deleted or re-added image, and keeps the layers
    it reads when the versions that made them are pruned."""
    from pipelines.job import Bundle
    from retrieval.local_feature_cache import layers

    first_use = replace(config, local_at="first-use")
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i in range(12):
        _image(corpus / f"img{i:03d}.png", seed=i)
    reindex(str(corpus), str(root), first_use, keep=1)
    v1_layers = layers(str(root / "data" / "v000001" / "local_features"))
    assert v1_layers  # mining computed every image's features in v1
    old = Bundle.read(str(root / "versions" / "v000001")).local_feature_store()
    assert len(old) == 12
    old_features = {i: old.get(i) for i in ("img002.png", "img003.png", "img005.png")}

    _image(corpus / "img003.png", seed=1003)  # changed
    (corpus / "img005.png").unlink()  # deleted
    _image(corpus / "img100.png", seed=100)  # new
    second = reindex(str(corpus), str(root), first_use, keep=1)
    assert (second["changed"], second["deleted"], second["new"]) == (1, 1, 1)
    assert versions.versions(str(root)) == ["v000002"]  # v1 pruned, its layers kept
    assert all(Path(layer).is_dir() for layer in v1_layers)
    manifest = json.loads((root / "versions" / "v000002" / "version.json").read_text())
    assert {"v000001", "v000002"} <= set(manifest["uses"])

    bundle = Bundle.read(str(root / "versions" / "v000002"))
    where = bundle.first_use
    assert where is not None and where.root == str(root / "data" / "v000002" / "local_features")
    assert [layer.folder for layer in where.inherited] == v1_layers
    assert set().union(*(layer.excluded for layer in where.inherited)) == {
        "img003.png",
        "img005.png",
    }
    store = bundle.local_feature_store()
    unchanged = {f"img{i:03d}.png" for i in range(12)} - {"img003.png", "img005.png"}
    assert unchanged <= {i for i in unchanged if i in store}
    np.testing.assert_array_equal(
        store.get("img002.png").descriptors, old_features["img002.png"].descriptors
    )

    # A search asks for every image: the unchanged ones are read from v1's layer, the changed
    # and the new one computed, the changed one from its new bytes.
    out = tmp_path / "search"
    queries = str(root / "versions" / "v000002" / "descriptors")
    argv = ["search", "--index", str(root), "--queries", queries, "--output", str(out), "--k", "5"]
    assert cli.main(argv) == 0
    request = json.loads((out / "summary.json").read_text())["local_features_first_use"]
    assert request["requested"] == 12
    assert request["cached"] + request["computed"] == 12
    assert request["cached"] >= len(unchanged)
    store = Bundle.read(str(root / "versions" / "v000002")).local_feature_store()
    assert len(store) == 12 and "img005.png" not in store
    changed = store.get("img003.png")
    assert changed is not None
    assert changed.descriptors.shape != old_features["img003.png"].descriptors.shape or not (
        np.array_equal(changed.descriptors, old_features["img003.png"].descriptors)
    )

    # The image comes back with other bytes: not read from the layers that hold its old ones
    # (here v3's mining computes it again, from its new bytes).
    _image(corpus / "img005.png", seed=2005)
    third = reindex(str(corpus), str(root), first_use, keep=1)
    assert third["new"] == 1
    latest = Bundle.read(str(root / "versions" / "v000003"))
    assert latest.first_use is not None
    from_v1 = [i for i in latest.first_use.inherited if i.folder in v1_layers]
    assert from_v1 and all("img005.png" in layer.excluded for layer in from_v1)
    store = latest.local_feature_store()
    assert "img002.png" in store
    back = store.get("img005.png")
    assert back is None or not np.array_equal(
        back.descriptors[:5], old_features["img005.png"].descriptors[:5]
    )

    # A version that extracted nothing still keeps the folder its searches compute into.
    fourth = reindex(str(corpus), str(root), first_use, keep=1)
    assert fourth["extracted"] == 0
    manifest = json.loads((root / "versions" / "v000004" / "version.json").read_text())
    assert "v000004" in manifest["uses"]

    # Past MAX_INHERITED_LAYERS a version copies the layers it inherits into one of its own.
    import retrieval.local_feature_cache as cache

    readable = Bundle.read(str(root / "versions" / "v000004")).local_feature_store()
    monkeypatch.setattr(cache, "MAX_INHERITED_LAYERS", 0)
    fifth = reindex(str(corpus), str(root), first_use, keep=1)
    assert fifth["local_features_compacted"]["images"] == len(readable) == 13
    latest = Bundle.read(str(root / "versions" / "v000005"))
    assert latest.first_use is not None and latest.first_use.inherited == ()
    assert len(layers(latest.first_use.root)) == 1
    store = latest.local_feature_store()
    assert len(store) == 13
    for image_id in ("img002.png", "img003.png", "img005.png", "img100.png"):
        np.testing.assert_array_equal(
            store.get(image_id).descriptors, readable.get(image_id).descriptors
        )
    assert versions.versions(str(root)) == ["v000005"]  # the older layers may go now


def test_old_versions_are_pruned_and_never_the_live_one(tmp_path: Path, config):
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i in range(6):
        _image(corpus / f"a{i}.png", seed=i)
    for run in range(3):
        _image(corpus / f"b{run}.png", seed=100 + run)
        reindex(str(corpus), str(root), config, keep=2)
    assert versions.versions(str(root)) == ["v000002", "v000003"]
    assert versions.current(str(root)) == "v000003"
    assert versions.rollback(str(root)) == "v000002"
    with pytest.raises(ValueError, match="no version older"):
        versions.rollback(str(root))
    (root / "CURRENT").write_text("../../etc\n")
    with pytest.raises(ValueError, match="not a version name"):
        versions.current(str(root))


def test_drift_is_measured_against_the_training_sample():
    rng = np.random.default_rng(0)
    d = 32
    train = rng.standard_normal((4000, d)).astype(np.float32)
    train[:, :8] *= 4  # most energy in a few directions, as in real descriptors
    held_out = rng.standard_normal((1000, d)).astype(np.float32)
    held_out[:, :8] *= 4
    other = rng.standard_normal((1000, d)).astype(np.float32)
    other[:, 24:] *= 4  # energy in other directions: a different kind of image
    index = faiss.index_factory(d, "IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    base = quantization_error(index, train)
    assert drift_ratio(quantization_error(index, held_out), base) < 1.2
    assert drift_ratio(quantization_error(index, other), base) > DRIFT_THRESHOLD
    flat = faiss.index_factory(d, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    assert quantization_error(flat, other) == 0.0


def _corpus(tmp_path: Path, n: int) -> tuple[Path, Path]:
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    corpus.mkdir()
    for i in range(n):
        _image(corpus / f"img{i:03d}.png", seed=i)
    return corpus, root


def _corpus_ids(corpus: Path) -> list[str]:
    return sorted(p.name for p in corpus.iterdir())


def test_versions_share_descriptors_instead_of_copying_them(tmp_path: Path, config):
    corpus, root = _corpus(tmp_path, 24)
    reindex(str(corpus), str(root), config)
    v1_ids, _, v1_vectors = descriptor_shards.read_all(str(root / "versions/v000001/descriptors"))
    _image(corpus / "img003.png", seed=1003)  # changed
    _image(corpus / "img100.png", seed=100)  # new
    (corpus / "img010.png").unlink()  # deleted
    second = reindex(str(corpus), str(root), config)
    assert (second["new"], second["changed"], second["deleted"]) == (1, 1, 1)

    v2 = root / "versions" / "v000002" / "descriptors"
    assert not list(v2.glob("part-*.parquet")) and not list(v2.glob("*-part-*.parquet"))
    sources = set()
    for manifest in descriptor_shards.list_shards(str(v2)):  # references, no rows of its own
        folder, shard = descriptor_shards.source_of(str(v2), manifest)
        sources.add(Path(folder).relative_to(root).as_posix())
        assert (Path(folder) / f"{shard}.parquet").exists()
    assert sources == {"data/v000001/descriptors", "data/v000002/descriptors"}
    version = json.loads((root / "versions" / "v000002" / "version.json").read_text())
    assert version["uses"] == ["v000001", "v000002"]

    ids, _, vectors = descriptor_shards.read_all(str(v2))  # every reader sees the kept rows
    assert sorted(ids) == _corpus_ids(corpus)
    before = dict(zip(v1_ids, v1_vectors, strict=True))
    for image_id, vector in zip(ids, vectors, strict=True):
        if image_id not in ("img003.png", "img100.png"):
            np.testing.assert_array_equal(vector, before[image_id])  # shared, not re-extracted
    assert sorted(load_index(versions.resolve_index(str(root))).ids) == _corpus_ids(corpus)

    _image(corpus / "img101.png", seed=101)
    third = reindex(str(corpus), str(root), config, keep=1)  # v1 and v2 pruned...
    assert third["pruned"] == ["v000001", "v000002"] and versions.versions(str(root)) == ["v000003"]
    used = json.loads((root / "versions" / "v000003" / "version.json").read_text())["uses"]
    assert used == ["v000001", "v000002", "v000003"]
    assert all((root / "data" / name / "descriptors").is_dir() for name in used)  # ...not data
    ids, _, _ = descriptor_shards.read_all(str(root / "versions" / "v000003" / "descriptors"))
    assert sorted(ids) == _corpus_ids(corpus)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_extracted_again_by_the_next_reindex(tmp_path: Path, config):
    from pipelines.job import Bundle
    from retrieval.shards.local_feature_shards import LocalFeatureStore

    corpus, root = _corpus(tmp_path, 20)
    reindex(str(corpus), str(root), config)
    v1 = root / "versions" / "v000001" / "descriptors"
    read = descriptor_shards.list_shards(str(v1))[
        1
    ]  # the file the version reads its 2nd shard from
    source = read.get("source")
    data = (v1 / source["folder"]) / f"{source['shard']}.parquet" if source else None
    _flip(data or v1 / f"{read['shard']}.parquet")  # 8 images
    second = reindex(str(corpus), str(root), config)
    assert (second["repaired"], second["extracted"], second["new"]) == (8, 8, 0)
    v2 = root / "versions" / "v000002" / "descriptors"
    sources = {
        descriptor_shards.source_of(str(v2), m) for m in descriptor_shards.list_shards(str(v2))
    }
    assert (str(root / "data" / "v000001" / "descriptors"), "part-00001") not in sources
    ids, _, _ = descriptor_shards.read_all(str(v2))
    assert sorted(ids) == _corpus_ids(corpus)

    _flip(root / "data" / "v000001" / "local_features" / "part-00000.arrow")
    third = reindex(str(corpus), str(root), config)
    assert (third["repaired"], third["extracted"]) == (8, 8)
    bundle = Bundle.read(versions.version_dir(str(root), "v000003"))
    store = LocalFeatureStore(bundle.local_features)
    assert all(store.get(i) is not None for i in _corpus_ids(corpus))  # none read from damage


def test_an_interrupted_reindex_is_cleaned_up_by_the_next(tmp_path: Path, config, monkeypatch):
    from pipelines import reindex as reindex_module
    from retrieval import leases

    corpus, root = _corpus(tmp_path, 12)
    reindex(str(corpus), str(root), config)
    _image(corpus / "img100.png", seed=100)

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(reindex_module, "run_index_job", interrupted)
        with pytest.raises(RuntimeError, match="interrupted"):
            reindex(str(corpus), str(root), config)
    assert (root / "versions" / "v000002").is_dir() and (root / "data" / "v000002").is_dir()
    assert not (root / "versions" / "v000002" / "version.json").exists()

    # While another run holds the root's lease, its versions are left alone.
    held = leases.acquire(str(root), what="another run")
    with pytest.raises(leases.LeaseHeldError, match="another run"):
        reindex(str(corpus), str(root), config)
    assert (root / "versions" / "v000002").is_dir()
    mine = versions.claim(str(root), held.owner)
    assert versions.remove_incomplete(str(root), held) == ["v000002"]
    assert (root / "versions" / mine).is_dir()  # the lease holder's own claim stays
    held.release()

    third = reindex(str(corpus), str(root), config)
    assert third["version"] == "v000004" and versions.current(str(root)) == "v000004"
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["v000001", "v000004"]
    assert sorted(p.name for p in (root / "data").iterdir()) == ["v000001", "v000004"]


def test_current_only_moves_forward_and_a_name_is_claimed_once(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    root = str(tmp_path / "root")
    with ThreadPoolExecutor(6) as pool:
        names = list(pool.map(lambda i: versions.claim(root, f"run-{i}"), range(6)))
    assert sorted(names) == [f"v{i:06d}" for i in range(1, 7)]  # six runs, six names
    for name in ("v000001", "v000002"):
        (tmp_path / "root" / "versions" / name / "version.json").write_text("{}")
    versions.set_current(root, "v000002")
    with pytest.raises(ValueError, match="only moves forward"):
        versions.set_current(root, "v000001")  # a slower run finishing after a newer one
    assert versions.current(root) == "v000002"
    assert versions.rollback(root) == "v000001"  # moving back is rollback's alone


def test_a_version_from_before_shared_data_is_carried_once(tmp_path: Path, config):
    """A live version whose descriptors are its own shards (the layout before versions shared
    data, which pruning would delete with it): the next re-index writes them once into its
    batch (data/vN/carried) and refers to them from then on."""
    from retrieval import plan
    from retrieval.corpus import ImageRef, plan_shards

    corpus, root = _corpus(tmp_path, 12)
    reindex(str(corpus), str(root), config)
    v1 = root / "versions" / "v000001" / "descriptors"
    rows, info = [], None
    for manifest in descriptor_shards.list_shards(str(v1)):
        shard = descriptor_shards.read_shard(str(v1), manifest)
        info = manifest["model"]
        for i, image_id in enumerate(shard.ids):
            row = descriptor_shards.DescriptorRow(
                image_id, shard.uris[i], "0" * 64, 48, 64, shard.vectors[i]
            )
            rows.append(row)
    for path in v1.iterdir():  # the old layout: rows of its own, an extraction plan
        path.unlink()
    specs = plan_shards([ImageRef(r.id, r.uri) for r in rows], 8)
    for spec in specs:
        descriptor_shards.write_shard(str(v1), spec, rows[: len(spec.refs)], [], info)
        rows = rows[len(spec.refs) :]
    plan.write_extraction_plan(str(v1), specs, source="reindex", shard_size=8)

    (corpus / "img005.png").unlink()
    second = reindex(str(corpus), str(root), config, keep=1)
    assert (second["deleted"], second["indexed"]) == (1, 11)
    carried = root / "data" / "v000002" / "carried"
    ids, _, _ = descriptor_shards.read_all(str(carried))
    assert sorted(ids) == _corpus_ids(corpus)  # written once, less the deleted image
    assert not (root / "versions" / "v000001").exists()  # pruned: its rows live on in data/
    v2 = root / "versions" / "v000002" / "descriptors"
    ids, _, _ = descriptor_shards.read_all(str(v2))
    assert sorted(ids) == _corpus_ids(corpus)
    assert [p.name for p in v2.glob("*.parquet")] == ["plan.shards.parquet"]  # references


def test_an_unreadable_image_is_an_error_row_and_an_outage_keeps_what_was_indexed(
    tmp_path: Path, config, monkeypatch
):
    """A FIFO and a symbolic-link loop in the corpus do not stop the nightly run: each is an
    error row with its reason. An indexed image that cannot be read to key it (an outage
    outlasting the retries) stays as it was indexed, and the next run looks again."""
    import os

    from retrieval import corpus_state, storage

    corpus, root = _corpus(tmp_path, 12)
    os.mkfifo(corpus / "pipe.png")
    (corpus / "loop-a.png").symlink_to("loop-b.png")
    (corpus / "loop-b.png").symlink_to("loop-a.png")
    first = reindex(str(corpus), str(root), config)
    assert (first["indexed"], first["failed"]) == (12, 3)
    v1 = root / "versions" / "v000001"
    kinds = {
        e.id: e.error_kind
        for m in descriptor_shards.list_shards(str(root / "data/v000001/descriptors"))
        for e in descriptor_shards.read_errors(str(root / "data/v000001/descriptors"), m)
    }
    assert kinds == {"pipe.png": "not_a_file", "loop-a.png": "symlink_loop",
                     "loop-b.png": "symlink_loop"}  # fmt: skip
    assert sorted(descriptor_shards.read_all(str(v1 / "descriptors"))[0]) == [
        f"img{i:03d}.png" for i in range(12)
    ]

    real = corpus_state.content_key
    down = str(corpus / "img004.png")

    def outage(uri: str, info: dict | None = None) -> str:
        if uri == down:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(uri, info)

    monkeypatch.setattr(corpus_state, "content_key", outage)
    monkeypatch.setattr(storage, "with_retries", lambda fn, **_: fn())  # no backoff in a test
    _image(corpus / "img004.png", seed=1004)  # it did change, but cannot be read now
    second = reindex(str(corpus), str(root), config)
    assert (second["kept_unreadable"], second["changed"], second["indexed"]) == (1, 0, 12)
    v2_ids = descriptor_shards.read_all(str(root / "versions/v000002/descriptors"))[0]
    assert "img004.png" in v2_ids  # kept as indexed, not lost for an outage

    monkeypatch.setattr(corpus_state, "content_key", real)
    third = reindex(str(corpus), str(root), config)  # back: the change is seen now
    assert (third["kept_unreadable"], third["changed"], third["indexed"]) == (0, 1, 12)
