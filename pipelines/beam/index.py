"""Per-shard index builds on Apache Beam: each worker adds one shard to a copy of the codebook."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from retrieval.index.shard_index import ShardIndexTask, build_shard_index


def run_shard_indexes(
    tasks: Sequence[ShardIndexTask], output: str, *, options: PipelineOptions
) -> None:
    if not tasks:
        return
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Tasks" >> beam.Create(list(tasks))
            | "Spread" >> beam.Reshuffle()
            | "Build" >> beam.Map(lambda task: build_shard_index(task, output)["shard"])
        )
