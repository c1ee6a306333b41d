"""How the SparkSession is configured: quiet and offline-safe locally, the user's settings win."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.spark.session import QUIET_LOG4J, SparkSettings, session_conf


def test_local_sessions_bind_to_loopback_quietly_on_this_interpreter():
    conf = session_conf(SparkSettings(workers=3))
    assert conf["spark.master"] == "local[3]"
    assert conf["spark.driver.bindAddress"] == conf["spark.driver.host"] == "127.0.0.1"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.pyspark.python"] == sys.executable
    assert conf["spark.driver.extraJavaOptions"].endswith(QUIET_LOG4J.as_uri())
    assert "-XX:TieredStopAtLevel=1" in conf["spark.driver.extraJavaOptions"]  # quick JVM start
    assert QUIET_LOG4J.exists() and "rootLogger.level = error" in QUIET_LOG4J.read_text()
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"


def test_verbose_keeps_sparks_own_logging_and_user_settings_win():
    conf = session_conf(
        SparkSettings(master="spark://h:7077", verbose=True, conf={"spark.ui.enabled": "true"})
    )
    assert conf["spark.master"] == "spark://h:7077"
    assert "spark.driver.extraJavaOptions" not in conf  # a cluster's JVMs: Spark's defaults
    local_verbose = session_conf(SparkSettings(workers=2, verbose=True))
    assert local_verbose["spark.driver.extraJavaOptions"] == "-XX:TieredStopAtLevel=1"
    assert "spark.pyspark.python" not in conf  # a cluster's Python comes from its environment
    assert conf["spark.ui.enabled"] == "true"


def test_the_running_session_is_shared(spark):
    from pipelines.config import RunConfig
    from pipelines.runners.spark import session_for

    settings, session = session_for(RunConfig(runner="spark", workers=2))
    assert session is spark and session.sparkContext.master == "local[2]"
    assert settings.is_local


def test_a_jvm_that_cannot_start_is_tried_twice_then_named_with_its_log(tmp_path):
    """A real JVM that exits while starting (a heap too small to boot): one more attempt, then
    an error naming both attempts and the end of the JVM's log (where the reason is)."""
    from pyspark import SparkConf
    from pyspark.java_gateway import launch_gateway

    from pipelines.spark import session

    settings = SparkSettings(workers=1, conf={"spark.driver.memory": "1k"})
    conf = SparkConf(loadDefaults=False).setAll(list(session_conf(settings).items()))
    with pytest.raises(RuntimeError) as failed:
        session._launch_gateway(conf, settings, launch_gateway)
    message = str(failed.value)
    assert "Spark did not start (2 attempts" in message
    assert "attempt 1:" in message and "attempt 2:" in message
    assert "heap" in message.lower()  # the JVM's own reason, from the end of its log


def _start_spark_in_a_child(*flags: str) -> str:
    """stderr of a fresh process that starts local Spark as the CLI does and runs one job."""
    code = (
        "import sys; from pipelines.spark.session import SparkSettings, get_session; "
        "s = get_session(SparkSettings(workers=1, verbose='-v' in sys.argv)); "
        "assert s.range(3).count() == 3; s.stop()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_spark_starts_quietly_and_verbose_brings_its_log_back():
    quiet = _start_spark_in_a_child()
    assert not [line for line in quiet.splitlines() if line.strip()], quiet[-2000:]
    verbose = _start_spark_in_a_child("-v")
    assert "WARN" in verbose or "INFO" in verbose, verbose[-2000:]
