"""Descriptor extraction on Spark: a thin adapter over ``retrieval.extraction``.

    pending shard ids ─► mapInArrow: the shard's inputs, read from the run plan
        ─► repartition by image id ─► mapInArrow: read + decode + GeM, one result row per input
        ─► group by shard ─► applyInArrow: write the shard, then commit its manifest

Images, not shards, are spread over the tasks (as Beam's Reshuffle does), so a few large shards
never leave workers idle. Each Python worker builds one model and keeps it for every task it
runs (Spark reuses Python workers). The DataFrames carry only shard ids until the workers read
each shard's references from the run plan in the output folder (``retrieval.plan``), and the
shard writer checks what came back against that plan (``write_shard``): an input lost on the way
fails its shard loudly instead of vanishing. Files, names and manifests are the ones every runner
writes, so Spark, Beam and local runs skip each other's committed shards.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval import plan
from retrieval.corpus import ImageRef
from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import (
    LoadedImage,
    decode_side,
    describe_loaded,
    load_images,
    local_feature_row,
    worker_extractor,
    write_shards,
)
from retrieval.images import DecodeLimits
from retrieval.local_features.extractor import LocalFeatureConfig, LocalFeatures
from retrieval.runtimes.device import WorkerPlan
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow
from retrieval.shards.local_feature_shards import LocalFeatureRow

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from retrieval.descriptors.gem import GeMExtractor

REFS_SCHEMA = pa.schema(
    [("shard", pa.string()), ("id", pa.string()), ("uri", pa.string()), ("problem", pa.string())]
)
REFS_DDL = "shard string, id string, uri string, problem string"
RESULT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("descriptor", pa.list_(pa.float32())),
        ("notes", pa.string()),
        ("stage", pa.string()),
        ("error_kind", pa.string()),
        ("message", pa.string()),
        # local features (rows where num_features is set): see retrieval.local_features
        ("num_features", pa.int32()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("locations", pa.list_(pa.float32())),
        ("scales", pa.list_(pa.float32())),
        ("local_descriptors", pa.list_(pa.float32())),
        ("local_seconds", pa.float64()),
    ]
)
RESULT_DDL = (
    "shard string, id string, uri string, sha256 string, width int, height int, "
    "descriptor array<float>, notes string, stage string, error_kind string, message string, "
    "num_features int, image_width int, image_height int, locations array<float>, "
    "scales array<float>, local_descriptors array<float>, local_seconds double"
)
WRITTEN_DDL = "shard string, rows long, errors long"

# Images decoded and described per step inside a task: bounds a worker's memory to this many
# decoded images whatever Arrow's batch size is.
IMAGES_PER_STEP = 16

_EXTRACTORS: dict[tuple[GeMConfig, WorkerPlan], GeMExtractor] = {}
_LOCAL_EXTRACTORS: dict[LocalFeatureConfig, Any] = {}


def _local_extractor(config: LocalFeatureConfig) -> Any:
    """This Python worker's local-feature extractor, built on first use."""
    if config not in _LOCAL_EXTRACTORS:
        from retrieval.local_features.extractor import build_local_extractor

        _LOCAL_EXTRACTORS[config] = build_local_extractor(config)
    return _LOCAL_EXTRACTORS[config]


def _extractor(config: GeMConfig, worker: WorkerPlan) -> GeMExtractor:
    """This Python worker's model, built on first use and kept for later tasks (Spark reuses
    Python workers), with the worker plan's share of the cores."""
    key = (config, worker)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = worker_extractor(config, worker)
    return _EXTRACTORS[key]


def shard_refs(batches: Iterator[pa.RecordBatch], *, output: str) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: shard ids in, the shards' planned inputs out (read from the plan)."""
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            refs = plan.read_shard_spec(output, shard_id).refs
            yield pa.RecordBatch.from_pydict(
                {
                    "shard": [shard_id] * len(refs),
                    "id": [r.id for r in refs],
                    "uri": [r.uri for r in refs],
                    "problem": [r.problem for r in refs],
                },
                schema=REFS_SCHEMA,
            )


