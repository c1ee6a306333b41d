"""``retrieval submit``: print (``--dry-run``) or run the whole indexing job on a cluster."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipelines.config import parse_spark_conf, read_raw_config
from pipelines.submit.dataflow import DataflowSettings, SubmitError, dataflow_steps
from pipelines.submit.job import run_steps
from pipelines.submit.spark import (
    SparkSubmitSettings,
    dataproc_command,
    format_command,
    spark_submit_command,
)


def _sections(config: str | None) -> dict[str, Any]:
    return read_raw_config(config) if config else {}


def submit(
    runner: str,
    input: str,
    output: str,
    *,
    queries: str | None = None,
    config: str | None = None,
    dry_run: bool = False,
    verbose: bool = False,
) -> str:
    """Print what the job runs (dry run) or run it; returns the printed plan."""
    raw = _sections(config)
    if runner == "dataflow":
        return _dataflow(raw, input, output, queries, config, dry_run, verbose)
    if runner == "spark":
        return _spark(raw, input, output, queries, config, dry_run)
    raise SubmitError(f"--runner is dataflow or spark, not {runner!r}")


def _placeholder_note(section: str, missing: list[str]) -> list[str]:
    if not missing:
        return []
    names = ", ".join(missing)
    return [f"# <...> are placeholders: set {names} in the [{section}] section of --config"]


def _refuse_placeholders(section: str, missing: list[str]) -> None:
    if missing:
        raise SubmitError(
            f"cannot submit: [{section}] needs {', '.join(missing)} in the config file "
            "(--dry-run shows the commands with placeholders)"
        )


def _dataflow(
    raw: dict[str, Any],
    input: str,
    output: str,
    queries: str | None,
    config: str | None,
    dry_run: bool,
    verbose: bool,
) -> str:
    settings = DataflowSettings.from_config(raw.get("dataflow", {}))
    steps = dataflow_steps(settings, input, output, queries=queries, config=config)
    lines = [
        f"# The indexing job: {len(steps)} steps; extract and index run on Dataflow, train and "
        "merge on this machine (reading and writing gs://).",
        *_placeholder_note("dataflow", settings.missing()),
    ]
    for number, step in enumerate(steps, 1):
        lines += [f"# {number}/{len(steps)} {step.name} ({step.where})", step.command()]
    text = "\n".join(lines)
    print(text, flush=True)
    if not dry_run:
        _refuse_placeholders("dataflow", settings.missing())
        run_steps(steps, verbose=verbose)
    return text


def _spark(
    raw: dict[str, Any],
    input: str,
    output: str,
    queries: str | None,
    config: str | None,
    dry_run: bool,
) -> str:
    settings = SparkSubmitSettings.from_config(raw.get("spark", {}))
    conf = dict(parse_spark_conf(raw.get("spark_conf", {})))
    args = dict(queries=queries, config=config)
    submit_cmd = spark_submit_command(settings, conf, input, output, **args)
    dataproc_cmd = dataproc_command(settings, conf, input, output, **args)
    dataproc = bool(settings.cluster)
    stages = "extract, train, index, merge" + (", extract queries" if queries else "")
    lines = [
        f"# The indexing job as one Spark application ({stages}); its driver is "
        "deploy/spark/job.py, extraction and index builds run on the executors.",
        "# spark-submit (standalone, YARN, Kubernetes)"
        + (":" if not dataproc else ", not used: [spark] cluster is set:"),
        format_command(submit_cmd),
        *_placeholder_note("spark", settings.missing(dataproc=False)),
        "# Dataproc" + (" (what runs: [spark] cluster is set):" if dataproc else ":"),
        format_command(dataproc_cmd),
        *_placeholder_note("spark", settings.missing(dataproc=True)),
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    if not dry_run:
        _refuse_placeholders("spark", settings.missing(dataproc=dataproc))
        command = dataproc_cmd if dataproc else submit_cmd
        if not dataproc:
            command = [_spark_submit_program(), *command[1:]]
        elif shutil.which("gcloud") is None:
            raise SubmitError("gcloud is not installed: it submits the job to Dataproc")
        subprocess.run(command, check=True)
    return text


def _spark_submit_program() -> str:
    """``spark-submit`` from PATH, else the one pip's pyspark ships."""
    found = shutil.which("spark-submit")
    if found:
        return found
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
