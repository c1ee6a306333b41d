"""The nightly schedules in deploy/: the Airflow DAG's structure (Airflow itself does not install
beside this stack: it pins older protobuf/pyarrow than Beam and TensorFlow here) and the
Kubernetes CronJob; both must run a `retrieval reindex` command our own CLI accepts."""

from __future__ import annotations

import ast
import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser
from pipelines.cli.options import attach_beam_args

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _load_command_module():
    spec = importlib.util.spec_from_file_location(
        "reindex_command", DEPLOY / "airflow" / "reindex_command.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(argv: list[str]):
    assert argv[0] == "retrieval"
    return build_parser().parse_args(attach_beam_args(argv[1:]))


def test_dataflow_command_is_a_valid_reindex():
    module = _load_command_module()
    argv = module.reindex_command(
        "dataflow",
        corpus="gs://b/photos/",
        root="gs://b/root",
        project="p",
        region="europe-west1",
        temp_location="gs://b/tmp",
        worker_image="img:1",
    )
    args = _parse(argv)
    assert (args.command, args.corpus, args.root, args.runner) == (
        "reindex",
        "gs://b/photos/",
        "gs://b/root",
        "beam",
    )
    beam = shlex.split(args.beam_args)
    assert "--runner=DataflowRunner" in beam and "--sdk_container_image=img:1" in beam
    with pytest.raises(ValueError):
        module.reindex_command("flink", corpus="x", root="y")


def test_spark_command_targets_the_spark_runner():
    module = _load_command_module()
    argv = module.reindex_command("spark", corpus="gs://b/photos/", root="gs://b/root")
    assert argv[:2] == ["retrieval", "reindex"] and argv[-2:] == ["--runner", "spark"]
    runner_choices = next(
        a.choices
        for a in build_parser()._subparsers._group_actions[0].choices["reindex"]._actions
        if a.dest == "runner"
    )
    if "spark" in runner_choices:  # once the Spark runner (issue 6) is in the CLI
        assert _parse(argv).runner == "spark"


def test_airflow_dag_structure():
    tree = ast.parse((DEPLOY / "airflow" / "cbir_reindex_dag.py").read_text())
    calls = {
        node.func.id: node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    dag = {k.arg: k.value for k in calls["DAG"].keywords}
    assert ast.literal_eval(dag["dag_id"]) == "cbir_nightly_reindex"
    assert ast.literal_eval(dag["schedule"]) == "0 2 * * *"
    assert ast.literal_eval(dag["catchup"]) is False
    assert ast.literal_eval(dag["max_active_runs"]) == 1
    for operator in ("BranchPythonOperator", "KubernetesPodOperator", "DataprocSubmitJobOperator"):
        assert operator in calls
    task_ids = {
        ast.literal_eval(k.value)
        for node in calls.values()
        for k in node.keywords
        if k.arg == "task_id"
    }
    assert task_ids == {"choose_runner", "reindex_on_dataflow", "reindex_on_spark"}
    assert "reindex_command" in {c for c in calls}  # both branches build the checked command
    imports = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert {"DAG", "KubernetesPodOperator", "DataprocSubmitJobOperator"} <= imports
    # Dataproc runs a file of the project inside deploy/spark's image (COPY ... /opt/cbir)
    (main_file,) = [
        ast.literal_eval(value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "main_python_file_uri"
    ]
    assert main_file.startswith("file:///opt/cbir/")
    assert (DEPLOY.parent / main_file.removeprefix("file:///opt/cbir/")).is_file(), main_file
    compile(tree, "cbir_reindex_dag.py", "exec")


def test_kubernetes_cronjob():
    doc = yaml.safe_load((DEPLOY / "k8s" / "reindex-cronjob.yaml").read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["image"] and container["resources"]["requests"]["memory"]
    args = _parse([*container["command"], *container["args"]])
    assert args.command == "reindex" and args.corpus.startswith("gs://")
    assert args.root.startswith("gs://") and args.keep == 7
    assert "--runner=DataflowRunner" in shlex.split(args.beam_args)


PARSE_WITH_AIRFLOW = """
import json, os, sys
os.environ.setdefault("AIRFLOW_HOME", sys.argv[2])
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("cbir_nightly_reindex")
print(json.dumps({
    "errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "tasks": {t.task_id: sorted(x.task_id for x in t.downstream_list) for t in dag.tasks}
    if dag else None,
    "schedule": str(dag.schedule) if dag else None,
    "arguments": next((t.arguments for t in dag.tasks if t.task_id == "reindex_on_dataflow"), None)
    if dag else None,
}))
"""


def test_real_airflow_parses_the_dag(tmp_path):
    """`make test` points CBIR_AIRFLOW_PYTHON at .venv-airflow (requirements/airflow.txt)."""
    import json
    import os
    import subprocess

    python = os.environ.get("CBIR_AIRFLOW_PYTHON")
    if not python:
        if os.environ.get("CBIR_REQUIRE_BENCHMARKS"):  # CI: `make test` must provide it
            pytest.fail("CBIR_AIRFLOW_PYTHON is not set (run the suite with `make test`)")
        pytest.skip("no Airflow venv (run `make airflow` or `make test`)")
    out = subprocess.run(
        [python, "-c", PARSE_WITH_AIRFLOW, str(DEPLOY / "airflow"), str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        # Composer puts the dags/ folder on sys.path (the DAG imports reindex_command from it)
        env={**os.environ, "PYTHONPATH": str(DEPLOY / "airflow")},
    )
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["errors"] == {}
    assert parsed["tasks"] == {
        "choose_runner": ["reindex_on_dataflow", "reindex_on_spark"],
        "reindex_on_dataflow": [],
        "reindex_on_spark": [],
    }
    assert parsed["schedule"] == "0 2 * * *"
    assert parsed["arguments"][:1] == ["reindex"] and "--beam-args" in parsed["arguments"]
