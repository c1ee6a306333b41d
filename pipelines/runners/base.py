"""The one interface every runner implements (img2dataset's distributor, for this pipeline).

A runner maps a :class:`WorkerTask` over a list of small, picklable work items: planned shard
ids (extraction), index group tasks, merge tasks, query shards. It decides only where and how
many times the task runs; what a task does, how it commits its output and how a re-run skips
committed work are the core's (``retrieval``). Stages check the committed output afterwards,
so a runner returns nothing and a lost item fails the stage that planned it.

    runner.map(task, items, label="extract")      every item once, in parallel where it can
    runner.map_rounds(task, rounds, label=...)    rounds in order, each round's items in parallel
    runner.worker_plan(device, image_side)        the cores and batch budget each model gets

A new runner (Ray, Dask, multiprocessing) is one module with a :class:`Runner` subclass and one
line in ``pipelines.runners.RUNNERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pipelines.config import RunConfig
    from retrieval.runtimes.device import WorkerPlan


class WorkerTask(ABC):
    """Work that a runner ships to its workers once (it pickles) and runs per item.

    ``setup`` builds what a worker keeps for every item it runs (models, a codebook): once per
    worker, not per item. A runner whose workers outlive one map (Spark reuses its Python
    workers) keeps the state under ``setup_key`` for later maps that need the same.
    """

    def setup(self) -> Any:
        return None

    def setup_key(self) -> Hashable | None:
        """What ``setup`` depends on; None: never reused across maps."""
        return None

    @abstractmethod
    def run(self, state: Any, item: Any) -> None:
        """Do and commit the work of one item (idempotent: a re-run may repeat it)."""


class Runner(ABC):
    """Where the pipeline's work runs. Chosen once per run (``--runner``)."""

    name: ClassVar[str]
    # Whether items run in other processes (progress then comes from committed output).
    distributed: ClassVar[bool] = True

    def __init__(self, config: RunConfig):
        self.config = config

    @abstractmethod
    def worker_plan(self, image_side: int) -> WorkerPlan:
        """How many cores (threads) each worker's model gets, and its batch budget."""

    def prepare(self, task: WorkerTask) -> None:  # noqa: B027 - an optional hook
        """Run once in the launcher before a map (e.g. convert a model into the local cache
        that local workers then load)."""

    @abstractmethod
    def map(
        self,
        task: WorkerTask,
        items: Sequence[Any],
        *,
        label: str,
        progress_dir: str | None = None,
        already: int = 0,
    ) -> None:
        """Run ``task`` over every item. ``progress_dir``: where committed manifests appear
        (a progress bar counts them; ``already`` were committed before)."""

    def map_rounds(self, task: WorkerTask, rounds: Sequence[Sequence[Any]], *, label: str) -> None:
        """Rounds one after another; a round's items in parallel (the merge tree)."""
        for number, items in enumerate(rounds, start=1):
            self.map(task, items, label=f"{label} round {number}")


def committed_progress(
    directory: str | None, total: int, label: str, already: int
) -> AbstractContextManager[Any]:
    """A progress bar for work done in other processes (it counts committed manifests in
    ``directory``), or nothing when there is no folder to watch."""
    if directory is None:
        return nullcontext()
    from pipelines.progress import ShardProgress

    return ShardProgress(directory, total, label, already=already)
