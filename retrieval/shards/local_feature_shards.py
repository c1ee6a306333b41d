"""Local-feature shards: ``part-XXXXX.arrow`` (the keypoints and descriptors of each image),
``part-XXXXX.errors.parquet`` and the manifest, written in that order, in their own folder.

Local features are ~100x larger than a global descriptor, so they live apart from the descriptor
shards (a search over global descriptors never reads them) but are cut from the same shard plan:
the same shard ids, the same inputs, every input a row or an error.

They are read by image, not by shard: spatial verification needs the features of a query's
shortlist, a hundred images spread over as many shards. So the features file is an Arrow IPC
file (the ``local_features`` schema) with one record batch per image, and the manifest records
each image's byte range and that range's SHA-256: :class:`LocalFeatureStore` fetches one image
with one ranged read of about its own size, and checks it. A Parquet file with one row group per
image would need its footer first (~170 KB for 256 images, several times one image's features)
before any ranged read. Any Arrow reader still reads the whole file as one table. Shards written
before this layout (``part-XXXXX.parquet``, no ``format`` in the manifest) are read whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from retrieval import checksums, plan, storage
from retrieval import shard_manifests as manifests
from retrieval.corpus import ShardSpec
from retrieval.local_features.features import (
    LocalFeatures,
    decode_descriptors,
    encode_descriptors,
)
from retrieval.manifests import check_name
from retrieval.shards.descriptor_shards import (
    TRANSIENT_ERROR_KINDS,
    ErrorRow,
    data_uri,
    error_table,
    errors_uri,
)

KIND = "local_features"
# The manifest ``format`` of shards whose features file holds one Arrow record batch per image.
BATCH_PER_IMAGE = "arrow-ipc/batch-per-image"
# Features kept in memory by a store (decoded, float32): about 1,000 images of RootSIFT.
DEFAULT_CACHE_BYTES = 512 << 20
# Ranged reads in flight at once when a store prefetches a shortlist.
FETCH_THREADS = 16
_IPC_MAGIC = b"ARROW1\x00\x00"
# zstd per buffer: float16 descriptors barely compress, locations and scales do.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


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
    values = pa.array(encode_descriptors(flat, dtype))
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
    account for every planned input exactly once). Returns the manifest.

    The features go to ``part-XXXXX.arrow``, an Arrow IPC file holding one record batch per
    image; the manifest records each image's byte range in it and the range's SHA-256, so a
    reader fetches (and checks) one image's bytes with one ranged read (see the module doc).
    """
    order = {ref.id: i for i, ref in enumerate(spec.refs)}
    if any(r.id not in order for r in rows):
        raise RuntimeError(
            f"{spec.shard_id}: local-feature accounting mismatch: a row for an image it does "
            "not plan"
        )
    rows = sorted(rows, key=lambda r: order[r.id])
    dim, dtype = int(local_info["dim"]), local_info["config"]["dtype"]
    table = local_feature_table(rows, local_info["id"], dim, dtype)
    extract_s = round(sum(r.seconds for r in rows), 4)
    return write_table(directory, spec, table, errors, local_info, extract_s=extract_s)


