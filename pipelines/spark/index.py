"""Per-shard index builds on Spark: each task adds one descriptor shard to a copy of the codebook.

A DataFrame of build tasks (one row per shard, the task as JSON) is spread one shard per
partition; ``retrieval.index.shard_index.build_shard_index`` does the work and commits the shard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from retrieval.index.shard_index import ShardIndexTask, build_shard_index

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def build_partition(batches: Iterator[pa.RecordBatch], *, output: str) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: build and commit every task of the partition."""
    for batch in batches:
        shards, rows = [], []
        for task_json in batch.column("task").to_pylist():
            manifest = build_shard_index(ShardIndexTask(**json.loads(task_json)), output)
            shards.append(manifest["shard"])
            rows.append(manifest["rows"])
        yield pa.RecordBatch.from_pydict(
            {"shard": shards, "rows": rows},
            schema=pa.schema([("shard", pa.string()), ("rows", pa.int64())]),
        )


def run_shard_indexes(
    session: SparkSession, tasks: Sequence[ShardIndexTask], output: str
) -> list[tuple[str, int]]:
    """Build and commit the index of every task's shard; returns (shard, rows) per shard."""
    if not tasks:
        return []
    table = pa.table(
        {
            "shard": [t.shard_id for t in tasks],
            "task": [json.dumps(dataclasses.asdict(t)) for t in tasks],
        }
    )
    built = (
        session.createDataFrame(table)
        .repartition(len(tasks), "shard")
        .mapInArrow(functools.partial(build_partition, output=output), "shard string, rows long")
    )
    return [(r["shard"], r["rows"]) for r in built.collect()]
