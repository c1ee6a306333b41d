"""The Apache Beam runner: locally on the FnApiRunner with ``--workers`` processes, or on any
Beam runner (Dataflow) through ``--beam-args``.

    items ─► Create (reshuffled: spread over the workers) ─► ParDo(RunTask): task.run per item

The work item is Beam's element: a planned shard id, an index group task, a merge task. Each
``RunTask`` instance builds the task's worker state (models, the codebook) once in ``setup`` and
runs every item it is handed, so a shard's rows never leave the worker process that describes
them: the core function (``retrieval.extraction.extract_and_commit_shard`` for a shard) writes
the data and then the manifest, and nothing per image crosses the launcher or a shuffle.

Why the shard and not the image is the unit (the graph before this one: Reshuffle of (shard,
image) pairs, read + decode, ``RunInference``, then a GroupByKey by shard for the commit): Beam's
local FnApiRunner keeps every stage's output, and a GroupByKey's whole table, in the launcher
until the next stage has run (it cannot spill), so every descriptor row crossed the launcher and
stayed there: +38 MB for 5,000 images and +117 MB for 20,000 (``benchmarks/load.py``). On
Dataflow the same GroupByKey is a shuffle of every descriptor, paid for nothing: the shard writer
needs only the rows its own worker made. What it gives up is balance finer than a shard: with
fewer shards than workers some idle, and a job ends with its slowest shard; a large corpus has
many shards (one million images: about 3,900 of 256), a small job should use a smaller
``--shard-size``.

Why not ``RunInference``: its output is another PCollection that must be regrouped by shard
before a shard can be committed (the GroupByKey above), and it shares one model between a
process's threads, which a LiteRT interpreter does not allow (the ``multi_threading`` run turned
29-46 of 502 images into ``model_error`` rows). Its services are kept without it: one model per
worker, batches bounded by an activation-memory budget (``retrieval/runtimes/device.py``), a
failing batch retried image by image (``describe_loaded``).

Why not Beam's file I/O: the corpus is listed and cut into shards by the launcher before the
pipeline starts (to skip committed shards, and so that every runner plans identically), and each
shard is written under its own deterministic name and committed by a manifest, which
``WriteToParquet``'s own output sharding cannot express.

Where the fixed time of a local job goes (measured on oxford-dev, 2 workers): about 2.5 s to start
the two SDK worker processes (1.2-1.8 s of Beam import each), 0.5-1 s of teardown.
``--direct_running_mode=multi_threading`` skips the process start but was 10-20% slower at
steady state (GIL contention), so processes stay the local default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.beam.options import is_local, pipeline_options
from pipelines.runners.base import Runner, WorkerTask, committed_progress
from retrieval.runtimes.device import WorkerPlan, plan_worker


class RunTask(beam.DoFn):
    """``item -> item``: ``task.run`` on this worker's state, built once in ``setup``."""

    def __init__(self, task: WorkerTask):
        self._task = task

    def setup(self) -> None:
        self._state = self._task.setup()

    def process(self, item: Any):
        self._task.run(self._state, item)
        yield item


def build_map(pipeline: beam.Pipeline, task: WorkerTask, items: Sequence[Any], label: str = ""):
    """Add ``task`` over ``items`` to ``pipeline`` (the Flex Template builds its job with this)."""
    prefix = f"{label}: " if label else ""
    return (
        pipeline
        # reshuffle=True (Create's default, spelled out): the items are spread over the workers
        # instead of staying fused with the one that read the list.
        | f"{prefix}Items" >> beam.Create(list(items), reshuffle=True)
        | f"{prefix}Run" >> beam.ParDo(RunTask(task))
    )


def _run_after(item: Any, done: list[Any], task: WorkerTask) -> Any:
    # ``done`` (the previous round, as a side input) only makes this round wait for it.
    task.run(None, item)
    return item


class BeamRunner(Runner):
    name = "beam"

    def __init__(self, config):
        super().__init__(config)
        self.options: PipelineOptions = pipeline_options(config.workers, config.beam_args)
        self.local_workers = is_local(self.options)

    def options_for(self, label: str) -> PipelineOptions:
        """The run's options; a ``--job_name`` gets the stage's name appended (one Dataflow job
        per stage, each named for what it does: cbir-extract, cbir-index, cbir-merge)."""
        args = list(self.config.beam_args)
        named = [i for i, a in enumerate(args) if a.startswith("--job_name=")]
        if not named:
            return self.options
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        args[named[-1]] = f"{args[named[-1]]}-{slug}"
        return pipeline_options(self.config.workers, args)

    def worker_plan(self, image_side: int) -> WorkerPlan:
        # Local cores are shared by --workers processes; remote workers size their own pools.
        config = self.config
        return plan_worker(
            config.device,
            workers=config.workers if self.local_workers else 1,
            threads=config.threads if self.local_workers else config.threads_per_worker,
            image_side=image_side,
        )

    def prepare(self, task: WorkerTask) -> None:
        prepare = getattr(task, "prepare_in_launcher", None)
        if self.local_workers and prepare is not None:
            prepare()  # convert a model once here: local workers then find a warm cache

    def map(
        self,
        task: WorkerTask,
        items: Sequence[Any],
        *,
        label: str,
        progress_dir: str | None = None,
        already: int = 0,
    ) -> None:
        if not items:
            return
        self.prepare(task)
        with (
            committed_progress(progress_dir, len(items) + already, label, already),
            beam.Pipeline(options=self.options_for(label)) as pipeline,
        ):
            build_map(pipeline, task, items)

    def map_rounds(self, task: WorkerTask, rounds: Sequence[Sequence[Any]], *, label: str) -> None:
        """One pipeline whose stages are the rounds: each round's items run in parallel and
        take the previous round's output as a side input, which only makes them wait for it
        (one Beam job for the whole tree, not one per round)."""
        if not rounds:
            return
        with beam.Pipeline(options=self.options_for(label)) as pipeline:
            done = pipeline | "Start" >> beam.Create([""])
            for r, items in enumerate(rounds, start=1):
                done = (
                    pipeline
                    | f"Round{r}" >> beam.Create(list(items))
                    | f"Spread{r}" >> beam.Reshuffle()
                    | f"Run{r}" >> beam.Map(_run_after, done=beam.pvalue.AsList(done), task=task)
                )
