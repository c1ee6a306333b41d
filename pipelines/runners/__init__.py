"""Runners: where the pipeline's work runs, one module each behind one interface (``base.py``).

    local   this process, one item after another
    beam    Apache Beam: the FnApiRunner with --workers processes, or Dataflow via --beam-args
    spark   PySpark: local[--workers], a cluster via --master, or inside spark-submit

The runner is chosen once (``--runner``); every stage asks :func:`runner_for` for it. Adding a
runner (Ray, say) is one module implementing :class:`~pipelines.runners.base.Runner` and one line
in ``pipelines.settings.RUNNERS``: its name, and where its class lives (imported only when
chosen, so a Spark run never imports Beam); the flag's choices and the config check follow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipelines.runners.base import Runner, WorkerTask
from pipelines.settings import RUNNERS

if TYPE_CHECKING:
    from pipelines.config import RunConfig


__all__ = ["RUNNERS", "Runner", "WorkerTask", "runner_for"]


def runner_class(name: str) -> type[Runner]:
    try:
        module, _, attribute = RUNNERS[name].partition(":")
    except KeyError:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {name!r}") from None
    return getattr(importlib.import_module(module), attribute)


def runner_for(config: RunConfig, *, items: int | None = None) -> Runner:
    """The run's runner; the in-process one for a single work item (starting workers for one
    shard or one index group costs more than it saves)."""
    name = "local" if items is not None and items <= 1 else config.runner
    return runner_class(name)(config)
