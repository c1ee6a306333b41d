"""Starting (or joining) the SparkSession the Spark stages run in.

Three situations, one function:

* ``local[N]`` (the default, ``--workers N``): the JVM starts in this process. Everything binds to
  127.0.0.1 (no hostname lookup, no network needed), the web UI is off, Python workers run this
  interpreter, and unless ``verbose`` the JVM's log goes to a file instead of the terminal.
* ``--master URL`` (standalone ``spark://``, ``yarn``, ``k8s://``): the same, with the master given;
  Python/archives settings come from ``--spark-conf`` (see ``deploy/spark/``).
* inside ``spark-submit`` / Dataproc: a JVM already exists (``PYSPARK_GATEWAY_PORT`` is set) and
  its configuration wins; only the ``--spark-conf`` values are added.

One session per process: the stages of ``retrieval evaluate`` (extract, index) share it, and so do
the tests (a session fixture starts it once).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

QUIET_LOG4J = Path(__file__).with_name("log4j2-quiet.properties")
# A local JVM that exits while starting is tried once more, after this pause.
START_ATTEMPTS = 2
RETRY_PAUSE_S = 2.0


@dataclass(frozen=True)
class SparkSettings:
    """Where and how to run Spark: ``master`` (None: ``local[workers]``) and extra conf."""

    workers: int = 1
    master: str | None = None
    conf: Mapping[str, str] = field(default_factory=dict)
    verbose: bool = False

    @property
    def resolved_master(self) -> str:
        return self.master or f"local[{max(1, self.workers)}]"

    @property
    def is_local(self) -> bool:
        return self.resolved_master.startswith("local")


def session_conf(settings: SparkSettings) -> dict[str, str]:
    """The Spark configuration a session starts with: project defaults, then ``settings.conf``."""
    conf = {
        "spark.master": settings.resolved_master,
        "spark.app.name": "cbir-retrieval",
        # Arrow moves image references and descriptors between the JVM and Python workers.
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Our own progress bar counts committed shards; Spark's console bar would fight it.
        "spark.ui.showConsoleProgress": "false",
        # Each Python worker keeps its model loaded across tasks (the default; stated on purpose).
        "spark.python.worker.reuse": "true",
        # Python workers log TensorFlow's C++ lines as the launcher does (the CLI's quiet default
        # or the user's value; the JVM passes this on even in local mode, so --verbose shows all).
        "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": os.environ.get(
            "TF_CPP_MIN_LOG_LEVEL", "0" if settings.verbose else "2"
        ),
    }
    if settings.is_local:
        conf.update(
            {
                "spark.ui.enabled": "false",
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.pyspark.python": sys.executable,
                "spark.pyspark.driver.python": sys.executable,
                # A local run's tasks share the driver JVM's memory; images live in Python workers.
                "spark.driver.memory": "1g",
            }
        )
    java_options = []
    if settings.is_local:
        # The JVM of a local run only plans jobs and moves small Arrow batches (references in,
        # descriptors out); the work is in the Python workers. Its C2 compiler threads compete
        # with them for the cores while a cold JVM compiles Spark's classes: with C1 only, session
        # start and the first job took half the time (measured: 24 -> 13 s and 20 -> 10 s on a
        # loaded 2-core machine), and later jobs were no slower.
        java_options.append("-XX:TieredStopAtLevel=1")
    if not settings.verbose:
        java_options.append(f"-Dlog4j2.configurationFile={QUIET_LOG4J.as_uri()}")
    if java_options:
        conf["spark.driver.extraJavaOptions"] = " ".join(java_options)
    conf.update(settings.conf)
    return conf


_LOG_FILE: Path | None = None


def active_session() -> SparkSession | None:
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def get_session(settings: SparkSettings) -> SparkSession:
    """The process's SparkSession: the running one if any, else a new one from ``settings``."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        master = session.sparkContext.master
        if settings.master and master != settings.master:
            log.warning("a Spark session on %s is already running; %s is ignored", master, settings)
        for key, value in settings.conf.items():
            _set_runtime_conf(session, key, value)
        return session
    if os.environ.get("PYSPARK_GATEWAY_PORT"):  # under spark-submit: its configuration wins
        builder = SparkSession.builder
        for key, value in settings.conf.items():
            builder = builder.config(key, value)
        return builder.getOrCreate()
    return _start_session(settings)