def write_table(
    directory: str,
    spec: ShardSpec,
    table: pa.Table,
    errors: Sequence[ErrorRow],
    local_info: dict[str, Any],
    *,
    extract_s: float = 0.0,
) -> dict[str, Any]:
    """:func:`write_shard` for features already in the file's schema (one row per image: a
    compaction copies stored images as they are). Rows and errors are put in planned order."""
    planned = [r.id for r in spec.refs]
    order = {ref_id: i for i, ref_id in enumerate(planned)}
    ids = table.column("id").to_pylist()
    produced = ids + [e.id for e in errors]
    if sorted(produced) != sorted(planned):
        raise RuntimeError(
            f"{spec.shard_id}: local-feature accounting mismatch: {len(planned)} inputs, "
            f"{len(ids)} rows + {len(errors)} errors"
        )
    positions = sorted(range(len(ids)), key=lambda i: order[ids[i]])
    table = table.take(pa.array(positions, pa.int64()))
    errors = sorted(errors, key=lambda e: order[e.id])
    dim = int(local_info["dim"])
    data_path, errors_path = (
        features_uri(directory, spec.shard_id),
        errors_uri(directory, spec.shard_id),
    )
    data, spans = image_batches_file(table)
    storage.write_bytes(data_path, data)
    error_data = storage.write_parquet(errors_path, error_table(errors))
    features = sum(table.column("num_features").to_pylist())
    ids = table.column("id").to_pylist()
    return manifests.commit(
        directory,
        spec.shard_id,
        {
            "kind": KIND,
            "input_digest": spec.input_digest,
            "inputs": len(planned),
            "rows": len(ids),
            "errors": len(errors),
            "features": features,
            "dim": dim,
            "extract_s": extract_s,
            "ids": ids,  # lets a store find an image's shard from manifests
            # Which inputs failed, and which of those a later run should try again (a read
            # that timed out): what first-use computation (retrieval/local_feature_cache.py)
            # must not ask for again, read from manifests alone.
            "error_ids": [e.id for e in errors],
            "retry_ids": [e.id for e in errors if e.error_kind in TRANSIENT_ERROR_KINDS],
            "format": BATCH_PER_IMAGE,
            # Per image (in ``ids`` order): [first byte, end byte, SHA-256 of those bytes].
            "batches": [[a, b, storage.sha256_bytes(data[a:b])] for a, b in spans],
            "files": {
                "data": manifests.file_entry(data_path, data, len(ids)),
                "errors": manifests.file_entry(errors_path, error_data, len(errors)),
            },
            "model": local_info,
        },
    )


def image_batches_file(table: pa.Table) -> tuple[bytes, list[tuple[int, int]]]:
    """``table`` as an Arrow IPC file with one record batch per row (zstd-compressed buffers),
    and each batch's byte range in it.

    The IPC file is the stream format (the schema message, then one message per batch) between
    a magic header and a footer. The writer emits the schema with the first batch, so the first
    batch starts after the header and the schema message; every other one where the previous one
    ended. Each range is checked to parse as a one-row batch before the file is returned.
    """
    sink = pa.BufferOutputStream()
    ranges: list[tuple[int, int]] = []
    with pa.ipc.new_file(sink, table.schema, options=_IPC_OPTIONS) as writer:
        start = len(_IPC_MAGIC) + table.schema.serialize().size
        for batch in table.to_batches(max_chunksize=1):
            if ranges:
                start = ranges[-1][1]
            writer.write_batch(batch)
            ranges.append((start, sink.tell()))
    data = sink.getvalue().to_pybytes()
    if len(ranges) != table.num_rows:  # to_batches skips nothing, but an empty table has none
        raise RuntimeError(f"{len(ranges)} batches for {table.num_rows} rows")
    for start, end in ranges:
        if decode_image_batch(data[start:end], table.schema).num_rows != 1:
            raise RuntimeError(f"bytes {start}-{end} of a local-feature file are not one image")
    return data, ranges


def decode_image_batch(data: bytes, schema: pa.Schema) -> pa.RecordBatch:
    """One image's record batch from its bytes in a local-feature file."""
    return pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)


def file_schema(manifest: dict[str, Any]) -> pa.Schema:
    """The Arrow schema a shard's data file was written with (from its manifest)."""
    element = manifest["model"]["config"]["dtype"]
    return schemas.arrow_schema("local_features", dim=int(manifest["dim"]), element=element)


def features_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, f"{check_name(shard_id, what='shard id')}.arrow")


def data_file_uri(directory: str, manifest: dict[str, Any]) -> str:
    """The shard's features file: ``.arrow`` (one batch per image), or ``.parquet`` for shards
    written before that layout."""
    if manifest.get("format") == BATCH_PER_IMAGE:
        return features_uri(directory, manifest["shard"])
    return data_uri(directory, manifest["shard"])


def _unflatten(column: pa.ChunkedArray | pa.Array, width: int) -> list[np.ndarray]:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]].reshape(-1, width) for i in range(len(offsets) - 1)]


def _features(table: pa.Table | pa.RecordBatch, dim: int) -> dict[str, LocalFeatures]:
    locations = _unflatten(table.column("locations"), 2)
    scales = _unflatten(table.column("scales"), 1)
    descriptors = _unflatten(table.column("descriptors"), dim)
    widths = table.column("image_width").to_pylist()
    heights = table.column("image_height").to_pylist()
    return {
        image_id: LocalFeatures(
            locations[i].astype(np.float32),
            scales[i].reshape(-1).astype(np.float32),
            decode_descriptors(descriptors[i]),
            widths[i],
            heights[i],
        )
        for i, image_id in enumerate(table.column("id").to_pylist())
    }


