"""The run plan in storage, versioned and checksummed manifests, and untrusted names.

Stale shards: a second extract into the same folder with a smaller listing or another shard size
must leave the earlier run's extra ``part-*`` files out of every later stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import MODEL_INFO, write_descriptors

import schemas
from retrieval import manifests, plan, shard_manifests
from retrieval.corpus import ImageRef, ShardSpec, plan_shards
from retrieval.index.codebook import train_codebook
from retrieval.index.group_index import build_group_index, plan_index_groups, write_index_plan
from retrieval.index.merge import merge_index_groups
from retrieval.index.search import load_index
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow


def _refs(n: int, prefix: str = "img") -> list[ImageRef]:
    return [ImageRef(f"{prefix}{i:04d}.jpg", f"/data/{prefix}{i:04d}.jpg") for i in range(n)]


def test_plan_round_trip_and_reading_one_shard(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(plan, "ROW_GROUP_ROWS", 7)  # many row groups: pruning must still work
    specs = plan_shards(_refs(50), 6)
    written = plan.write_extraction_plan(str(tmp_path), specs, source="/data", shard_size=6)
    assert written.inputs == 50 and len(written.shards) == 9

    read = plan.read_plan(str(tmp_path))
    assert read.shards == written.shards
    assert read.manifest["shard_size"] == 6 and read.manifest["source"] == "/data"
    assert [s.input_digest for s in read.shards] == [s.input_digest for s in specs]
    for spec in specs:
        assert plan.read_shard_spec(str(tmp_path), spec.shard_id) == spec
    with pytest.raises(plan.PlanError, match="no shard"):
        plan.read_shard_spec(str(tmp_path), "part-00099")

    # Plain Parquet: any runner can build its own table from it.
    refs = pq.read_table(tmp_path / plan.REFS_FILE)
    assert refs.column_names == ["shard_id", "id", "uri", "problem", "sealed"]
    assert refs.num_rows == 50
    assert pq.ParquetFile(tmp_path / plan.REFS_FILE).metadata.num_row_groups == 8


def test_rewriting_the_same_plan_leaves_it_untouched(tmp_path: Path):
    specs = plan_shards(_refs(10), 4)
    first = plan.write_extraction_plan(str(tmp_path), specs, source="/data", shard_size=4)
    stamp = (tmp_path / plan.PLAN_MANIFEST).stat().st_mtime_ns
    again = plan.write_extraction_plan(str(tmp_path), specs, source="/data", shard_size=4)
    assert again.manifest == first.manifest
    assert (tmp_path / plan.PLAN_MANIFEST).stat().st_mtime_ns == stamp
    other = plan.write_extraction_plan(str(tmp_path), specs[:2], source="/data", shard_size=4)
    assert other.manifest["plan_id"] != first.manifest["plan_id"]


def test_a_replaced_refs_file_is_refused_by_workers(tmp_path: Path):
    specs = plan_shards(_refs(10), 4)
    plan.write_extraction_plan(str(tmp_path), specs, source="/data", shard_size=4)
    other = plan_shards(_refs(10, prefix="other"), 4)
    plan.write_extraction_plan(str(tmp_path / "other"), other, source="/data", shard_size=4)
    # a plan file swapped under the manifest
    (tmp_path / plan.REFS_FILE).write_bytes((tmp_path / "other" / plan.REFS_FILE).read_bytes())
    with pytest.raises(plan.PlanError, match="do not match the plan"):
        plan.read_shard_spec(str(tmp_path), "part-00000")


def test_no_plan_is_a_clear_error(tmp_path: Path):
    with pytest.raises(plan.PlanError, match="no run plan"):
        descriptor_shards.list_shards(str(tmp_path))


def test_ids_planned_twice_are_refused(tmp_path: Path):
    specs = [ShardSpec("part-00000", (ImageRef("a", "/x/a.jpg"), ImageRef("a", "/y/a.jpg")))]
    with pytest.raises(plan.PlanError, match="planned twice"):
        plan.write_extraction_plan(str(tmp_path), specs, source="/", shard_size=2)


def test_stale_shards_of_an_earlier_run_do_not_count(tmp_path: Path, caplog):
    desc = tmp_path / "desc"
    write_descriptors(desc, [5, 5, 5, 5])  # first run: 4 shards
    # The second run plans fewer inputs: only the first two shards are part of it.
    ids, vectors = write_descriptors(desc, [5, 5], seed=0)
    assert (desc / "part-00003.manifest.json").exists()  # left over, committed

    with caplog.at_level("WARNING"):
        got_ids, _, got = descriptor_shards.read_all(str(desc))
    assert got_ids == ids
    np.testing.assert_array_equal(got, vectors)
    assert "part-00002, part-00003" in caplog.text and "ignored" in caplog.text
    assert plan.read_plan(str(desc)).stale_shard_ids() == ["part-00002", "part-00003"]

    codebook = train_codebook(str(desc), str(tmp_path / "cb"), factory="IDMap2,Flat")
    assert codebook["vectors"] == 10
    tasks = plan_index_groups(str(desc), str(tmp_path / "cb"), group_vectors=1)
    assert [m["shard"] for t in tasks for m in t.shard_manifests] == ["part-00000", "part-00001"]


def test_a_shard_not_committed_for_the_plan_is_an_error(tmp_path: Path):
    desc = tmp_path / "desc"
    write_descriptors(desc, [5, 5])
    # The plan now wants other inputs in part-00001 than the committed shard holds.
    spec0 = plan.read_shard_spec(str(desc), "part-00000")
    changed = ShardSpec("part-00001", (ImageRef("new.jpg", "/img/new.jpg"),))
    plan.write_extraction_plan(str(desc), [spec0, changed], source="/img", shard_size=5)
    with pytest.raises(
        plan.PlanError, match=r"1 of 2 planned shards are not committed.*part-00001"
    ):
        descriptor_shards.read_all(str(desc))


def _index(tmp_path: Path, desc: Path, name: str) -> Path:
    train_codebook(str(desc), str(tmp_path / f"cb-{name}"), factory="IDMap2,Flat")
    tasks = plan_index_groups(str(desc), str(tmp_path / f"cb-{name}"), group_vectors=1)
    write_index_plan(tasks, str(tmp_path / f"shards-{name}"))
    for task in tasks:
        build_group_index(task, str(tmp_path / f"shards-{name}"))
    return tmp_path / f"shards-{name}"


def test_stale_shard_indexes_are_not_merged(tmp_path: Path):
    big = tmp_path / "big"
    write_descriptors(big, [4, 4, 4])
    shards = _index(tmp_path, big, "x")
    small = tmp_path / "small"
    ids, _ = write_descriptors(small, [4, 4])
    train_codebook(str(small), str(tmp_path / "cb-y"), factory="IDMap2,Flat")
    tasks = plan_index_groups(str(small), str(tmp_path / "cb-y"), group_vectors=1)
    write_index_plan(tasks, str(shards))  # the same shard folder, fewer shards
    for task in tasks:
        build_group_index(task, str(shards))
    merge_index_groups(str(shards), str(tmp_path / "index"))
    assert list(load_index(str(tmp_path / "index")).ids) == ids


def test_ids_must_be_unique_across_an_index(tmp_path: Path):
    desc = tmp_path / "desc"
    specs = []
    for s in range(2):  # the same image id in two shards (e.g. hand-made manifests)
        spec = ShardSpec(f"part-{s:05d}", (ImageRef("same.jpg", f"/img/{s}/same.jpg"),))
        row = DescriptorRow("same.jpg", spec.refs[0].uri, "0" * 64, 9, 9, np.ones(32, np.float32))
        descriptor_shards.write_shard(str(desc), spec, [row], [], MODEL_INFO)
        specs.append(spec)
    pq_plan = plan.PlannedShard  # written as the index stage would see it
    plan.write_plan(
        str(desc), [pq_plan(s.shard_id, 1, s.input_digest) for s in specs], stage="extract"
    )
    shards = _index(tmp_path, desc, "dup")
    with pytest.raises(plan.PlanError, match=r"'same.jpg'.*unique across an index"):
        merge_index_groups(str(shards), str(tmp_path / "index"))


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_checksum_version_and_kind_are_checked(tmp_path: Path):
    uri = str(tmp_path / "x.json")
    written = manifests.write_manifest(uri, "codebook", {"factory": "PQ8", "dim": 4})
    assert manifests.read_manifest(uri, kind="codebook") == written
    assert written["schema_version"] == schemas.CURRENT_VERSIONS["manifest"]
    with pytest.raises(manifests.ManifestError, match="'merged_index' manifest was expected"):
        manifests.read_manifest(uri, kind="merged_index")

    altered = json.loads(Path(uri).read_text())
    altered["dim"] = 8
    Path(uri).write_text(json.dumps(altered))
    with pytest.raises(manifests.ManifestError, match="checksum does not match"):
        manifests.read_manifest(uri)

    altered["schema_version"] = 1  # an older version of the code wrote it
    Path(uri).write_text(json.dumps(altered))
    with pytest.raises(schemas.SchemaMismatchError, match="version 1 is not supported"):
        manifests.read_manifest(uri)

    Path(uri).write_text('{"schema_version": 2, "ki')  # cut short
    with pytest.raises(manifests.ManifestError, match="not valid JSON"):
        manifests.read_manifest(uri)


def test_manifest_of_another_shard_is_refused(tmp_path: Path):
    desc = tmp_path / "desc"
    write_descriptors(desc, [3, 3])
    # part-00001's manifest copied over part-00000's: it would point at the other shard's data.
    (desc / "part-00000.manifest.json").write_bytes(
        (desc / "part-00001.manifest.json").read_bytes()
    )
    with pytest.raises(manifests.ManifestError, match=r"says shard 'part-00001'.*'part-00000'"):
        shard_manifests.read(str(desc), "part-00000")
    with pytest.raises(manifests.ManifestError):
        descriptor_shards.read_all(str(desc))


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", "", "x" * 200, None, 5])
def test_unsafe_shard_names_are_refused(tmp_path: Path, name):
    with pytest.raises(manifests.ManifestError, match="unsafe"):
        descriptor_shards.data_uri(str(tmp_path), name)
    with pytest.raises(manifests.ManifestError, match="unsafe"):
        plan.write_plan(str(tmp_path), [plan.PlannedShard(name, 1, "d")], stage="extract")


def test_index_refuses_descriptors_of_another_model(tmp_path: Path):
    desc = tmp_path / "desc"
    write_descriptors(desc, [6, 6])
    train_codebook(str(desc), str(tmp_path / "cb"), factory="IDMap2,Flat")
    other = tmp_path / "other"
    write_descriptors(other, [6], model_info={**MODEL_INFO, "config_hash": "e" * 16})
    with pytest.raises(manifests.ManifestError, match="different models: config_hash differs"):
        plan_index_groups(str(other), str(tmp_path / "cb"), group_vectors=1)


def test_merge_refuses_shards_of_different_codebooks(tmp_path: Path):
    desc = tmp_path / "desc"
    write_descriptors(desc, [6, 6])
    train_codebook(str(desc), str(tmp_path / "cb1"), factory="IVF2,Flat")
    train_codebook(str(desc), str(tmp_path / "cb2"), factory="IVF3,Flat")
    tasks1 = plan_index_groups(str(desc), str(tmp_path / "cb1"), group_vectors=1)
    tasks2 = plan_index_groups(str(desc), str(tmp_path / "cb2"), group_vectors=1)
    mixed = [tasks1[0], tasks2[1]]
    write_index_plan(mixed, str(tmp_path / "shards"))
    for task in mixed:
        build_group_index(task, str(tmp_path / "shards"))
    with pytest.raises(manifests.ManifestError, match="different codebooks: codebook_id differs"):
        merge_index_groups(str(tmp_path / "shards"), str(tmp_path / "index"))


def test_altered_codebook_is_refused(tmp_path: Path):
    desc = tmp_path / "desc"
    write_descriptors(desc, [6])
    train_codebook(str(desc), str(tmp_path / "cb"), factory="IDMap2,Flat")
    tasks = plan_index_groups(str(desc), str(tmp_path / "cb"), group_vectors=1)
    with open(tmp_path / "cb" / "codebook.faissindex", "ab") as f:
        f.write(b"\0")
    with pytest.raises(OSError, match="checksum does not match"):
        build_group_index(tasks[0], str(tmp_path / "shards"))
