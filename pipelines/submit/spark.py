"""``retrieval submit --runner spark``: the indexing job as one Spark application.

The application's driver is ``deploy/spark/job.py`` (``pipelines.submit.driver.main``): it runs
the default job (``pipelines.job``) with the Spark runner inside the session that
``spark-submit`` (or Dataproc) started, so the workers' stages (extraction, index building,
merging) run on the executors and learn / whiten / train in the driver. The project reaches the
executors one of two ways:

* a packed environment (``deploy/spark/pack_env.sh``: the project's wheel and its pinned
  dependencies in a venv, packed with venv-pack), shipped with ``--archives ENV#environment`` and
  used through ``spark.pyspark.python=./environment/bin/python`` (YARN, standalone, Dataproc);
* a container image (``deploy/spark/Dockerfile``) for Spark on Kubernetes.

The ``[spark]`` section of the config file says how to submit; ``[spark_conf]`` holds Spark
settings that apply to local and cluster runs alike::

    [spark]
    master = "yarn"                     # spark://host:7077, k8s://https://host:443, yarn
    deploy_mode = "cluster"
    env_archive = "gs://my-bucket/cbir/cbir-env.tar.gz"
    executor_memory = "8g"
    executor_cores = 4
    task_cpus = 2                       # cores per task = TensorFlow threads per model
    cluster = "my-dataproc-cluster"     # Dataproc: run through `gcloud dataproc jobs submit`
    region = "europe-west4"
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.submit.dataflow import SubmitError

REPO = Path(__file__).resolve().parents[2]
JOB_FILE = "deploy/spark/job.py"
IMAGE_JOB_FILE = "local:///opt/cbir/deploy/spark/job.py"  # inside deploy/spark/Dockerfile's image
ENV_PYTHON = "./environment/bin/python"
PLACEHOLDERS = {
    "master": "<MASTER-URL>",
    "env_archive": "<ENV-ARCHIVE>.tar.gz",
    "container_image": "<REGISTRY>/cbir-spark:0.1.0",
    "cluster": "<DATAPROC-CLUSTER>",
    "region": "<REGION>",
}


@dataclass(frozen=True)
class SparkSubmitSettings:
    master: str | None = None
    deploy_mode: str = "client"
    env_archive: str | None = None  # venv-pack archive with the project (not on Kubernetes)
    container_image: str | None = None  # Kubernetes: the image holding the project
    # None: the cluster manager's own default (a standalone worker gives an executor all its
    # cores and 1g; YARN 1 core). A value no worker can offer leaves the job waiting forever.
    executor_memory: str | None = None
    executor_cores: int | None = None
    task_cpus: int = 1
    num_executors: int | None = None
    driver_memory: str | None = None
    cluster: str | None = None  # Dataproc cluster name
    region: str | None = None  # Dataproc region
    project: str | None = None  # Dataproc project (default: gcloud's)
    job_file: str | None = None  # the driver program (default: deploy/spark/job.py)
    name: str = "cbir-index"

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> SparkSubmitSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise SubmitError(f"[spark]: unknown settings {sorted(unknown)}")
        return cls(**section)

    @property
    def on_this_machine(self) -> bool:
        """A local master, or a standalone master on this machine's loopback: its workers run
        this machine's Python (which has the project), so nothing is shipped."""
        master = self.master or ""
        return master.startswith("local") or master.startswith(
            ("spark://127.0.0.1:", "spark://localhost:")
        )

    @property
    def on_kubernetes(self) -> bool:
        return bool(self.master and self.master.startswith("k8s://"))

    def check(self) -> None:
        """Refuse settings that cannot work together."""
        problems = []
        if self.deploy_mode not in ("client", "cluster"):
            problems.append(f"spark.deploy_mode is 'client' or 'cluster', not {self.deploy_mode!r}")
        if self.master and self.master.startswith("local") and self.deploy_mode == "cluster":
            problems.append("a local master has no cluster to deploy the driver to")
        if self.executor_cores is not None and self.task_cpus > self.executor_cores:
            problems.append(
                f"spark.task_cpus ({self.task_cpus}) exceeds executor_cores "
                f"({self.executor_cores}): no task could ever be scheduled"
            )
        if self.container_image and self.master and not self.on_kubernetes:
            problems.append("spark.container_image is for Kubernetes masters (k8s://...)")
        if problems:
            raise SubmitError("; ".join(problems))

    def missing(self, *, dataproc: bool) -> list[str]:
        """Settings shown as placeholders in the command that will run."""
        needed = ["cluster", "region", "env_archive"] if dataproc else ["master"]
        if not dataproc:
            needed.append("container_image" if self.on_kubernetes else "env_archive")
        if not dataproc and self.on_this_machine:
            needed = []  # this machine's Python has the project: nothing to ship
        return [name for name in needed if not getattr(self, name)]

    def value(self, name: str) -> str:
        return getattr(self, name) or PLACEHOLDERS[name]