def read_shard(directory: str, manifest: dict[str, Any]) -> dict[str, LocalFeatures]:
    """Image id -> local features (descriptors as float32) of one committed shard, read whole
    (its file checked against the manifest's checksum)."""
    uri = data_file_uri(directory, manifest)
    expected = manifest["files"]["data"]["sha256"]
    if manifest.get("format") != BATCH_PER_IMAGE:
        table = _read_checked(uri, manifest["files"]["data"], "local_features")
        return _features(table, int(manifest["dim"]))
    data = storage.read_bytes(uri)
    if storage.sha256_bytes(data) != expected:
        raise checksums.mismatch(uri, checksums.REEXTRACT)
    table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    schemas.check_schema("local_features", table.schema, source=uri)
    return _features(table, int(manifest["dim"]))


def read_image(
    directory: str, manifest: dict[str, Any], position: int
) -> tuple[str, LocalFeatures, int]:
    """(id, features, bytes read) of the ``position``-th image of a committed shard: one ranged
    read of that image's bytes, checked against the manifest's SHA-256 of them."""
    batch = read_image_batch(directory, manifest, position)
    ((image_id, features),) = _features(batch, int(manifest["dim"])).items()
    start, end, _ = manifest["batches"][position]
    return image_id, features, int(end) - int(start)


def read_image_batch(directory: str, manifest: dict[str, Any], position: int) -> pa.RecordBatch:
    """The ``position``-th image of a committed shard as stored (its one-row record batch), by
    one ranged read checked against the manifest's SHA-256 of those bytes."""
    start, end, expected = manifest["batches"][position]
    uri = data_file_uri(directory, manifest)
    data = storage.read_range(uri, int(start), int(end))
    if storage.sha256_bytes(data) != expected:
        raise checksums.ChecksumMismatchError(
            f"{uri}: bytes {start}-{end} ({manifest['ids'][position]}) do not match their "
            f"checksum in the manifest (altered file); {checksums.REEXTRACT}"
        )
    batch = decode_image_batch(data, file_schema(manifest))
    image_id = batch.column("id")[0].as_py()
    if image_id != manifest["ids"][position]:
        raise checksums.ChecksumMismatchError(
            f"{uri}: bytes {start}-{end} hold {image_id!r}, the manifest says "
            f"{manifest['ids'][position]!r}"
        )
    return batch


