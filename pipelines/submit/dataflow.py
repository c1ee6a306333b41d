"""``retrieval submit --runner dataflow``: the default job, its workers' stages on Dataflow.

The default job (``pipelines.job``) runs from the submitting machine with the Beam runner: the
workers' stages (extract, index, merge) become Dataflow jobs through Beam's pipeline options,
built here from the ``[dataflow]`` section of the config file; the driver's stages (learn,
whiten, train: single-machine work) run on the submitting machine against gs://. Workers run
the project's container (``deploy/dataflow/Dockerfile``), which is also the Flex Template image
for launching extraction without a local install.

    [dataflow]
    project = "my-project"
    region = "europe-west4"
    temp_location = "gs://my-bucket/tmp"      # staging_location defaults to <temp>/staging
    sdk_container_image = "europe-west4-docker.pkg.dev/my-project/cbir/cbir:0.1.0"
    machine_type = "n1-standard-8"
    max_workers = 50
    gpu_type = "nvidia-tesla-t4"              # optional; with gpu_count, drivers installed
    gpu_count = 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

PLACEHOLDERS = {
    "project": "<PROJECT>",
    "region": "<REGION>",
    "temp_location": "gs://<BUCKET>/tmp",
    "sdk_container_image": "<REGION>-docker.pkg.dev/<PROJECT>/<REPOSITORY>/cbir:0.1.0",
}


class SubmitError(ValueError):
    """Settings that contradict each other (or a missing value a real submission needs)."""


@dataclass(frozen=True)
class DataflowSettings:
    project: str | None = None
    region: str | None = None
    temp_location: str | None = None
    staging_location: str | None = None
    sdk_container_image: str | None = None
    machine_type: str = "n1-standard-4"
    max_workers: int = 10
    num_workers: int | None = None
    gpu_type: str | None = None
    gpu_count: int = 0
    service_account_email: str | None = None
    subnetwork: str | None = None
    job_name: str = "cbir"

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> DataflowSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise SubmitError(f"[dataflow]: unknown settings {sorted(unknown)}")
        return cls(**section)

    def missing(self) -> list[str]:
        """Settings shown as placeholders: a dry run prints them, a real submission refuses."""
        return [name for name in PLACEHOLDERS if not getattr(self, name)]

    def check(self, uris: dict[str, str | None]) -> None:
        """Refuse settings that cannot work together."""
        problems = []
        for what, uri in uris.items():
            if uri and not uri.startswith("gs://"):
                problems.append(f"--{what} {uri} is not on gs://: Dataflow workers cannot read it")
        for name in ("temp_location", "staging_location"):
            value = getattr(self, name)
            if value and not value.startswith("gs://"):
                problems.append(f"dataflow.{name} must be a gs:// location, not {value!r}")
        if bool(self.gpu_type) != bool(self.gpu_count):
            problems.append("dataflow.gpu_type and dataflow.gpu_count go together (set both)")
        if self.gpu_count < 0:
            problems.append("dataflow.gpu_count cannot be negative")
        if self.num_workers is not None and self.num_workers > self.max_workers:
            problems.append(
                f"dataflow.num_workers ({self.num_workers}) exceeds max_workers "
                f"({self.max_workers})"
            )
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.job_name):
            problems.append(
                f"dataflow.job_name {self.job_name!r}: lowercase letters, digits and '-', "
                "starting with a letter"
            )
        if problems:
            raise SubmitError("; ".join(problems))


def pipeline_args(settings: DataflowSettings, job_name: str) -> list[str]:
    """Beam pipeline options for one Dataflow job (placeholders where a value is missing)."""

    def value(name: str) -> str:
        return getattr(settings, name) or PLACEHOLDERS[name]

    temp = value("temp_location")
    args = [
        "--runner=DataflowRunner",
        f"--project={value('project')}",
        f"--region={value('region')}",
        f"--job_name={job_name}",
        f"--temp_location={temp}",
        f"--staging_location={settings.staging_location or temp.rstrip('/') + '/staging'}",
        f"--machine_type={settings.machine_type}",
        f"--max_num_workers={settings.max_workers}",
        # The workers run the project's own container: its packages and the default weights.
        f"--sdk_container_image={value('sdk_container_image')}",
        "--sdk_location=container",
        "--experiments=use_runner_v2",
    ]
    if settings.num_workers:
        args.append(f"--num_workers={settings.num_workers}")
    if settings.gpu_type:
        args.append(
            "--dataflow_service_options=worker_accelerator="
            f"type:{settings.gpu_type};count:{settings.gpu_count};install-nvidia-driver"
        )
    if settings.service_account_email:
        args.append(f"--service_account_email={settings.service_account_email}")
    if settings.subnetwork:
        args.append(f"--subnetwork={settings.subnetwork}")
    return args
