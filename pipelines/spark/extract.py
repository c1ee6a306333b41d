"""Descriptor extraction on Spark: a thin adapter over ``retrieval.extraction``.

    pending shard ids, one per partition ─► mapInArrow: each shard extracted and committed by
        ``extract_and_commit_shard`` ─► (shard, rows, errors) ─► the driver checks every pending
        shard came back

The shard is the Spark work unit, as it is Beam's (``pipelines/beam/extract.py`` says why at
length). Each task runs ``retrieval.extraction.extract_and_commit_shard``, the function the local
runner loops over and Beam's ``ExtractShard`` calls, so the three runners share one code path
and their equal output holds by construction: the task reads the shard's inputs from the run
plan in the output folder (``retrieval.plan``), decodes them on the worker plan's threads ahead
of the model, describes them in batches, writes the data and commits the manifest last; the
shard writer checks what it writes against the plan (an input without a descriptor row or an
error row fails the shard loudly). The DataFrame carries only shard ids and one small row per
shard comes back, so no descriptor crosses a shuffle or the driver (the graph before this one
repartitioned the images, made one Arrow row per image and grouped the rows by shard again,
shuffling every descriptor once for nothing: the writer needs only the rows its own task made).
Each Python worker builds its model once and keeps it for every task it runs (Spark reuses
Python workers). Files, names and manifests are the ones every runner writes, so Spark, Beam and
local runs skip each other's committed shards.

What it gives up is balance finer than a shard: with fewer shards than task slots some slots
idle, and a job ends with its slowest shard. One shard per partition lets the scheduler hand the
next shard to whichever slot frees first, so the tail is one shard's time; a small job should use
a smaller ``--shard-size``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from pipelines.spark.session import one_row_per_partition
from retrieval.extraction import ShardJob, worker_models

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

WRITTEN_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("errors", pa.int64())])
WRITTEN_DDL = "shard string, rows long, errors long"

# This Python worker's models, built on first use and kept for later tasks (Spark reuses Python
# workers), per (GeM config, worker plan, local-feature config).
_models = functools.cache(worker_models)


def extract_partition(
    batches: Iterator[pa.RecordBatch], *, job: ShardJob
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: shard ids in; each shard extracted and committed in this task
    (``job.run``, with this worker's models); one (shard, rows, errors) row out per shard."""
    for batch in batches:
        for shard_id in batch.column("shard").to_pylist():
            manifest = job.run(shard_id, *_models(job.config, job.worker, job.local))
            yield pa.RecordBatch.from_pydict(
                {"shard": [shard_id], "rows": [manifest["rows"]], "errors": [manifest["errors"]]},
                schema=WRITTEN_SCHEMA,
            )


def run_extraction(
    session: SparkSession, shard_ids: Sequence[str], job: ShardJob
) -> list[tuple[str, int, int]]:
    """Extract and commit the planned shards ``shard_ids`` of ``job.output``; returns (shard,
    rows, errors) for each shard. Raises ``RuntimeError`` if a shard did not come back."""
    if not shard_ids:
        return []
    written = shard_frame(session, shard_ids).mapInArrow(
        functools.partial(extract_partition, job=job), WRITTEN_DDL
    )
    done = [(r["shard"], r["rows"], r["errors"]) for r in written.collect()]
    check_all_came_back(shard_ids, [shard for shard, _, _ in done])
    return done


def shard_frame(session: SparkSession, shard_ids: Sequence[str]) -> DataFrame:
    """A one-column DataFrame of ``shard_ids``, one shard per partition (one task each)."""
    return one_row_per_partition(session, [(s,) for s in shard_ids], "shard string")


def check_all_came_back(shard_ids: Sequence[str], done: Sequence[str]) -> None:
    """Fail loudly if a pending shard is missing from what the tasks returned."""
    lost = sorted(set(shard_ids) - set(done))
    if lost:
        raise RuntimeError(f"{len(lost)} shards did not come back from Spark: {lost[:10]}")
