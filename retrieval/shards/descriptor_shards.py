"""Descriptor shards: ``part-XXXXX.parquet`` (descriptors), ``part-XXXXX.errors.parquet`` and the
manifest, written in that order. Every planned input lands in exactly one of the two tables.

A shard may also be a *reference*: a manifest alone, whose ``source`` names a shard committed
in another folder (``folder`` relative to this one, and its shard id) and whose ``drop`` lists
the ids of that shard this folder leaves out. A re-index version is made of references to the
immutable shards of the batches extracted before it (``retrieval/version_data.py``), so a new
version writes manifests for the images it did not extract instead of copying their
descriptors. Every reader here (:func:`read_table`, :func:`read_shard`, :func:`read_notes`,
:func:`read_errors`) reads a reference as the rows it keeps, so the stages never tell the two
apart; ``rows`` counts the kept rows.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from retrieval import checksums, plan, storage
from retrieval import shard_manifests as manifests
from retrieval.corpus import ShardSpec
from retrieval.manifests import ManifestError, canonical_digest, check_name

KIND = "descriptors"
# Error kinds that waiting may fix: a shard holding them is extracted again on a re-run.
TRANSIENT_ERROR_KINDS = frozenset({"read_failed", "model_error"})


@dataclass(frozen=True)
class DescriptorRow:
    """A described image. ``notes``: what was odd but not fatal (a broken EXIF block), or None."""

    id: str
    uri: str
    sha256: str
    width: int
    height: int
    descriptor: np.ndarray
    notes: str | None = None


@dataclass(frozen=True)
class ErrorRow:
    id: str
    uri: str
    stage: str
    error_kind: str
    message: str


@dataclass(frozen=True)
class DescriptorShard:
    """A committed shard read back: ids, uris and an (n, dim) float32 matrix, in shard order."""

    shard_id: str
    ids: list[str]
    uris: list[str]
    vectors: np.ndarray
    manifest: dict[str, Any]


def data_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, f"{check_name(shard_id, what='shard id')}.parquet")


def errors_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, f"{check_name(shard_id, what='shard id')}.errors.parquet")


def committed_manifest(
    directory: str, spec: ShardSpec | plan.PlannedShard, model_info: dict[str, Any]
) -> dict[str, Any] | None:
    """The shard's manifest if it is committed for these inputs and this model, else None."""
    return manifests.committed_for_model(directory, KIND, spec, model_info)


def is_committed(
    directory: str, spec: ShardSpec | plan.PlannedShard, model_info: dict[str, Any]
) -> bool:
    return committed_manifest(directory, spec, model_info) is not None


def descriptor_table(rows: Sequence[DescriptorRow], model_id: str, dim: int) -> pa.Table:
    schema = schemas.arrow_schema("descriptors", dim=dim)
    flat = np.asarray([r.descriptor for r in rows], np.float32).reshape(-1)
    return pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.string()),
            "uri": pa.array([r.uri for r in rows], pa.string()),
            "sha256": pa.array([r.sha256 for r in rows], pa.string()),
            "width": pa.array([r.width for r in rows], pa.int32()),
            "height": pa.array([r.height for r in rows], pa.int32()),
            "model_id": pa.array([model_id] * len(rows), pa.string()),
            "descriptor": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
            "notes": pa.array([r.notes or None for r in rows], pa.string()),
        },
        schema=schema,
    )


def error_table(errors: Sequence[ErrorRow]) -> pa.Table:
    schema = schemas.arrow_schema("errors")
    columns = {
        name: pa.array([getattr(e, name) for e in errors], pa.string()) for name in schema.names
    }
    return pa.table(columns, schema=schema)


