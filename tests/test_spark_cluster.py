"""`retrieval extract --runner spark --master spark://...` on a real standalone cluster (one
master, two workers, on 127.0.0.1: the ``spark_cluster`` fixture): every image indexed, by
executors on both workers, not by a driver running local[N]."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from support import REPO_ROOT, pattern_images, processes_in, spark_standalone_cluster

from pipelines.spark.session import QUIET_LOG4J

N_IMAGES = 12
QUICK_JVM = "-XX:TieredStopAtLevel=1"
QUIET_DRIVER = f"-Dlog4j2.configurationFile={QUIET_LOG4J.as_uri()}"


def _cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """``retrieval ARGS`` in a fresh process, which starts (and, on exit, ends) its own Spark
    driver: the cluster's session never lives in the test process, so a later test's local[N]
    session (the ``spark`` fixture) cannot join it, and this test cannot join that one."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _once_no_app_is_active(cluster, timeout_s: float = 30) -> dict:
    """The master's state once it has moved every application to ``completedapps`` (it does so
    when the driver unregisters or disconnects, a moment after the CLI exits)."""
    deadline = time.monotonic() + timeout_s
    while (state := cluster.state())["activeapps"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not state["activeapps"], f"still running after the CLI exited: {state['activeapps']}"
    return state


def test_extract_runs_on_the_clusters_executors(spark_cluster, tmp_path):
    images, out = tmp_path / "images", tmp_path / "desc"
    images.mkdir()
    for name, data in pattern_images(N_IMAGES).items():
        (images / name).write_bytes(data)

    start = time.monotonic()
    done = _cli(
        "extract",
        *("--runner", "spark", "--master", spark_cluster.master),
        *("--input", str(images), "--output", str(out), "--shard-size", "4"),
        # TensorFlow runs the backbone as is: each executor would otherwise convert it to
        # tflite-int8 (about 20 s on CI's two cores); the runtimes have their own tests.
        "--runtime",
        "tensorflow",
        *("--spark-conf", "spark.ui.enabled=false"),
        # The driver's and executors' JVMs only plan, start Python workers and pass small Arrow
        # batches: C1 alone starts them sooner on two cores (as the local session does for its
        # driver, see session_conf), about 15 s sooner here.
        *("--spark-conf", f"spark.driver.extraJavaOptions={QUICK_JVM} {QUIET_DRIVER}"),
        *("--spark-conf", f"spark.executor.extraJavaOptions={QUICK_JVM}"),
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == summary["indexed"] == N_IMAGES, summary
    assert summary["failed"] == 0, summary

    # The master saw one application, now finished (its driver stopped it when the CLI exited),
    # that ran executors on the cluster's workers...
    state = _once_no_app_is_active(spark_cluster)
    (app,) = state["completedapps"]
    assert app["name"] == "cbir-retrieval" and app["state"] == "FINISHED", app
    # ...on both workers (each keeps an executor's log in SPARK_WORKER_DIR/APP/EXECUTOR/stderr),
    # and the executors, not the driver, ran the tasks: one per shard.
    finished = 0
    for work_dir in spark_cluster.work_dirs:
        executor_logs = list((work_dir / app["id"]).glob("*/stderr"))
        assert executor_logs, f"no executor of {app['id']} ran in {work_dir}"
        finished += sum(log.read_text().count("Executor: Finished task") for log in executor_logs)
    assert finished >= N_IMAGES // 4, f"{finished} tasks finished on the executors"

    # The cluster's session lived and ended in the CLI's process: this one has none, or the
    # local[N] session of the ``spark`` fixture, which later tests keep using.
    from pipelines.spark.session import active_session

    session = active_session()
    assert session is None or session.sparkContext.master.startswith("local[")
    print(f"extract on the cluster: {took:.1f} s")


def test_a_cluster_that_cannot_start_fails_the_test_with_its_log(tmp_path):
    """Never a skip or a hang: a master that cannot start (no such class) fails at once, with
    the end of its log (the JVM's reason), and leaves no process behind."""
    start = time.monotonic()
    with (
        pytest.raises(pytest.fail.Exception) as failed,
        spark_standalone_cluster(tmp_path, master_class="org.apache.spark.deploy.master.Nope"),
    ):
        pass
    message = str(failed.value)
    assert message.startswith(
        "the Spark standalone cluster did not start (org.apache.spark.deploy.master.Nope exited"
    )
    assert "ClassNotFoundException: org.apache.spark.deploy.master.Nope" in message  # its log
    assert f"--- last lines of {tmp_path / 'logs' / 'master.log'} ---" in message
    assert time.monotonic() - start < 60
    assert not processes_in(tmp_path)
