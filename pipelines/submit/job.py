"""The whole indexing job as a list of ``retrieval`` stage commands, and a driver that runs them.

    extract (corpus) ─► train ─► index ─► merge        [─► extract (queries)]

Both submitters build on this list: ``retrieval submit --runner dataflow`` runs the steps from the
submitting machine with the heavy stages (extract, index) on Dataflow, and ``--runner spark``
hands :func:`main` (through ``deploy/spark/job.py``) to ``spark-submit`` / Dataproc, where the
steps run in the Spark driver with ``--runner spark``. A dry run prints the same steps it runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from retrieval import storage

# Stages that run on the workers of a runner; train and merge run where the steps run.
DISTRIBUTED = ("extract", "index")


@dataclass(frozen=True)
class Step:
    """One stage of the job: the ``retrieval`` arguments, and where its work happens."""

    name: str
    argv: tuple[str, ...]
    where: str

    def command(self) -> str:
        return shlex.join(["retrieval", *self.argv])


FOLDERS = ("descriptors", "codebook", "index_shards", "index", "query_descriptors")


def job_folders(output: str) -> dict[str, str]:
    """Where a job writes, under ``--output``: one folder per stage."""
    return {name: storage.join(output, name) for name in FOLDERS}


def job_steps(
    input: str,
    output: str,
    *,
    queries: str | None = None,
    config: str | None = None,
    runner_args: Sequence[str] = (),
    runner_where: str = "the runner's workers",
    driver_where: str = "this machine",
) -> list[Step]:
    """The stages of one indexing job. ``runner_args`` go to the distributed stages."""
    out = job_folders(output)
    with_config = ("--config", config) if config else ()

    def step(name: str, *argv: str) -> Step:
        stage = argv[0]
        distributed = stage in DISTRIBUTED
        extra = (*with_config, *runner_args) if distributed else with_config
        if stage == "merge":
            extra = ()  # merge has no settings: it folds what index wrote
        return Step(name, (*argv, *extra), runner_where if distributed else driver_where)

    steps = [
        step("extract corpus", "extract", "--input", input, "--output", out["descriptors"]),
        step(
            "train codebook",
            "train",
            "--descriptors",
            out["descriptors"],
            "--output",
            out["codebook"],
        ),
        step(
            "index shards",
            "index",
            "--descriptors",
            out["descriptors"],
            "--codebook",
            out["codebook"],
            "--output",
            out["index_shards"],
        ),
        step("merge index", "merge", "--shards", out["index_shards"], "--output", out["index"]),
    ]
    if queries:
        steps.append(
            step(
                "extract queries",
                "extract",
                "--input",
                queries,
                "--output",
                out["query_descriptors"],
            )
        )
    return steps


def run_steps(steps: Sequence[Step], *, verbose: bool = False) -> None:
    """Run ``steps`` in this process, in order; the first failure stops the job."""
    from pipelines import cli

    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.name}: {step.command()}", flush=True)
        code = cli.main((["--verbose"] if verbose else []) + list(step.argv))
        if code:
            raise SystemExit(f"step {number} ({step.name}) failed with exit status {code}")


def parse_job_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="job.py",
        description="The whole indexing job in a Spark driver (what `retrieval submit "
        "--runner spark` runs on the cluster): extract, train, index, merge, [queries].",
    )
    parser.add_argument("--input", required=True, help="image prefix or manifest")
    parser.add_argument("--output", required=True, help="job folder")
    parser.add_argument("--queries", help="query image prefix or manifest")
    parser.add_argument("--config", help="config file (shipped with --files on clusters)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Spark driver entry point: every step with ``--runner spark`` in the session Spark gave."""
    args = parse_job_args(sys.argv[1:] if argv is None else argv)
    steps = job_steps(
        args.input,
        args.output,
        queries=args.queries,
        config=args.config,
        runner_args=("--runner", "spark"),
        runner_where="the Spark executors",
        driver_where="the Spark driver",
    )
    run_steps(steps, verbose=args.verbose)
    return 0