LOCAL_COLUMNS = (
    "num_features",
    "image_width",
    "image_height",
    "locations",
    "scales",
    "local_descriptors",
    "local_seconds",
)


def _result_batch(
    results: Sequence[tuple[str, DescriptorRow | LocalFeatureRow | ErrorRow]],
) -> pa.RecordBatch:
    columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    for shard, result in results:
        columns["shard"].append(shard)
        columns["id"].append(result.id)
        columns["uri"].append(result.uri)
        local = result.features if isinstance(result, LocalFeatureRow) else None
        values = (
            (
                len(local),
                local.image_width,
                local.image_height,
                local.locations.reshape(-1),
                local.scales,
                local.descriptors.astype(np.float32).reshape(-1),
                result.seconds,
            )
            if local is not None
            else (None,) * len(LOCAL_COLUMNS)
        )
        for name, value in zip(LOCAL_COLUMNS, values, strict=True):
            columns[name].append(value)
        if local is not None:
            for name in ("sha256", "width", "height", "descriptor", "notes", "stage"):
                columns[name].append(None)
            columns["error_kind"].append(None)
            columns["message"].append(None)
            continue
        is_row = isinstance(result, DescriptorRow)
        for name in ("sha256", "width", "height", "notes"):
            columns[name].append(getattr(result, name) if is_row else None)
        columns["descriptor"].append(result.descriptor if is_row else None)
        for name in ("stage", "error_kind", "message"):
            columns[name].append(None if is_row else getattr(result, name))
    return pa.RecordBatch.from_pydict(columns, schema=RESULT_SCHEMA)


def describe_partition(
    batches: Iterator[pa.RecordBatch],
    *,
    config: GeMConfig,
    limits: DecodeLimits,
    worker: WorkerPlan,
    local: LocalFeatureConfig | None = None,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: planned inputs in, one result row per input out (and, with ``local``,
    one local-feature row or error per decoded input: the same decode serves both).

    Reading and decoding run ahead of the model on the worker plan's decode threads across the
    whole partition (``retrieval.extraction.load_images``), as in Beam and the local loop.
    """
    max_side = decode_side(config.max_side, local.image_size if local else None)
    shards: deque[str] = deque()  # the shard of each ref handed to the decoder, in order

    def refs() -> Iterator[ImageRef]:
        for batch in batches:
            for row in batch.to_pylist():
                shards.append(row["shard"])
                yield ImageRef(row["id"], row["uri"], row["problem"])

    loaded_images = load_images(
        refs(),
        max_side=max_side,
        limits=limits,
        threads=worker.decode_threads,
        prefetch=worker.prefetch,
    )
    while True:
        step = list(itertools.islice(loaded_images, IMAGES_PER_STEP))
        if not step:
            return
        results: list[tuple[str, DescriptorRow | LocalFeatureRow | ErrorRow]] = []
        decoded: list[tuple[str, LoadedImage]] = []
        for loaded in step:
            shard = shards.popleft()
            if isinstance(loaded, ErrorRow):
                results.append((shard, loaded))
                continue
            decoded.append((shard, loaded))
            if local is not None:
                results.append((shard, local_feature_row(loaded, _local_extractor(local))))
        if decoded:
            extractor = _extractor(config, worker)
            described = describe_loaded(extractor, [image for _, image in decoded])
            results += [(s, r) for (s, _), r in zip(decoded, described, strict=True)]
        yield _result_batch(results)


def _local_rows(table: pa.Table, dim: int) -> list[LocalFeatureRow]:
    rows = []
    for r in table.to_pylist():
        n = r["num_features"]
        features = LocalFeatures(
            np.asarray(r["locations"], np.float32).reshape(n, 2),
            np.asarray(r["scales"], np.float32).reshape(n),
            np.asarray(r["local_descriptors"], np.float32).reshape(n, dim),
            r["image_width"],
            r["image_height"],
        )
        rows.append(LocalFeatureRow(r["id"], r["uri"], features, r["local_seconds"]))
    return rows


def write_shard_group(
    key: tuple[pa.Scalar, ...],
    results: pa.Table,
    *,
    output: str,
    model_info: dict[str, Any],
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> pa.Table:
    """applyInArrow body: one shard's results -> rows and errors -> written and committed."""
    shard_id = key[0].as_py()
    spec = plan.read_shard_spec(output, shard_id)
    is_local = results.column("num_features").is_valid()
    local_rows = _local_rows(results.filter(is_local), int(local_info["dim"])) if local_info else []
    results = results.filter(pc.invert(is_local))
    is_error = results.column("error_kind").is_valid()
    rows_table = results.filter(pc.invert(is_error))
    vectors = _vectors(rows_table.column("descriptor"), int(model_info["dim"]))
    rows = [
        DescriptorRow(r["id"], r["uri"], r["sha256"], r["width"], r["height"], vector, r["notes"])
        for r, vector in zip(
            rows_table.select(["id", "uri", "sha256", "width", "height", "notes"]).to_pylist(),
            vectors,
            strict=True,
        )
    ]
    errors = [
        ErrorRow(**r)
        for r in results.filter(is_error)
        .select(["id", "uri", "stage", "error_kind", "message"])
        .to_pylist()
    ]
    manifest = write_shards(
        output,
        spec,
        rows,
        errors,
        model_info,
        local_output=local_output,
        local_rows=local_rows,
        local_info=local_info,
    )
    return pa.table(
        {"shard": [shard_id], "rows": [manifest["rows"]], "errors": [manifest["errors"]]},
        schema=pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("errors", pa.int64())]),
    )


