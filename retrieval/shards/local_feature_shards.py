"""Local-feature shards: ``part-XXXXX.parquet`` (one row of keypoints and descriptors per image),
``part-XXXXX.errors.parquet`` and the manifest, written in that order, in their own folder.

Local features are ~100x larger than a global descriptor, so they live apart from the descriptor
shards (a search over global descriptors never reads them) but are cut from the same shard plan:
the same shard ids, the same inputs, every input a row or an error. Spatial verification reads
them back by image id through :class:`LocalFeatureStore`, which loads a shard when first needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from retrieval import checksums, plan, storage
from retrieval import shard_manifests as manifests
from retrieval.corpus import ShardSpec
from retrieval.local_features.features import LocalFeatures
from retrieval.shards.descriptor_shards import ErrorRow, data_uri, error_table, errors_uri

KIND = "local_features"


@dataclass(frozen=True)
class LocalFeatureRow:
    id: str
    uri: str
    features: LocalFeatures
    seconds: float = 0.0  # extractor time (not stored per row; summed into the manifest)


def committed_manifest(
    directory: str, spec: ShardSpec | plan.PlannedShard, local_info: dict[str, Any]
) -> dict[str, Any] | None:
    return manifests.committed_for_model(directory, KIND, spec, local_info)


def is_committed(
    directory: str, spec: ShardSpec | plan.PlannedShard, local_info: dict[str, Any]
) -> bool:
    return committed_manifest(directory, spec, local_info) is not None


def _flat_list(arrays: Sequence[np.ndarray], dtype: str) -> pa.ListArray:
    counts = np.asarray([a.size for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat.astype(dtype, copy=False))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def local_feature_table(
    rows: Sequence[LocalFeatureRow], model_id: str, dim: int, dtype: str
) -> pa.Table:
    schema = schemas.arrow_schema("local_features", dim=dim, element=dtype)
    feats = [r.features for r in rows]
    for r in rows:
        if r.features.descriptors.shape[1:] != (dim,):
            raise ValueError(f"{r.id}: local descriptors of shape {r.features.descriptors.shape}")
    return pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.string()),
            "uri": pa.array([r.uri for r in rows], pa.string()),
            "model_id": pa.array([model_id] * len(rows), pa.string()),
            "image_width": pa.array([f.image_width for f in feats], pa.int32()),
            "image_height": pa.array([f.image_height for f in feats], pa.int32()),
            "num_features": pa.array([len(f) for f in feats], pa.int32()),
            "locations": _flat_list([f.locations for f in feats], "float32"),
            "scales": _flat_list([f.scales for f in feats], "float32"),
            "descriptors": _flat_list([f.descriptors for f in feats], dtype),
        },
        schema=schema,
    )


def write_shard(
    directory: str,
    spec: ShardSpec,
    rows: Sequence[LocalFeatureRow],
    errors: Sequence[ErrorRow],
    local_info: dict[str, Any],
) -> dict[str, Any]:
    """Write a shard's two tables, then commit its manifest (refusing a shard that does not
    account for every planned input exactly once). Returns the manifest."""
    planned = [r.id for r in spec.refs]
    order = {ref_id: i for i, ref_id in enumerate(planned)}
    produced = [r.id for r in rows] + [e.id for e in errors]
    if sorted(produced) != sorted(planned):
        raise RuntimeError(
            f"{spec.shard_id}: local-feature accounting mismatch: {len(planned)} inputs, "
            f"{len(rows)} rows + {len(errors)} errors"
        )
    rows = sorted(rows, key=lambda r: order[r.id])
    errors = sorted(errors, key=lambda e: order[e.id])
    dim, dtype = int(local_info["dim"]), local_info["config"]["dtype"]
    data_path, errors_path = (
        data_uri(directory, spec.shard_id),
        errors_uri(directory, spec.shard_id),
    )
    data = storage.write_parquet(data_path, local_feature_table(rows, local_info["id"], dim, dtype))
    error_data = storage.write_parquet(errors_path, error_table(errors))
    features = sum(len(r.features) for r in rows)
    return manifests.commit(
        directory,
        spec.shard_id,
        {
            "kind": KIND,
            "input_digest": spec.input_digest,
            "inputs": len(planned),
            "rows": len(rows),
            "errors": len(errors),
            "features": features,
            "dim": dim,
            "extract_s": round(sum(r.seconds for r in rows), 4),
            "ids": [r.id for r in rows],  # lets a store find an image's shard from manifests
            "files": {
                "data": manifests.file_entry(data_path, data, len(rows)),
                "errors": manifests.file_entry(errors_path, error_data, len(errors)),
            },
            "model": local_info,
        },
    )


def _unflatten(column: pa.ChunkedArray, width: int) -> list[np.ndarray]:
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]].reshape(-1, width) for i in range(len(offsets) - 1)]


def read_shard(directory: str, manifest: dict[str, Any]) -> dict[str, LocalFeatures]:
    """Image id -> local features (descriptors as float32) of one committed shard."""
    shard_id = manifest["shard"]
    table = _read_checked(
        data_uri(directory, shard_id), manifest["files"]["data"], "local_features"
    )
    dim = int(manifest["dim"])
    locations = _unflatten(table.column("locations"), 2)
    scales = _unflatten(table.column("scales"), 1)
    descriptors = _unflatten(table.column("descriptors"), dim)
    widths = table.column("image_width").to_pylist()
    heights = table.column("image_height").to_pylist()
    return {
        image_id: LocalFeatures(
            locations[i].astype(np.float32),
            scales[i].reshape(-1).astype(np.float32),
            descriptors[i].astype(np.float32),
            widths[i],
            heights[i],
        )
        for i, image_id in enumerate(table.column("id").to_pylist())
    }


def read_errors(directory: str, manifest: dict[str, Any]) -> list[ErrorRow]:
    shard_id = manifest["shard"]
    table = _read_checked(errors_uri(directory, shard_id), manifest["files"]["errors"], "errors")
    return [ErrorRow(**row) for row in table.to_pylist()]


def _read_checked(uri: str, entry: dict[str, Any], schema_name: str) -> pa.Table:
    try:
        return storage.read_parquet(uri, schema=schema_name, expect_sha256=entry["sha256"])
    except checksums.ChecksumMismatchError as exc:
        raise checksums.with_remedy(exc, checksums.REEXTRACT) from None


def damaged(directory: str, manifest: dict[str, Any]) -> list[str]:
    """The shard's files whose size or SHA-256 no longer match its manifest (empty: intact)."""
    return manifests.damaged_files(directory, manifest["files"])