def spark_properties(
    settings: SparkSubmitSettings, spark_conf: dict[str, str], *, dataproc: bool = False
) -> dict[str, str]:
    """Spark settings of the application: the project's, then ``[spark_conf]`` (which wins)."""
    sizes = {
        "spark.executor.memory": settings.executor_memory,
        "spark.executor.cores": settings.executor_cores,
        "spark.driver.memory": settings.driver_memory,
    }
    props = {
        **{key: str(value) for key, value in sizes.items() if value is not None},
        "spark.task.cpus": str(settings.task_cpus),
        # Arrow carries image references and descriptors between the JVM and Python workers.
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",  # one model per Python worker, kept across tasks
        "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if settings.num_executors:
        props["spark.executor.instances"] = str(settings.num_executors)
    local = settings.on_this_machine and not dataproc
    if local:  # this machine: its interpreter has the project; nothing to bind but loopback
        props["spark.pyspark.python"] = sys.executable
        props["spark.pyspark.driver.python"] = sys.executable
        props["spark.driver.host"] = "127.0.0.1"
        props["spark.ui.enabled"] = "false"
    elif settings.on_kubernetes and not dataproc:
        props["spark.kubernetes.container.image"] = settings.value("container_image")
        props["spark.pyspark.python"] = "python3"
    elif not local:
        props["spark.pyspark.python"] = ENV_PYTHON
        if settings.deploy_mode == "cluster" or dataproc:
            props["spark.pyspark.driver.python"] = ENV_PYTHON
    props.update(spark_conf)
    return props


def _job_args(
    input: str, output: str, queries: str | None, config: str | None, k: int, *, shipped: bool
) -> list[str]:
    args = ["--input", input, "--output", output]
    if queries:
        args += ["--queries", queries, "--k", str(k)]
    if config:  # shipped configs land in the driver's working folder under their own name
        args += ["--config", Path(config).name if shipped else config]
    return args


def spark_submit_command(
    settings: SparkSubmitSettings,
    spark_conf: dict[str, str],
    input: str,
    output: str,
    *,
    queries: str | None = None,
    config: str | None = None,
    k: int = 100,
) -> list[str]:
    """The ``spark-submit`` command of the whole job (placeholders where a value is missing)."""
    settings.check()
    local = settings.on_this_machine
    command = [
        "spark-submit",
        "--master",
        settings.value("master"),
        "--deploy-mode",
        settings.deploy_mode,
        "--name",
        settings.name,
    ]
    if not settings.on_kubernetes and not local:
        command += ["--archives", f"{settings.value('env_archive')}#environment"]
    for key, value in spark_properties(settings, spark_conf).items():
        command += ["--conf", f"{key}={value}"]
    shipped = bool(config) and settings.deploy_mode == "cluster"
    if shipped:
        command += ["--files", str(config)]
    job_file = settings.job_file or (
        IMAGE_JOB_FILE if settings.on_kubernetes else str(REPO / JOB_FILE) if local else JOB_FILE
    )
    return [*command, job_file, *_job_args(input, output, queries, config, k, shipped=shipped)]


def dataproc_command(
    settings: SparkSubmitSettings,
    spark_conf: dict[str, str],
    input: str,
    output: str,
    *,
    queries: str | None = None,
    config: str | None = None,
    k: int = 100,
) -> list[str]:
    """The ``gcloud dataproc jobs submit pyspark`` command of the whole job."""
    settings.check()
    props = spark_properties(settings, spark_conf, dataproc=True)
    # gcloud splits --properties on commas unless another delimiter is declared (^#^).
    joined = ",".join(f"{k}={v}" for k, v in props.items())
    if any("," in v for v in props.values()):
        joined = "^#^" + "#".join(f"{k}={v}" for k, v in props.items())
    command = [
        "gcloud",
        "dataproc",
        "jobs",
        "submit",
        "pyspark",
        settings.job_file or JOB_FILE,
        f"--cluster={settings.value('cluster')}",
        f"--region={settings.value('region')}",
    ]
    if settings.project:
        command.append(f"--project={settings.project}")
    command += [f"--archives={settings.value('env_archive')}#environment", f"--properties={joined}"]
    if config:
        command.append(f"--files={config}")
    return [*command, "--", *_job_args(input, output, queries, config, k, shipped=bool(config))]


def format_command(command: list[str]) -> str:
    """A shell command, one option (with its value) per line, ready to paste."""
    lines = [[shlex.quote(command[0])]]
    for word in command[1:]:
        last = lines[-1]
        if word.startswith("-") or (len(last) >= 2 and last[0].startswith("-")):
            lines.append([])
        lines[-1].append(shlex.quote(word))
    return " \\\n    ".join(" ".join(line) for line in lines)
