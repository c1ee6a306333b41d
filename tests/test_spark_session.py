"""How the SparkSession is configured: quiet and offline-safe locally, the user's settings win."""

from __future__ import annotations

import sys

from pipelines.spark.session import QUIET_LOG4J, SparkSettings, session_conf


def test_local_sessions_bind_to_loopback_quietly_on_this_interpreter():
    conf = session_conf(SparkSettings(workers=3))
    assert conf["spark.master"] == "local[3]"
    assert conf["spark.driver.bindAddress"] == conf["spark.driver.host"] == "127.0.0.1"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.pyspark.python"] == sys.executable
    assert conf["spark.driver.extraJavaOptions"].endswith(QUIET_LOG4J.as_uri())
    assert QUIET_LOG4J.exists() and "rootLogger.level = error" in QUIET_LOG4J.read_text()
    assert conf["spark.sql.execution.arrow.pyspark.enabled"] == "true"


def test_verbose_keeps_sparks_own_logging_and_user_settings_win():
    conf = session_conf(
        SparkSettings(master="spark://h:7077", verbose=True, conf={"spark.ui.enabled": "true"})
    )
    assert conf["spark.master"] == "spark://h:7077"
    assert "spark.driver.extraJavaOptions" not in conf
    assert "spark.pyspark.python" not in conf  # a cluster's Python comes from its environment
    assert conf["spark.ui.enabled"] == "true"


def test_the_running_session_is_shared(spark):
    from pipelines.config import RunConfig
    from pipelines.stages import spark_session

    settings, session = spark_session(RunConfig(runner="spark", workers=2))
    assert session is spark and session.sparkContext.master == "local[2]"
    assert settings.is_local