def list_shards(directory: str) -> list[dict[str, Any]]:
    """Manifests of the local-feature shards of ``directory``'s run plan, in plan order."""
    return plan.committed_manifests(directory, kind=KIND)


def shard_bytes(manifests_: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(data bytes, rows) over committed shards: what local features cost on storage."""
    return (
        sum(m["files"]["data"]["bytes"] for m in manifests_),
        sum(m["rows"] for m in manifests_),
    )


class LocalFeatureStore:
    """Local features by image id over one shard folder, or several layered ones (a re-index
    keeps each run's extraction in its own folder: a later folder's row for an id shadows an
    earlier one's, e.g. a changed image's). Shards are read when first needed and the
    ``cache_shards`` most recently used stay in memory (thread-safe lookups)."""

    def __init__(self, directory: str | Sequence[str], *, cache_shards: int = 64):
        self.directories = [directory] if isinstance(directory, str) else list(directory)
        self.directory = self.directories[-1]
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        for folder in self.directories:
            listed = list_shards(folder)
            if not listed:
                raise FileNotFoundError(f"no committed local-feature shards under {folder}")
            self._manifests.update({(folder, m["shard"]): m for m in listed})
        models = {m["model"]["config_hash"] for m in self._manifests.values()}
        if len(models) > 1:
            raise ValueError(f"{self.directory}: local-feature shards of several models {models}")
        self.model = next(iter(self._manifests.values()))["model"]
        self._shard_of: dict[str, tuple[str, str]] = {}
        for key, manifest in self._manifests.items():  # in layer order: later layers win
            self._shard_of.update(dict.fromkeys(manifest["ids"], key))
        self._cache: OrderedDict[tuple[str, str], dict[str, LocalFeatures]] = OrderedDict()
        self._cache_shards = cache_shards
        self._lock = Lock()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def get(self, image_id: str) -> LocalFeatures | None:
        key = self._shard_of.get(image_id)
        if key is None:
            return None
        with self._lock:
            shard = self._cache.get(key)
            if shard is None:
                shard = read_shard(key[0], self._manifests[key])
                self._cache[key] = shard
                while len(self._cache) > self._cache_shards:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        return shard[image_id]
