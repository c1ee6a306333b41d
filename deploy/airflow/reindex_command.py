"""The ``retrieval reindex`` command line a scheduled run submits, for Dataflow or Spark.

Kept apart from the DAG file (and free of Airflow imports) so the tests check the exact argument
list against the project's own CLI parser. Deploy it next to ``cbir_reindex_dag.py`` in the
Composer environment's ``dags/`` folder.
"""

from __future__ import annotations

RUNNERS = ("dataflow", "spark")


def reindex_command(
    runner: str,
    *,
    corpus: str,
    root: str,
    project: str = "",
    region: str = "",
    temp_location: str = "",
    worker_image: str = "",
    max_workers: int = 50,
    keep: int = 7,
) -> list[str]:
    """``retrieval reindex`` arguments for one nightly run on ``runner``."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, not {runner!r}")
    command = ["retrieval", "reindex", "--corpus", corpus, "--root", root, "--keep", str(keep)]
    if runner == "dataflow":
        beam = (
            f"--runner=DataflowRunner --project={project} --region={region} "
            f"--temp_location={temp_location} --sdk_container_image={worker_image} "
            f"--max_num_workers={max_workers} --experiments=use_runner_v2"
        )
        return [*command, "--runner", "beam", "--beam-args", beam]
    # Spark: the command runs as the driver of a Dataproc PySpark job (pipelines/spark, issue 6).
    return [*command, "--runner", "spark"]