def _vectors(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, dim), np.float32)
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim)


def run_extraction(
    session: SparkSession,
    shard_ids: Sequence[str],
    output: str,
    *,
    config: GeMConfig,
    model_info: dict[str, Any],
    limits: DecodeLimits,
    worker: WorkerPlan,
    parallelism: int,
    local: LocalFeatureConfig | None = None,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> list[tuple[str, int, int]]:
    """Extract and commit the planned shards ``shard_ids`` of ``output``; returns (shard, rows,
    errors) for each shard written."""
    if not shard_ids:
        return []
    shards = session.createDataFrame(pa.table({"shard": list(shard_ids)}))
    refs = shards.repartition(min(len(shard_ids), parallelism)).mapInArrow(
        functools.partial(shard_refs, output=output), REFS_DDL
    )
    images = sum(s.inputs for s in plan.read_plan(output).shards if s.shard_id in set(shard_ids))
    # A few tasks per core keep the cores busy to the end without paying a model per image.
    spread = refs.repartition(max(1, min(images, 4 * parallelism)), "id")
    results = spread.mapInArrow(
        functools.partial(
            describe_partition,
            config=config,
            limits=limits,
            worker=worker,
            local=local,
        ),
        RESULT_DDL,
    )

    def write(key, shard_results):  # unannotated: PySpark 4.3 fails inferring a partial's hints
        return write_shard_group(
            key,
            shard_results,
            output=output,
            model_info=model_info,
            local_output=local_output,
            local_info=local_info,
        )

    written = results.groupBy("shard").applyInArrow(write, WRITTEN_DDL)
    with shuffle_partitions(session, max(1, min(len(shard_ids), 2 * parallelism))):
        return [(r["shard"], r["rows"], r["errors"]) for r in written.collect()]


@contextmanager
def shuffle_partitions(session: SparkSession, partitions: int) -> Iterator[None]:
    """Size ``spark.sql.shuffle.partitions`` for one job when it is Spark's default (200 tasks,
    mostly empty, for a few shards on a laptop); a value the user set is kept."""
    conf = session.conf
    before = conf.get("spark.sql.shuffle.partitions")
    if before == "200":
        conf.set("spark.sql.shuffle.partitions", str(partitions))
    try:
        yield
    finally:
        conf.set("spark.sql.shuffle.partitions", before)
