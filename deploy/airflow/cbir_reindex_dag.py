"""Nightly re-index on Cloud Composer (Airflow 2): only new and changed images are extracted.

``retrieval reindex`` writes a complete new version under ROOT and moves ROOT/CURRENT to it only
at the end, so a failed night leaves yesterday's index serving; a retry resumes (committed shards
are skipped). Pick the runner with the ``runner`` param (or the Airflow Variable
``cbir_runner``): ``dataflow`` runs the launcher in a pod of the Composer cluster and the work on
Dataflow workers; ``spark`` submits the same command to a Dataproc cluster as a PySpark job.

Airflow Variables (read when a run starts, through templates; nothing is read while the file is
parsed): cbir_corpus (gs://bucket/photos/), cbir_root (gs://bucket/index-root), cbir_project,
cbir_region, cbir_temp_location, cbir_image (the container of deploy/dataflow),
cbir_dataproc_cluster. Works on Airflow 2.9+ and 3 (the standard, cncf.kubernetes and google
provider packages, all present on Cloud Composer).
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.google.cloud.operators.dataproc import DataprocSubmitJobOperator
from airflow.providers.standard.operators.python import BranchPythonOperator
from reindex_command import reindex_command

SETTINGS = {
    name: "{{ var.value.get('cbir_" + name + "', '') }}"
    for name in ("corpus", "root", "project", "region", "temp_location", "image", "runner")
}
SETTINGS["dataproc_cluster"] = "{{ var.value.get('cbir_dataproc_cluster', 'cbir-spark') }}"

with DAG(
    dag_id="cbir_nightly_reindex",
    description="Re-index only what changed in the corpus; CURRENT moves when the version is done",
    schedule="0 2 * * *",
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # two re-indexes must never race for the same root
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=15)},
    params={"runner": "dataflow"},  # or "spark"; overridable per run
    tags=["cbir", "retrieval"],
) as dag:
    choose = BranchPythonOperator(
        task_id="choose_runner",
        python_callable=lambda params: f"reindex_on_{params['runner']}",
    )
    on_dataflow = KubernetesPodOperator(
        task_id="reindex_on_dataflow",
        name="cbir-reindex",
        image=SETTINGS["image"],
        cmds=["retrieval"],
        arguments=reindex_command(
            "dataflow",
            corpus=SETTINGS["corpus"],
            root=SETTINGS["root"],
            project=SETTINGS["project"],
            region=SETTINGS["region"],
            temp_location=SETTINGS["temp_location"],
            worker_image=SETTINGS["image"],
        )[1:],
        container_resources={"requests": {"memory": "8Gi", "cpu": "2"}},
        get_logs=True,
        execution_timeout=dt.timedelta(hours=8),
    )
    on_spark = DataprocSubmitJobOperator(
        task_id="reindex_on_spark",
        project_id=SETTINGS["project"],
        region=SETTINGS["region"],
        job={
            "placement": {"cluster_name": SETTINGS["dataproc_cluster"]},
            "pyspark_job": {
                "main_python_file_uri": "file:///opt/cbir/pipelines/cli/__main__.py",
                "args": reindex_command("spark", corpus=SETTINGS["corpus"], root=SETTINGS["root"])[
                    1:
                ],
            },
        },
        execution_timeout=dt.timedelta(hours=8),
    )
    choose >> [on_dataflow, on_spark]
