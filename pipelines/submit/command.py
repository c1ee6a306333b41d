"""``retrieval submit``: print (``--dry-run``) or run the whole indexing job on a cluster."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import job, settings
from pipelines.config import (
    RunConfig,
    build_config,
    flat_settings,
    parse_spark_conf,
    read_config_file,
    read_raw_config,
)
from pipelines.submit.dataflow import DataflowSettings, SubmitError, pipeline_args
from pipelines.submit.driver import run_job
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
    master: str | None = None,
    k: int = 100,
) -> str:
    """Print what the job runs (dry run) or run it; returns the printed plan."""
    raw = _sections(config)
    run_config = build_config(read_config_file(config) if config else {})
    if runner == "dataflow":
        if master:
            raise SubmitError("--master is a Spark setting (--runner spark)")
        return _dataflow(raw, run_config, input, output, queries, config, dry_run, verbose, k)
    if runner == "spark":
        return _spark(raw, run_config, input, output, queries, config, dry_run, master, k)
    raise SubmitError(f"--runner is dataflow or spark, not {runner!r}")


def job_plan(config: RunConfig, input: str, output: str, queries: str | None) -> list[str]:
    """The job's stages as a dry run prints them (from ``pipelines.job``: what runs)."""
    chosen = job.stages_for(config, queries=bool(queries))
    layout = job.JobLayout(output)
    flat = flat_settings(config)
    lines = []
    for number, stage in enumerate(chosen, start=1):
        source = queries if stage in job.QUERY_STAGES else input
        described = stage.describe(layout, source).replace("\n", "\n#   ")
        lines.append(f"# {number}/{len(chosen)} {described}")
        values = settings.describe_values(stage.name, flat)
        if values:  # what the stage reads, from the setting declarations
            lines.append(f"#     settings: {values}")
    lines.append(f"#   bundle: {layout.bundle} (what `retrieval search --index {output}` reads)")
    return lines


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
    config: RunConfig,
    input: str,
    output: str,
    queries: str | None,
    config_path: str | None,
    dry_run: bool,
    verbose: bool,
    k: int,
) -> str:
    settings = DataflowSettings.from_config(raw.get("dataflow", {}))
    settings.check({"input": input, "output": output, "queries": queries})
    beam_args = pipeline_args(settings, settings.job_name)
    config = replace(config, runner="beam", beam_args=tuple(beam_args), verbose=verbose)
    lines = [
        "# The default job, run from this machine: the workers' stages are Dataflow jobs (named "
        f"{settings.job_name}-<stage>), the driver's run here, reading and writing gs://.",
        *_placeholder_note("dataflow", settings.missing()),
        *job_plan(config, input, output, queries),
        "# Beam pipeline options of the Dataflow jobs:",
        " ".join(beam_args),
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    if not dry_run:
        _refuse_placeholders("dataflow", settings.missing())
        run_job(input, output, config, queries=queries, k=k)
    return text


def _spark(
    raw: dict[str, Any],
    config: RunConfig,
    input: str,
    output: str,
    queries: str | None,
    config_path: str | None,
    dry_run: bool,
    master: str | None,
    k: int,
) -> str:
    settings = SparkSubmitSettings.from_config(raw.get("spark", {}))
    if master:
        settings = replace(settings, master=master)
    conf = dict(parse_spark_conf(raw.get("spark_conf", {})))
    args = dict(queries=queries, config=config_path, k=k)
    submit_cmd = spark_submit_command(settings, conf, input, output, **args)
    dataproc_cmd = dataproc_command(settings, conf, input, output, **args)
    dataproc = bool(settings.cluster)
    lines = [
        "# The default job as one Spark application: its driver is deploy/spark/job.py, the "
        "workers' stages run on the executors, the driver's in the driver.",
        *job_plan(replace(config, runner="spark"), input, output, queries),
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
        finished = subprocess.run(command, check=False)
        if finished.returncode:
            raise SubmitError(
                f"the Spark application failed (exit status {finished.returncode}); its driver's "
                "output is above"
            )
    return text


def _spark_submit_program() -> str:
    """``spark-submit`` from PATH, else the one pip's pyspark ships."""
    found = shutil.which("spark-submit")
    if found:
        return found
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
