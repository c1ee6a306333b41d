"""Versioned schemas: shard round trip, metadata, refusal of what this code cannot read."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from retrieval import plan
from retrieval import shard_manifests as manifests
from retrieval.corpus import ImageRef, ShardSpec
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow

DIM = 16
MODEL_INFO = {"id": "gem-test", "config_hash": "c" * 16, "weights_sha256": "0" * 64, "dim": DIM}


def _shard(tmp_path, n_rows=5, n_errors=2):
    refs = tuple(ImageRef(f"img{i:02d}", f"/data/img{i:02d}.jpg") for i in range(n_rows + n_errors))
    spec = ShardSpec("part-00000", refs)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n_rows, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Hand rows and errors over out of order: the shard must come back in planned order.
    rows = [
        DescriptorRow(r.id, r.uri, f"{i:064x}", 100 + i, 50 + i, vectors[i])
        for i, r in enumerate(refs[:n_rows])
    ][::-1]
    errors = [ErrorRow(r.id, r.uri, "decode", "truncated", "cut short") for r in refs[n_rows:]][
        ::-1
    ]
    directory = str(tmp_path / "desc")
    manifest = descriptor_shards.write_shard(directory, spec, rows, errors, MODEL_INFO)
    plan.write_extraction_plan(directory, [spec], source="/data", shard_size=len(refs))
    return directory, spec, vectors, manifest


def test_descriptor_shard_round_trip(tmp_path):
    directory, spec, vectors, manifest = _shard(tmp_path)
    assert manifest["rows"] == 5 and manifest["errors"] == 2 and manifest["inputs"] == 7
    assert manifest["schema_version"] == schemas.CURRENT_VERSIONS["manifest"]
    assert manifest["input_digest"] == spec.input_digest

    [listed] = descriptor_shards.list_shards(directory)
    assert listed["shard"] == "part-00000"
    shard = descriptor_shards.read_shard(directory, listed)
    assert shard.ids == [f"img{i:02d}" for i in range(5)]
    assert shard.uris == [f"/data/img{i:02d}.jpg" for i in range(5)]
    assert shard.vectors.dtype == np.float32 and shard.vectors.shape == (5, DIM)
    np.testing.assert_array_equal(shard.vectors, vectors)

    errors = descriptor_shards.read_errors(directory, listed)
    assert [e.id for e in errors] == ["img05", "img06"]
    assert {(e.stage, e.error_kind) for e in errors} == {("decode", "truncated")}

    table = pq.read_table(descriptor_shards.data_uri(directory, "part-00000"))
    meta = table.schema.metadata
    assert meta[b"cbir.schema"] == b"descriptors"
    assert meta[b"cbir.schema_version"] == b"2"
    assert meta[b"cbir.descriptor_dim"] == str(DIM).encode()
    assert table.column("width").to_pylist() == [100, 101, 102, 103, 104]
    assert set(table.column("model_id").to_pylist()) == {"gem-test"}
    err_meta = pq.read_schema(descriptor_shards.errors_uri(directory, "part-00000")).metadata
    assert err_meta[b"cbir.schema"] == b"errors"


def test_write_shard_refuses_lost_inputs(tmp_path):
    spec = ShardSpec("part-00000", (ImageRef("a", "a.jpg"), ImageRef("b", "b.jpg")))
    row = DescriptorRow("a", "a.jpg", "0" * 64, 20, 20, np.zeros(DIM, np.float32))
    with pytest.raises(RuntimeError, match="accounting mismatch"):
        descriptor_shards.write_shard(str(tmp_path), spec, [row], [], MODEL_INFO)
    assert manifests.read(str(tmp_path), "part-00000") is None


def _with_metadata(schema: pa.Schema, **changes: bytes) -> pa.Schema:
    meta = dict(schema.metadata)
    meta.update({k.encode(): v for k, v in changes.items()})
    return schema.with_metadata(meta)


def test_check_schema_accepts_current():
    schemas.check_schema("descriptors", schemas.arrow_schema("descriptors", dim=8))
    schemas.check_schema("errors", schemas.arrow_schema("errors"))
    schemas.check_schema("idmap", schemas.arrow_schema("idmap"))


def test_check_schema_refuses_wrong_version():
    schema = _with_metadata(schemas.arrow_schema("errors"), **{"cbir.schema_version": b"2"})
    with pytest.raises(schemas.SchemaMismatchError, match="version 2 is not supported"):
        schemas.check_schema("errors", schema, source="x.parquet")


def test_descriptor_notes_round_trip(tmp_path):
    refs = (ImageRef("plain", "/d/plain.jpg"), ImageRef("odd", "/d/odd.jpg"))
    vector = np.eye(DIM, dtype=np.float32)[0]
    rows = [
        DescriptorRow("plain", "/d/plain.jpg", "0" * 64, 20, 20, vector),
        DescriptorRow("odd", "/d/odd.jpg", "1" * 64, 20, 20, vector, "broken EXIF block (x)"),
    ]
    directory = str(tmp_path / "desc")
    manifest = descriptor_shards.write_shard(
        directory, ShardSpec("part-00000", refs), rows, [], MODEL_INFO
    )
    assert manifest["rows_with_notes"] == 1
    assert descriptor_shards.read_notes(directory, manifest) == {"odd": "broken EXIF block (x)"}
    table = pq.read_table(descriptor_shards.data_uri(directory, "part-00000"))
    assert table.column("notes").to_pylist() == [None, "broken EXIF block (x)"]
    assert not table.schema.field("notes").type.equals(pa.null())


def test_version_1_descriptor_shards_are_still_read(tmp_path, monkeypatch):
    """Shards written before `notes` existed (schema version 1) read as rows without notes."""
    written_as_v2 = descriptor_shards.descriptor_table

    def version_1_table(rows, model_id, dim):
        table = written_as_v2(rows, model_id, dim).drop(["notes"])
        return table.cast(schemas.arrow_schema("descriptors", dim=dim, version=1))

    monkeypatch.setattr(descriptor_shards, "descriptor_table", version_1_table)
    directory, spec, vectors, manifest = _shard(tmp_path)
    monkeypatch.undo()
    meta = pq.read_schema(descriptor_shards.data_uri(directory, "part-00000")).metadata
    assert meta[b"cbir.schema_version"] == b"1"
    del manifest["rows_with_notes"]  # as an older manifest: the count is absent
    ids, _, read = descriptor_shards.read_all(directory)
    assert ids == [r.id for r in spec.refs[:5]]
    np.testing.assert_array_equal(read, vectors)
    assert descriptor_shards.read_notes(directory, manifest) == {}
    old_schema = schemas.arrow_schema("descriptors", dim=DIM, version=1)
    schemas.check_schema("descriptors", old_schema)
    future = _with_metadata(old_schema, **{"cbir.schema_version": b"3"})
    with pytest.raises(schemas.SchemaMismatchError, match="this code reads versions 1, 2"):
        schemas.check_schema("descriptors", future)


def test_check_schema_refuses_wrong_name():
    wrong = r"expected a 'descriptors' table.*'errors'"
    with pytest.raises(schemas.SchemaMismatchError, match=wrong):
        schemas.check_schema("descriptors", schemas.arrow_schema("errors"))
    plain = pa.schema([pa.field("id", pa.string())])  # no metadata at all
    with pytest.raises(schemas.SchemaMismatchError, match="found schema None"):
        schemas.check_schema("errors", plain)


def test_check_schema_refuses_missing_column():
    full = schemas.arrow_schema("errors")
    schema = pa.schema([f for f in full if f.name != "error_kind"], metadata=full.metadata)
    with pytest.raises(schemas.SchemaMismatchError, match="missing column 'error_kind'"):
        schemas.check_schema("errors", schema)


def test_check_schema_refuses_wrong_type():
    full = schemas.arrow_schema("idmap")
    fields = [pa.field("index_id", pa.int32()) if f.name == "index_id" else f for f in full]
    with pytest.raises(schemas.SchemaMismatchError, match="'index_id' has type int32"):
        schemas.check_schema("idmap", pa.schema(fields, metadata=full.metadata))


def test_unknown_schema_version():
    with pytest.raises(schemas.SchemaMismatchError, match="unknown schema"):
        schemas.definition("descriptors", 99)


def test_manifest_with_future_version_is_refused(tmp_path):
    directory, spec, _, _ = _shard(tmp_path)
    uri = manifests.manifest_uri(directory, spec.shard_id)
    with open(uri) as f:
        data = json.load(f)
    data["schema_version"] = 99
    with open(uri, "w") as f:
        json.dump(data, f)
    with pytest.raises(schemas.SchemaMismatchError, match="manifest schema version 99"):
        manifests.read(directory, spec.shard_id)
    with pytest.raises(schemas.SchemaMismatchError, match="99"):
        descriptor_shards.list_shards(directory)
    with pytest.raises(schemas.SchemaMismatchError):
        descriptor_shards.is_committed(directory, spec, MODEL_INFO)


def test_altered_data_file_is_detected(tmp_path):
    directory, _, _, manifest = _shard(tmp_path)
    path = descriptor_shards.data_uri(directory, "part-00000")
    table = pq.read_table(path)
    # A valid Parquet file with the right schema, but other numbers: only the checksum can tell.
    altered = table.set_column(3, "width", pa.array([1] * table.num_rows, pa.int32()))
    sink = io.BytesIO()
    pq.write_table(altered, sink)
    with open(path, "wb") as f:
        f.write(sink.getvalue())
    with pytest.raises(OSError, match="checksum does not match"):
        descriptor_shards.read_shard(directory, manifest)

    errors_path = descriptor_shards.errors_uri(directory, "part-00000")
    with open(errors_path, "r+b") as f:  # truncated, as after a crash mid-write
        f.truncate(10)
    with pytest.raises(OSError, match="checksum does not match"):
        descriptor_shards.read_errors(directory, manifest)


def test_file_with_wrong_schema_but_right_checksum_is_refused(tmp_path):
    directory, _, _, manifest = _shard(tmp_path)
    path = descriptor_shards.data_uri(directory, "part-00000")
    table = pq.read_table(path)
    sink = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(
            {b"cbir.schema": b"descriptors", b"cbir.schema_version": b"7"}
        ),
        sink,
    )
    data = sink.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    manifest = {
        **manifest,
        "files": {**manifest["files"], "data": manifests.file_entry(path, data, table.num_rows)},
    }
    with pytest.raises(schemas.SchemaMismatchError, match="version 7"):
        descriptor_shards.read_shard(directory, manifest)