def _set_runtime_conf(session: SparkSession, key: str, value: str) -> None:
    try:
        session.conf.set(key, value)
    except Exception as exc:  # static settings cannot change once the JVM runs
        log.warning("cannot change %s on a running Spark session: %s", key, exc)


def _start_session(settings: SparkSettings) -> SparkSession:
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    conf = SparkConf(loadDefaults=False).setAll(list(session_conf(settings).items()))
    if settings.is_local:
        # Python workers are started by the JVM with this environment; 127.0.0.1 avoids a
        # hostname lookup (and its warning) on machines whose name resolves to loopback.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        os.environ["PYSPARK_PYTHON"] = sys.executable
    gateway = _launch_gateway(conf, settings, launch_gateway)
    context = SparkContext(conf=conf, gateway=gateway)
    if not settings.verbose:
        context.setLogLevel("ERROR")
    return SparkSession(context)


def _launch_gateway(conf, settings: SparkSettings, launch, attempts: int = START_ATTEMPTS):
    """Start Spark's JVM (``pyspark.java_gateway.launch_gateway``), once more if it exits first.

    PySpark reports any JVM that exits before handing over its port as "Java gateway process
    exited before sending its port number"; on a loaded machine that can be a one-off (the JVM
    killed or starved while starting), so one more start is tried after a pause. A JVM that
    cannot start twice is a real problem: the error then gives both attempts' causes and the
    end of the JVM's log (its output, kept in a file unless ``--verbose``).
    """
    global _LOG_FILE
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        popen_kwargs: dict = {}
        if not settings.verbose:
            _LOG_FILE = Path(tempfile.gettempdir()) / f"cbir-spark-{os.getpid()}.log"
            log.info("Spark's JVM log: %s", _LOG_FILE)
            # Both streams: a JVM that fails to boot says why on stdout ("Error occurred during
            # initialization of VM"), which used to be discarded, leaving only PySpark's "Java
            # gateway process exited before sending its port number".
            log_file = _LOG_FILE.open("ab")
            popen_kwargs = {"stdout": log_file, "stderr": subprocess.STDOUT}
        try:
            return launch(conf, popen_kwargs=popen_kwargs)
        except Exception as exc:
            failures.append(f"attempt {attempt}: {exc}")
            if attempt < attempts:
                log.warning("Spark's JVM did not start (%s); trying once more", exc)
                time.sleep(RETRY_PAUSE_S)
    where = f"; its log: {_LOG_FILE}" if _LOG_FILE else ""
    raise RuntimeError(
        f"Spark did not start ({len(failures)} attempts{where}): "
        + "; ".join(failures)
        + _log_tail()
    )


def _log_tail(lines: int = 20) -> str:
    if _LOG_FILE is None or not _LOG_FILE.exists():
        return ""
    tail = _LOG_FILE.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {_LOG_FILE} ---\n" + "\n".join(tail)


def task_threads(session: SparkSession, config: object) -> int | None:
    """TensorFlow threads per task on a cluster: ``--threads-per-worker``, else spark.task.cpus."""
    given = getattr(config, "threads_per_worker", None)
    if given:
        return int(given)
    return int(session.sparkContext.getConf().get("spark.task.cpus", "1"))


def parallelism(session: SparkSession) -> int:
    """How many tasks the cluster runs at once (local[N]: N)."""
    return max(1, session.sparkContext.defaultParallelism)


def one_row_per_partition(session: SparkSession, rows: Sequence[tuple], ddl: str) -> DataFrame:
    """A DataFrame of ``rows`` (schema ``ddl``) with each row its own partition, so each is its
    own task: ``parallelize`` slices a list exactly, where a hash repartition puts some rows
    together in one task and leaves other tasks empty; the scheduler then hands the next row to
    whichever slot frees first. For work units that each take seconds (shards, index groups,
    merge tasks), not for data."""
    rdd = session.sparkContext.parallelize(list(rows), max(1, len(rows)))
    return session.createDataFrame(rdd, ddl)