def write_shard(
    directory: str,
    spec: ShardSpec,
    rows: Sequence[DescriptorRow],
    errors: Sequence[ErrorRow],
    model_info: dict[str, Any],
) -> dict[str, Any]:
    """Write a shard's two tables, then commit its manifest. Returns the manifest.

    Refuses to commit a shard whose rows and errors do not account for every planned input
    exactly once: a lost image must fail loudly here rather than vanish from the index.
    """
    planned = [r.id for r in spec.refs]
    order = {ref_id: i for i, ref_id in enumerate(planned)}
    produced = [r.id for r in rows] + [e.id for e in errors]
    if sorted(produced) != sorted(planned):
        missing = sorted(set(planned) - set(produced))[:5]
        extra = sorted(set(produced) - set(planned))[:5]
        raise RuntimeError(
            f"{spec.shard_id}: accounting mismatch: {len(planned)} inputs, "
            f"{len(rows)} rows + {len(errors)} errors; missing {missing}, extra {extra}"
        )
    rows = sorted(rows, key=lambda r: order[r.id])
    errors = sorted(errors, key=lambda e: order[e.id])

    dim = int(model_info["dim"])
    data_path, errors_path = (
        data_uri(directory, spec.shard_id),
        errors_uri(directory, spec.shard_id),
    )
    data = storage.write_parquet(data_path, descriptor_table(rows, model_info["id"], dim))
    error_data = storage.write_parquet(errors_path, error_table(errors))
    return manifests.commit(
        directory,
        spec.shard_id,
        {
            "kind": KIND,
            "input_digest": spec.input_digest,
            "inputs": len(planned),
            "rows": len(rows),
            "errors": len(errors),
            "transient_errors": sum(e.error_kind in TRANSIENT_ERROR_KINDS for e in errors),
            "rows_with_notes": sum(bool(r.notes) for r in rows),
            "dim": dim,
            "files": {
                "data": manifests.file_entry(data_path, data, len(rows)),
                "errors": manifests.file_entry(errors_path, error_data, len(errors)),
            },
            "model": model_info,
        },
    )


def is_reference(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("source"))


def source_of(directory: str, manifest: dict[str, Any]) -> tuple[str, str]:
    """(folder, shard id) of the files a shard's rows are read from: its own, or for a
    reference the source's (its relative ``folder`` resolved against ``directory``; only
    ``..`` and plain names, so a manifest cannot point outside the store it lives in)."""
    source = manifest.get("source")
    if not source:
        return directory, check_name(manifest["shard"], what="shard id")
    parts = str(source.get("folder", "")).split("/")
    if not parts or not all(p == ".." or check_name(p, what="source folder") for p in parts):
        raise ManifestError(f"{directory}: unsafe source folder {source.get('folder')!r}")
    return _resolve(directory, "/".join(parts)), check_name(source["shard"], what="shard id")


def _resolve(directory: str, relative: str) -> str:
    if storage.is_local(directory) and not directory.startswith("file://"):
        return os.path.normpath(os.path.join(directory, relative))
    scheme, _, path = directory.partition("://")
    bucket = path.split("/", 1)[0]
    resolved = posixpath.normpath(posixpath.join(path, relative))
    if resolved.split("/", 1)[0] != bucket:
        raise ManifestError(f"{directory}: source folder {relative!r} leaves the bucket")
    return f"{scheme}://{resolved}"


def shard_digest(manifest: dict[str, Any]) -> str:
    """What a shard's rows are, as one string: its data file's SHA-256 and, for a reference,
    the ids it drops (two versions reading one file without the same rows differ here)."""
    sha = manifest["files"]["data"]["sha256"]
    drop = manifest.get("drop") or []
    return sha if not drop else f"{sha}-{canonical_digest(sorted(drop))[:16]}"


def _read_checked(uri: str, entry: dict[str, Any], schema_name: str, remedy: str) -> pa.Table:
    try:
        return storage.read_parquet(uri, schema=schema_name, expect_sha256=entry["sha256"])
    except checksums.ChecksumMismatchError as exc:
        raise checksums.with_remedy(exc, remedy) from None


def _remedy(manifest: dict[str, Any]) -> str:
    return checksums.REINDEX if is_reference(manifest) else checksums.REEXTRACT


def read_table(directory: str, manifest: dict[str, Any]) -> pa.Table:
    """The shard's descriptor table (checked against its manifest): for a reference, the
    source's rows less the dropped ids, in the source's order."""
    folder, shard_id = source_of(directory, manifest)
    table = _read_checked(
        data_uri(folder, shard_id), manifest["files"]["data"], "descriptors", _remedy(manifest)
    )
    drop = manifest.get("drop")
    if drop:
        gone = pc.is_in(table.column("id"), pa.array(sorted(drop), pa.string()))
        table = table.filter(pc.invert(gone))
    if is_reference(manifest) and table.num_rows != manifest["rows"]:
        raise ManifestError(
            f"{directory}: reference {manifest['shard']} keeps {table.num_rows} rows of "
            f"{folder}/{shard_id}, its manifest says {manifest['rows']}"
        )
    return table


