"""The in-process runner: every item one after another in this process (debugging, baselines,
and the small work units of other runs: a single shard, a single index group)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pipelines.runners.base import Runner, WorkerTask
from retrieval.runtimes.device import WorkerPlan, plan_worker


class LocalRunner(Runner):
    name = "local"
    distributed = False

    def worker_plan(self, image_side: int) -> WorkerPlan:
        return plan_worker(
            self.config.device, workers=1, threads=self.config.threads, image_side=image_side
        )

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
        state = task.setup()
        unit = "shard" if progress_dir else "task"
        for item in tqdm(items, desc=label, unit=unit):
            task.run(state, item)
