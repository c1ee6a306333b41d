"""Index groups and the merge tree on Spark: a thin adapter over ``retrieval.index``.

Index tasks (one row per group of shards, the task as JSON) are spread one per partition;
``retrieval.index.group_index.build_group_index`` loads the codebook once per Python worker and
commits the group. The merge runs round after round, each round's tasks in parallel partitions
(``retrieval.index.merge.run_merge_task``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.spark.session import one_row_per_partition
from retrieval.index.group_index import IndexGroupTask, build_group_index
from retrieval.index.merge import MergeTask, run_merge_task

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_RESULT = pa.schema([("name", pa.string()), ("rows", pa.int64())])


def _run_partition(
    batches: Iterator[pa.RecordBatch], *, run: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: run every task of the partition; one (name, rows) row per task."""
    for batch in batches:
        names, rows = [], []
        for task_json in batch.column("task").to_pylist():
            manifest = run(json.loads(task_json))
            names.append(manifest["shard"])
            rows.append(manifest["rows"])
        yield pa.RecordBatch.from_pydict({"name": names, "rows": rows}, schema=_RESULT)


def _build_group(task: dict[str, Any], output: str) -> dict[str, Any]:
    return build_group_index(IndexGroupTask.from_dict(task), output)


def _merge(task: dict[str, Any]) -> dict[str, Any]:
    return run_merge_task(MergeTask.from_dict(task))


def _run(session: SparkSession, names: list[str], tasks: list[Any], run) -> list[tuple[str, int]]:
    rows = [(name, json.dumps(dataclasses.asdict(t))) for name, t in zip(names, tasks, strict=True)]
    done = one_row_per_partition(session, rows, "name string, task string").mapInArrow(
        functools.partial(_run_partition, run=run), "name string, rows long"
    )
    return [(r["name"], r["rows"]) for r in done.collect()]


def run_index_groups(
    session: SparkSession, tasks: Sequence[IndexGroupTask], output: str
) -> list[tuple[str, int]]:
    """Build and commit every index group; returns (group, rows) per group."""
    if not tasks:
        return []
    return _run(
        session,
        [t.group_id for t in tasks],
        list(tasks),
        functools.partial(_build_group, output=output),
    )


def run_merge_rounds(session: SparkSession, rounds: Sequence[Sequence[MergeTask]]) -> None:
    """Run the merge tree: the tasks of a round in parallel, the rounds one after another."""
    for tasks in rounds:
        _run(session, [t.node_id for t in tasks], list(tasks), _merge)
