"""Index groups and the merge tree on Apache Beam: a thin adapter over ``retrieval.index``.

Index tasks are spread over the workers (each loads the codebook once and encodes a group of
shards). The merge runs as one pipeline whose stages are the rounds: each round's tasks run in
parallel and take the previous round's outputs as a side input, which only makes them wait for
it (the tasks carry the names of what they read).
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from retrieval.index.group_index import IndexGroupTask, build_group_index
from retrieval.index.merge import MergeTask, run_merge_task


def run_index_groups(
    tasks: Sequence[IndexGroupTask], output: str, *, options: PipelineOptions
) -> None:
    if not tasks:
        return
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Tasks" >> beam.Create(list(tasks))
            | "Spread" >> beam.Reshuffle()
            | "Build" >> beam.Map(lambda task: build_group_index(task, output)["shard"])
        )


def _run_after(task: MergeTask, done: list[str]) -> str:
    return run_merge_task(task)["shard"]


def run_merge_rounds(rounds: Sequence[Sequence[MergeTask]], *, options: PipelineOptions) -> None:
    if not rounds:
        return
    with beam.Pipeline(options=options) as pipeline:
        done = pipeline | "Start" >> beam.Create([""])
        for r, tasks in enumerate(rounds, start=1):
            done = (
                pipeline
                | f"Round{r}" >> beam.Create(list(tasks))
                | f"Spread{r}" >> beam.Reshuffle()
                | f"Merge{r}" >> beam.Map(_run_after, done=beam.pvalue.AsList(done))
            )