def read_shard(directory: str, manifest: dict[str, Any]) -> DescriptorShard:
    return shard_of(manifest, read_table(directory, manifest))


def shard_of(manifest: dict[str, Any], table: pa.Table) -> DescriptorShard:
    """A shard's rows (a table from :func:`read_table`) as ids, uris and a float32 matrix."""
    shard_id = manifest["shard"]
    dim = schemas.descriptor_dim(table.schema)
    column = table.column("descriptor").combine_chunks()
    # flatten(), not .values: a filtered or sliced list array's values start at its offset
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    vectors = vectors.astype(np.float32, copy=False)
    return DescriptorShard(
        shard_id, table.column("id").to_pylist(), table.column("uri").to_pylist(), vectors, manifest
    )


def read_notes(directory: str, manifest: dict[str, Any]) -> dict[str, str]:
    """{image id: notes} of the shard's rows that have notes (none in a version-1 file)."""
    if not manifest.get("rows_with_notes"):
        return {}
    table = read_table(directory, manifest)
    noted = table.filter(table.column("notes").is_valid()).select(["id", "notes"])
    return dict(zip(noted.column("id").to_pylist(), noted.column("notes").to_pylist(), strict=True))


def read_errors(directory: str, manifest: dict[str, Any]) -> list[ErrorRow]:
    """The shard's error rows (none for a reference: it lists indexed rows only)."""
    if "errors" not in manifest["files"]:
        return []
    shard_id = manifest["shard"]
    table = _read_checked(
        errors_uri(directory, shard_id), manifest["files"]["errors"], "errors", checksums.REEXTRACT
    )
    return [ErrorRow(**row) for row in table.to_pylist()]


def damaged(directory: str, manifest: dict[str, Any]) -> list[str]:
    """The shard's files (its source's, for a reference) whose size or SHA-256 no longer match
    its manifest, missing ones included: empty for an intact shard."""
    folder, _ = source_of(directory, manifest)
    return manifests.damaged_files(folder, manifest["files"])


def reference(
    source_folder: str, source: dict[str, Any], *, shard_id: str, drop: Sequence[str] = ()
) -> dict[str, Any]:
    """The manifest body (uncommitted) of a reference to the committed shard ``source`` of
    ``source_folder`` (a path relative to the folder it will be committed in), leaving out the
    ids in ``drop`` (each one a row of the source)."""
    if is_reference(source):
        raise ValueError(f"{source['shard']} is itself a reference: refer to its source")
    rows = source["rows"] - len(drop)
    body = {
        "kind": KIND,
        "inputs": rows,
        "rows": rows,
        "errors": 0,
        "transient_errors": 0,
        "rows_with_notes": source.get("rows_with_notes", 0),  # at most: notes of kept rows
        "dim": source["dim"],
        "files": {"data": source["files"]["data"]},
        "model": source["model"],
        "source": {"folder": source_folder, "shard": source["shard"]},
        "drop": sorted(drop),
    }
    body["input_digest"] = canonical_digest([shard_digest(body), shard_id])
    return body


def list_shards(directory: str) -> list[dict[str, Any]]:
    """Manifests of the descriptor shards of ``directory``'s run plan, in plan order.

    Exactly the planned shards, each committed for its planned inputs (else
    :class:`retrieval.plan.PlanError`); other ``part-*`` files in the folder do not count.
    """
    return plan.committed_manifests(directory, kind=KIND)


def read_all(directory: str) -> tuple[list[str], list[str], np.ndarray]:
    """Every descriptor of the plan of ``directory`` in (shard, row) order: ids, uris, vectors."""
    ids: list[str] = []
    uris: list[str] = []
    blocks = []
    for manifest in list_shards(directory):
        shard = read_shard(directory, manifest)
        ids += shard.ids
        uris += shard.uris
        blocks.append(shard.vectors)
    if not blocks:
        raise FileNotFoundError(f"no committed descriptor shards under {directory}")
    return ids, uris, np.concatenate(blocks)
