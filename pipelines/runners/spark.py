"""The PySpark runner: ``local[--workers]`` in this process, any cluster through ``--master`` /
``--spark-conf``, or the session ``spark-submit`` started (``retrieval submit --runner spark``).

    item numbers, one per partition ─► mapInArrow: task.run(state, items[i]) ─► (i) per item
        ─► the driver checks every item came back

The work item is one task (one partition): the scheduler hands the next item to whichever slot
frees first, so a job's tail is one item's time. The items themselves travel with the task's
closure (they are small: shard ids, index group and merge tasks); the DataFrame carries only their
numbers and one small row per item comes back, so no descriptor crosses a shuffle or the driver:
each task commits its own output through the core function (for a shard,
``retrieval.extraction.extract_and_commit_shard``, the function every runner runs, so their equal
output holds by construction). Spark reuses its Python workers, so a worker builds a task's state
(the models) once and keeps it, by ``setup_key``, for every later task and stage that needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.runners.base import Runner, WorkerTask, committed_progress
from pipelines.spark.session import (
    SparkSettings,
    get_session,
    one_row_per_partition,
    parallelism,
    task_threads,
)
from retrieval.runtimes.device import WorkerPlan, plan_worker

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DONE_SCHEMA = pa.schema([("item", pa.int64())])

# This Python worker's task states (models), kept across tasks and stages by setup key.
_states: dict[Hashable, Any] = {}


def _state(task: WorkerTask) -> Any:
    key = task.setup_key()
    if key is None:
        return task.setup()
    if key not in _states:
        _states[key] = task.setup()
    return _states[key]


def run_partition(
    batches: Iterator[pa.RecordBatch], *, task: WorkerTask, items: Sequence[Any]
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: item numbers in; each item run and committed in this task; its number
    out once done."""
    for batch in batches:
        for number in batch.column("item").to_pylist():
            task.run(_state(task), items[number])
            yield pa.RecordBatch.from_pydict({"item": [number]}, schema=DONE_SCHEMA)


def check_all_came_back(expected: int, done: Sequence[int], label: str) -> None:
    """Fail loudly if an item is missing from what the tasks returned."""
    lost = sorted(set(range(expected)) - set(done))
    if lost:
        raise RuntimeError(f"{label}: {len(lost)} items did not come back from Spark: {lost[:10]}")


def session_for(config) -> tuple[SparkSettings, SparkSession]:
    """The SparkSession for ``config`` (started once per process, then shared by stages)."""
    settings = SparkSettings(
        workers=config.workers,
        master=config.master,
        conf=dict(config.spark_conf),
        verbose=config.verbose,
    )
    return settings, get_session(settings)


class SparkRunner(Runner):
    name = "spark"

    def __init__(self, config):
        super().__init__(config)
        self.settings, self.session = session_for(config)

    def worker_plan(self, image_side: int) -> WorkerPlan:
        config = self.config
        # Local cores are shared by the local[N] task slots, one model each (the plan of Beam's
        # local workers); on a cluster spark.task.cpus says how many cores a task may use.
        if self.settings.is_local:
            return plan_worker(
                config.device,
                workers=parallelism(self.session),
                threads=config.threads_per_worker,
                image_side=image_side,
            )
        threads = task_threads(self.session, config)
        return plan_worker(config.device, cores=threads, threads=threads, image_side=image_side)

    def prepare(self, task: WorkerTask) -> None:
        prepare = getattr(task, "prepare_in_launcher", None)
        if self.settings.is_local and prepare is not None:
            prepare()  # convert once here, so local tasks find a warm cache

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
        frame = one_row_per_partition(self.session, [(i,) for i in range(len(items))], "item long")
        body = functools.partial(run_partition, task=task, items=list(items))
        with committed_progress(progress_dir, len(items) + already, label, already):
            done = [row["item"] for row in frame.mapInArrow(body, "item long").collect()]
        check_all_came_back(len(items), done, label)
