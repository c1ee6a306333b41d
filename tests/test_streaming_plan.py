"""Listing and planning in bounded memory: the external sort, streamed manifests and folder
listings, and a plan written row group by row group that is byte-identical to a whole-table
write (so streaming changed no plan)."""

from __future__ import annotations

import csv
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from retrieval import external_sort, plan, storage
from retrieval.corpus import ImageRef, ShardSpec, iter_corpus, iter_shards, list_corpus


def _shuffled_refs(n: int, seed: int = 0) -> list[ImageRef]:
    rng = random.Random(seed)
    refs = []
    for i in range(n):
        image_id = rng.choice([f"img{rng.randrange(n // 2):05d}", f"é/ü{i % 7}", f"Z{i}"])
        problem = "unsafe_uri: test" if i % 11 == 0 else None
        refs.append(ImageRef(image_id, f"/data/{rng.randrange(5)}/{image_id}", problem))
    return refs


@pytest.mark.parametrize("run_rows", [1, 7, 1000])
def test_external_sort_equals_sorted(monkeypatch, run_rows: int):
    monkeypatch.setattr(external_sort, "MERGE_FAN_IN", 3)  # several merge passes
    monkeypatch.setattr(external_sort, "READ_ROWS", 4)
    refs = _shuffled_refs(400)
    expected = sorted(refs, key=lambda r: (r.id, r.uri))  # stable: equal keys keep input order
    assert list(external_sort.sort_refs(refs, run_rows=run_rows)) == expected
    assert list(external_sort.sort_refs([], run_rows=run_rows)) == []


def test_external_sort_cleans_its_scratch(tmp_path: Path):
    sorted_refs = external_sort.sort_refs(_shuffled_refs(300), run_rows=10, scratch=str(tmp_path))
    next(sorted_refs)
    assert list(tmp_path.iterdir())  # runs spilled
    sorted_refs.close()
    assert not list(tmp_path.iterdir())


def _in_memory_listing(refs: list[ImageRef]) -> list[ImageRef]:
    """The listing as it was computed before streaming: one sort, then duplicates marked."""
    out: list[ImageRef] = []
    for ref in sorted(refs, key=lambda r: (r.id, r.uri)):
        if out and out[-1].id == ref.id:
            ref = ImageRef(ref.id, ref.uri, f"duplicate_id: id {ref.id!r} is also {out[-1].uri}")
        out.append(ref)
    return out


def test_streamed_manifest_listing_equals_in_memory_listing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(external_sort, "RUN_ROWS", 50)  # spill: runs of 50 entries
    rows = [(f"id{random.Random(i).randrange(300)}", f"gs://b/{i}.jpg") for i in range(1000)]
    rows += [("", "sub/x.jpg"), ("up", "../secret.jpg")]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "uri"), *rows])
    pq.write_table(
        pa.table({"id": [r[0] for r in rows], "uri": [r[1] for r in rows]}),
        tmp_path / "m.parquet",
        row_group_size=64,
    )
    from_csv = list_corpus(str(tmp_path / "m.csv"))
    assert list(iter_corpus(str(tmp_path / "m.parquet"))) == from_csv
    raw = [ImageRef(r.id, r.uri, r.problem if r.problem and "unsafe" in r.problem else None)
           for r in from_csv]  # fmt: skip
    assert from_csv == _in_memory_listing(raw)
    assert sum(1 for r in from_csv if r.problem and r.problem.startswith("duplicate_id")) > 100


