"""Descriptor extraction on Spark: a thin adapter over ``retrieval.extraction``.

    planned inputs (shard, position, id, uri, problem)
      ├─► repartition by id ─► mapInArrow: read + decode + GeM ─► one result row per input ─┐
      └───────────────────────────────────► cogroup by shard ◄──────────────────────────────┘
                                                   │
                     write the shard, then commit its manifest (retrieval.shards)

Images, not shards, are spread over the tasks (as Beam's Reshuffle does), so a few large shards
never leave workers idle. Each Python worker builds one model and keeps it for every task it
runs (Spark reuses Python workers). The cogroup hands each shard's writer both what was planned
and what came back, so ``write_shard`` checks the accounting against the plan itself: an input
lost on the way fails the shard loudly instead of vanishing. Files, names and manifests are the
ones every runner writes, so Spark, Beam and local runs skip each other's committed shards.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.corpus import ImageRef, ShardSpec
from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import LoadedImage, describe_loaded, load_image
from retrieval.images import DecodeLimits
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from retrieval.descriptors.gem import GeMExtractor

PLANNED_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("position", pa.int32()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("problem", pa.string()),
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("descriptor", pa.list_(pa.float32())),
        ("stage", pa.string()),
        ("error_kind", pa.string()),
        ("message", pa.string()),
    ]
)
RESULT_DDL = (
    "shard string, id string, uri string, sha256 string, width int, height int, "
    "descriptor array<float>, stage string, error_kind string, message string"
)
WRITTEN_DDL = "shard string, rows long, errors long"

# Images decoded and described per step inside a task: bounds a worker's memory to this many
# decoded images whatever Arrow's batch size is.
IMAGES_PER_STEP = 16

_EXTRACTORS: dict[tuple[GeMConfig, int | None], GeMExtractor] = {}


def _extractor(config: GeMConfig, threads: int | None) -> GeMExtractor:
    """This Python worker's model, built on first use and kept for later tasks."""
    key = (config, threads)
    if key not in _EXTRACTORS:
        from retrieval.descriptors.gem import GeMExtractor, configure_tf_threads

        configure_tf_threads(threads)
        _EXTRACTORS[key] = GeMExtractor(config)
    return _EXTRACTORS[key]


def planned_table(specs: Sequence[ShardSpec]) -> pa.Table:
    """Every planned input as a row: shard id, position in the shard, id, uri, listing problem."""
    columns: dict[str, list[Any]] = {name: [] for name in PLANNED_SCHEMA.names}
    for spec in specs:
        for position, ref in enumerate(spec.refs):
            columns["shard"].append(spec.shard_id)
            columns["position"].append(position)
            columns["id"].append(ref.id)
            columns["uri"].append(ref.uri)
            columns["problem"].append(ref.problem)
    return pa.table(columns, schema=PLANNED_SCHEMA)


def _result_batch(results: Sequence[tuple[str, DescriptorRow | ErrorRow]]) -> pa.RecordBatch:
    columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    for shard, result in results:
        columns["shard"].append(shard)
        columns["id"].append(result.id)
        columns["uri"].append(result.uri)
        is_row = isinstance(result, DescriptorRow)
        for name in ("sha256", "width", "height"):
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
    threads: int | None,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: planned inputs in, one result row per input out."""
    for batch in batches:
        rows = batch.to_pylist()
        for start in range(0, len(rows), IMAGES_PER_STEP):
            results: list[tuple[str, DescriptorRow | ErrorRow]] = []
            decoded: list[tuple[str, LoadedImage]] = []
            for row in rows[start : start + IMAGES_PER_STEP]:
                ref = ImageRef(row["id"], row["uri"], row["problem"])
                loaded = load_image(ref, max_side=config.max_side, limits=limits)
                if isinstance(loaded, ErrorRow):
                    results.append((row["shard"], loaded))
                else:
                    decoded.append((row["shard"], loaded))
            if decoded:
                extractor = _extractor(config, threads)
                described = describe_loaded([image for _, image in decoded], extractor)
                results += [(s, r) for (s, _), r in zip(decoded, described, strict=True)]
            yield _result_batch(results)


def write_shard_group(
    key: tuple[pa.Scalar, ...],
    planned: pa.Table,
    results: pa.Table,
    *,
    output: str,
    model_info: dict[str, Any],
) -> pa.Table:
    """Cogroup body: rebuild the shard's plan, split results into rows and errors, commit."""
    shard_id = key[0].as_py()
    planned = planned.sort_by("position")
    refs = tuple(
        ImageRef(r["id"], r["uri"], r["problem"])
        for r in planned.select(["id", "uri", "problem"]).to_pylist()
    )
    spec = ShardSpec(shard_id, refs)
    is_error = results.column("error_kind").is_valid()
    rows_table = results.filter(pc.invert(is_error))
    vectors = _vectors(rows_table.column("descriptor"), int(model_info["dim"]))
    rows = [
        DescriptorRow(r["id"], r["uri"], r["sha256"], r["width"], r["height"], vector)
        for r, vector in zip(
            rows_table.select(["id", "uri", "sha256", "width", "height"]).to_pylist(),
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
    manifest = descriptor_shards.write_shard(output, spec, rows, errors, model_info)
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
    specs: Sequence[ShardSpec],
    output: str,
    *,
    config: GeMConfig,
    model_info: dict[str, Any],
    limits: DecodeLimits,
    threads_per_worker: int | None,
    parallelism: int,
) -> list[tuple[str, int, int]]:
    """Extract and commit ``specs``; returns (shard, rows, errors) for each shard written."""
    if not specs:
        return []
    planned = session.createDataFrame(planned_table(specs))
    images = sum(len(s.refs) for s in specs)
    # A few tasks per core keep the cores busy to the end without paying a model per image.
    spread = planned.repartition(max(1, min(images, 4 * parallelism)), "id")
    results = spread.mapInArrow(
        functools.partial(
            describe_partition, config=config, limits=limits, threads=threads_per_worker
        ),
        RESULT_DDL,
    )
    written = (
        planned.groupBy("shard")
        .cogroup(results.groupBy("shard"))
        .applyInArrow(
            functools.partial(write_shard_group, output=output, model_info=model_info),
            WRITTEN_DDL,
        )
    )
    with shuffle_partitions(session, max(1, min(len(specs), 2 * parallelism))):
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