def empty_table(local_info: dict[str, Any]) -> pa.Table:
    """A shard's features table with no image (every planned input an error row)."""
    dim, dtype = int(local_info["dim"]), local_info["config"]["dtype"]
    return local_feature_table([], local_info["id"], dim, dtype)


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
    earlier one's, e.g. a changed image's).

    An image's features are fetched on first use by one ranged read of its own bytes (checked
    against the manifest), never its whole shard; :meth:`prefetch` fetches a query's shortlist
    on ``threads`` threads at once (object stores answer in parallel what they answer slowly in
    series). Fetched features stay in a least-recently-used cache of at most ``cache_bytes``.
    Shards written before the one-batch-per-image layout are read whole, as they always were.
    Lookups are thread-safe. ``bytes_read`` counts the feature bytes read so far.

    ``excluded``: ids a folder's rows are not read for (a layer a re-index version inherits
    holds the features of images that changed since: ``retrieval/local_feature_cache.py``).
    """

    def __init__(
        self,
        directory: str | Sequence[str],
        *,
        excluded: Mapping[str, Set[str]] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        threads: int = FETCH_THREADS,
    ):
        self.directories = [directory] if isinstance(directory, str) else list(directory)
        self.directory = self.directories[-1] if self.directories else None
        self._manifests: dict[tuple[str, str], dict[str, Any]] = {}
        # id -> (folder, shard, position in the shard), in layer order: later layers win.
        self._where: dict[str, tuple[str, str, int]] = {}
        self.model: dict[str, Any] | None = None  # no folder at all: an empty store
        self._lock = Lock()
        self._excluded = dict(excluded or {})
        self._threads = threads
        self._add(self.directories)
        self._cache: OrderedDict[str, tuple[LocalFeatures | None, int]] = OrderedDict()
        self._cached_bytes = 0
        self._cache_bytes = cache_bytes
        self.bytes_read = 0

    def _add(self, folders: Sequence[str]) -> None:
        manifests_: dict[tuple[str, str], dict[str, Any]] = {}
        # A first-use store has a layer per request: their manifests are read at once (an
        # object store answers in parallel what it answers slowly in series).
        if len(folders) > 1 and self._threads > 1:
            with ThreadPoolExecutor(min(self._threads, len(folders)), "list-layers") as pool:
                all_listed = list(pool.map(list_shards, folders))
        else:
            all_listed = [list_shards(folder) for folder in folders]
        for folder, listed in zip(folders, all_listed, strict=True):
            if not listed:
                raise FileNotFoundError(f"no committed local-feature shards under {folder}")
            manifests_.update({(folder, m["shard"]): m for m in listed})
        models = {m["model"]["config_hash"] for m in manifests_.values()}
        if self.model is not None:
            models.add(self.model["config_hash"])
        if len(models) > 1:
            raise ValueError(f"{self.directory}: local-feature shards of several models {models}")
        with self._lock:
            self._manifests.update(manifests_)
            for key, manifest in manifests_.items():
                skip = self._excluded.get(key[0], ())
                self._where.update(
                    {
                        image_id: (*key, i)
                        for i, image_id in enumerate(manifest["ids"])
                        if image_id not in skip
                    }
                )
            if self.model is None and manifests_:
                self.model = next(iter(manifests_.values()))["model"]

    def add(self, folders: Sequence[str]) -> None:
        """Also read from those of ``folders`` not read yet (layers computed since: first
        use), as later layers. Cached features stay."""
        new = [f for f in folders if f not in self.directories]
        self._add(new)
        self.directories += new
        if self.directories:
            self.directory = self.directories[-1]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __call__(self, image_id: str) -> LocalFeatures | None:
        return self.get(image_id)

    def get(self, image_id: str) -> LocalFeatures | None:
        """The image's features (None for an image without any in the store)."""
        where = self._where.get(image_id)
        if where is None:
            return None
        with self._lock:
            cached = self._cache.get(image_id)
            if cached is not None:
                self._cache.move_to_end(image_id)
                return cached[0]
        self._fetch(where)
        with self._lock:
            cached = self._cache.get(image_id)
        # Only an image larger than the whole cache is not in it after its fetch.
        return cached[0] if cached is not None else self._read(where)[image_id]

    def prefetch(self, image_ids: Iterable[str]) -> None:
        """Fetch the features of ``image_ids`` not yet cached, ``threads`` reads at a time."""
        todo: dict[tuple[str, str, int], None] = {}
        with self._lock:
            for image_id in image_ids:
                where = self._where.get(image_id)
                if where is None or image_id in self._cache:
                    continue
                if self._manifests[where[:2]].get("format") != BATCH_PER_IMAGE:
                    # A shard of the older layout is read whole when first asked for: fetching
                    # a shortlist's shards ahead would overflow the cache (256 images each)
                    # and read them twice.
                    continue
                todo[where] = None
        if len(todo) < 2 or self._threads < 2:
            for where in todo:
                self._fetch(where)
            return
        with ThreadPoolExecutor(min(self._threads, len(todo)), "local-features") as pool:
            list(pool.map(self._fetch, todo))

    def _read(self, where: tuple[str, str, int]) -> dict[str, LocalFeatures]:
        folder, shard, position = where
        manifest = self._manifests[(folder, shard)]
        if manifest.get("format") == BATCH_PER_IMAGE:
            image_id, features, size = read_image(folder, manifest, position)
            found = {image_id: features}
        else:  # an older shard: one Parquet file, read whole
            found = read_shard(folder, manifest)
            size = manifest["files"]["data"]["bytes"]
        with self._lock:
            self.bytes_read += size
        return found

    def _fetch(self, where: tuple[str, str, int]) -> None:
        found = self._read(where)
        with self._lock:
            for image_id, features in found.items():
                if self._where.get(image_id, ("", "", 0))[:2] != where[:2]:
                    continue  # shadowed by a later layer's row for the same id, or excluded
                size = _nbytes(features)
                if size > self._cache_bytes or image_id in self._cache:
                    continue
                self._cache[image_id] = (features, size)
                self._cached_bytes += size
            while self._cached_bytes > self._cache_bytes and self._cache:
                _, (_, size) = self._cache.popitem(last=False)
                self._cached_bytes -= size


def _nbytes(features: LocalFeatures) -> int:
    return features.locations.nbytes + features.scales.nbytes + features.descriptors.nbytes + 64