def test_streamed_plan_file_is_byte_identical_to_a_whole_table_write(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(plan, "ROW_GROUP_ROWS", 13)
    refs = _in_memory_listing(_shuffled_refs(500))
    specs = list(iter_shards(refs, 6))
    plan.write_extraction_plan(
        str(tmp_path / "a"),
        iter(specs),
        source="/data",
        shard_size=6,
        also_to=[str(tmp_path / "b")],
    )
    table = pa.table(
        {
            "shard_id": [s.shard_id for s in specs for _ in s.refs],
            "id": [r.id for s in specs for r in s.refs],
            "uri": [r.uri for s in specs for r in s.refs],
            "problem": [r.problem for s in specs for r in s.refs],
            "sealed": [r.sealed for s in specs for r in s.refs],
        },
        schema=schemas.arrow_schema("plan_refs"),
    )
    pq.write_table(table, tmp_path / "whole.parquet", compression="zstd", row_group_size=13)
    whole = (tmp_path / "whole.parquet").read_bytes()
    for folder in ("a", "b"):
        assert (tmp_path / folder / plan.REFS_FILE).read_bytes() == whole
        manifest = plan.read_plan(str(tmp_path / folder)).manifest
        assert manifest["files"]["refs"]["sha256"] == storage.sha256_bytes(whole)
        assert manifest["files"]["refs"]["rows"] == 500
    assert plan.read_shard_spec(str(tmp_path / "b"), specs[40].shard_id) == specs[40]


def test_ids_planned_twice_out_of_order_are_refused(tmp_path: Path):
    specs = [
        ShardSpec("part-00000", (ImageRef("b", "/x/b.jpg"), ImageRef("a", "/x/a.jpg"))),
        ShardSpec("part-00001", (ImageRef("c", "/x/c.jpg"), ImageRef("a", "/y/a.jpg"))),
    ]
    with pytest.raises(plan.PlanError, match="'a' is planned twice"):
        plan.write_extraction_plan(str(tmp_path), specs, source="/", shard_size=2)
    assert not (tmp_path / plan.PLAN_MANIFEST).exists()
    fine = [specs[0], ShardSpec("part-00001", (ImageRef("c", "/x/c.jpg"),))]
    assert plan.write_extraction_plan(str(tmp_path), fine, source="/", shard_size=2).inputs == 3


def test_folder_listing_is_streamed_in_parallel(tmp_path: Path):
    names = {f"d{i}/e{j}/{k}.jpg" for i in range(6) for j in range(4) for k in range(5)}
    for name in names | {"top.png", "d0/skip.txt"}:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listed = list(storage.iter_files(str(tmp_path), (".jpg", ".png"), threads=3))
    assert len(listed) == len(set(listed)) == len(names) + 1
    assert sorted(listed) == storage.list_files(str(tmp_path), suffixes=(".jpg", ".png"))


def test_planning_does_not_hold_the_listing(tmp_path: Path):
    """Python memory of listing + sorting + writing the plan of a 60,000-entry manifest stays
    under 10 MB; the listing held as one list of ImageRefs (as before streaming) took ~25 MB."""
    n = 60_000
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri"])
        writer.writerows([f"gs://bucket/photos/{(i * 7919) % n:08d}.jpg"] for i in range(n))
    tracemalloc.start()
    try:
        written = plan.write_extraction_plan(
            str(tmp_path / "plan"),
            iter_shards(iter_corpus(str(tmp_path / "m.csv")), 256),
            source="m.csv",
            shard_size=256,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written.inputs == n and len(written.shards) == 235
    assert peak < 10 * 2**20, f"{peak / 2**20:.1f} MB of Python objects"


# --- the merge's id map and the re-index comparison, streamed ----------------------------------


def _idmap_table(first: int, ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "index_id": pa.array(range(first, first + len(ids)), pa.int64()),
            "id": ids,
            "uri": [f"/img/{i}" for i in ids],
            "shard": ["part-00000"] * len(ids),
        },
        schema=schemas.arrow_schema("idmap"),
    )


@pytest.mark.parametrize(
    ("batches", "repeated"),
    [
        ([["a", "b"], ["c", "d"]], None),  # in order
        ([["b", "a"], ["d", "c"]], None),  # out of order, unique: checked by the external sort
        ([["a", "b"], ["b", "c"]], "'b'"),  # neighbours across row groups
        ([["b", "a"], ["c", "a"]], "'a'"),  # out of order
    ],
)
def test_merged_id_map_is_streamed_and_checked(tmp_path: Path, batches, repeated):
    from retrieval.index.merge import _IdmapMerger

    merger = _IdmapMerger(str(tmp_path / "idmap.parquet"), "merging x")
    first = 7
    for ids in batches:
        merger._add(_idmap_table(first, ids))
        first += len(ids)
    if repeated is None:
        merger.close()
        table = pq.read_table(tmp_path / "idmap.parquet")
        assert table.column("id").to_pylist() == [i for b in batches for i in b]
        assert merger.first_id == 7 and merger.rows == 4
        assert pq.ParquetFile(tmp_path / "idmap.parquet").metadata.num_row_groups == 2
    else:
        with pytest.raises(plan.PlanError, match=rf"1 image id.*{repeated}.*unique across an"):
            merger.close()


def test_merged_id_map_must_be_one_contiguous_range(tmp_path: Path):
    from retrieval.index.merge import _IdmapMerger

    merger = _IdmapMerger(str(tmp_path / "idmap.parquet"), "merging x")
    merger._add(_idmap_table(0, ["a", "b"]))
    with pytest.raises(RuntimeError, match="contiguous"):
        merger._add(_idmap_table(3, ["c"]))


def test_corpus_comparison_is_a_merge_join(tmp_path: Path, monkeypatch):
    from retrieval import corpus_state

    monkeypatch.setattr(corpus_state, "STATE_ROW_GROUP_ROWS", 3)
    previous = [(f"i{k:02d}", f"/x/{k}", f"key{k}") for k in range(0, 20, 2)]
    now = [(f"i{k:02d}", f"/x/{k}", f"key{k}" if k % 4 else "new") for k in range(5, 25)]
    writer = corpus_state.StateWriter(str(tmp_path / "now.parquet"))
    changes = corpus_state.compare(iter(previous), iter(now), writer)
    writer.close()
    before = {r[0]: r for r in previous}
    assert changes.new == [r[0] for r in now if r[0] not in before]
    assert changes.changed == [r[0] for r in now if r[0] in before and before[r[0]] != r]
    assert changes.unchanged == sum(1 for r in now if before.get(r[0]) == r)
    assert changes.deleted == sorted(set(before) - {r[0] for r in now})
    assert changes.uris == {r[0]: r[1] for r in now if before.get(r[0]) != r}
    assert list(corpus_state.iter_state_file(writer.path)) == now
    count = corpus_state.write_state(str(tmp_path / "v"), writer.path, leave_out={"i05", "i24"})
    assert count == 18
    assert [r[0] for r in corpus_state.iter_state(str(tmp_path / "v"), str(tmp_path))] == [
        r[0] for r in now if r[0] not in {"i05", "i24"}
    ]
    bad = corpus_state.StateWriter(str(tmp_path / "bad.parquet"))
    bad.add(now[1])
    with pytest.raises(ValueError, match="out of id order"):
        bad.add(now[0])
