"""`retrieval submit`: the printed commands are complete and valid, contradictions are refused,
the deploy files are well-formed, and a Spark submission really runs (spark-submit, local[2])."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support import require_benchmark

from pipelines import cli
from pipelines.config import build_config, read_config_file
from pipelines.submit import flex_template
from pipelines.submit.driver import parse_args as parse_job_args
from pipelines.submit.spark import IMAGE_JOB_FILE

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
runner = "spark"
workers = 2
[extract]
image_size = 362
shard_size = 64
[index]
factory = "auto"
[spark_conf]
"spark.sql.execution.arrow.maxRecordsPerBatch" = "512"
[dataflow]
project = "acme-vision"
region = "europe-west4"
temp_location = "gs://acme-cbir/tmp"
sdk_container_image = "europe-west4-docker.pkg.dev/acme-vision/cbir/cbir:0.1.0"
machine_type = "n1-standard-8"
max_workers = 40
gpu_type = "nvidia-tesla-t4"
gpu_count = 1
[spark]
master = "yarn"
deploy_mode = "cluster"
env_archive = "gs://acme-cbir/cbir-env.tar.gz"
executor_memory = "8g"
executor_cores = 4
task_cpus = 2
cluster = "acme-dataproc"
region = "europe-west4"
"""


def _config(tmp_path: Path, text: str = CONFIG, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _submit(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["submit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _commands(out: str) -> list[list[str]]:
    """The commands of a dry run (comment lines dropped, continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", out)
    return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def test_same_config_file_drives_local_runs(tmp_path):
    config = build_config(read_config_file(str(_config(tmp_path))))
    assert (config.runner, config.workers, config.shard_size) == ("spark", 2, 64)
    assert dict(config.spark_conf) == {"spark.sql.execution.arrow.maxRecordsPerBatch": "512"}


def test_dataflow_dry_run_prints_every_stage_with_its_options(tmp_path, capsys):
    """The dry run prints the job's own stages (pipelines.job: what evaluate measures), where
    each runs, what it reads and writes, and the Beam options of the Dataflow jobs."""
    config = _config(tmp_path)
    code, out, _ = _submit(
        capsys,
        *("--runner", "dataflow", "--input", "gs://acme/photos", "--output", "gs://acme/run1"),
        *("--queries", "gs://acme/queries", "--config", str(config), "--dry-run"),
    )
    assert code == 0
    assert "placeholder" not in out
    stages = re.findall(r"^# \d+/\d+ (\w+) \((\w+)\)", out, re.MULTILINE)
    assert stages == [
        ("extract", "workers"),
        ("learn", "driver"),
        ("whiten", "driver"),
        ("train", "driver"),
        ("index", "workers"),
        ("merge", "workers"),
        ("describe", "workers"),
        ("search", "driver"),
    ]
    assert "writes gs://acme/run1/descriptors\n" in out  # local features: on first use
    assert "writes gs://acme/run1/local_features, gs://acme/run1/whitening" in out  # by learn
    assert "reads gs://acme/queries" in out
    assert "gs://acme/run1/bundle.json" in out
    # each stage's settings, from their declarations (pipelines/settings.py)
    assert "#     settings: " in out and "image_size=362" in out and "shard_size=64" in out
    assert "mine_neighbours=10" in out and "shortlist=100" in out
    (options,) = _commands(out)
    for expected in (
        "--runner=DataflowRunner",
        "--project=acme-vision",
        "--region=europe-west4",
        "--temp_location=gs://acme-cbir/tmp",
        "--staging_location=gs://acme-cbir/tmp/staging",
        "--machine_type=n1-standard-8",
        "--max_num_workers=40",
        "--sdk_container_image=europe-west4-docker.pkg.dev/acme-vision/cbir/cbir:0.1.0",
        "--sdk_location=container",
        "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;"
        "install-nvidia-driver",
        "--job_name=cbir",
    ):
        assert expected in options


def test_each_dataflow_job_is_named_for_its_stage():
    from pipelines.config import RunConfig
    from pipelines.runners.beam import BeamRunner

    runner = BeamRunner(RunConfig(beam_args=("--runner=FnApiRunner", "--job_name=cbir")))
    assert runner.options_for("extract").get_all_options()["job_name"] == "cbir-extract"
    assert runner.options_for("merge round 2").get_all_options()["job_name"] == "cbir-merge-round-2"
    unnamed = BeamRunner(RunConfig(beam_args=("--runner=FnApiRunner",)))
    assert unnamed.options_for("extract") is unnamed.options


def test_dataflow_without_config_shows_placeholders_and_refuses_to_run(capsys):
    argv = ("--runner", "dataflow", "--input", "gs://a/photos", "--output", "gs://a/run")
    code, out, _ = _submit(capsys, *argv, "--dry-run")
    assert code == 0
    assert "--project=<PROJECT>" in out and "--temp_location=gs://<BUCKET>/tmp" in out
    assert "set project, region, temp_location, sdk_container_image in the [dataflow]" in out
    code, _, err = _submit(capsys, *argv)
    assert code == 2 and "[dataflow] needs project" in err


@pytest.mark.parametrize(
    ("extra", "input", "message"),
    [
        ("", "/home/me/photos", "is not on gs://"),
        ('gpu_type = "nvidia-tesla-t4"', "gs://a/p", "gpu_type and dataflow.gpu_count"),
        ("num_workers = 20\nmax_workers = 5", "gs://a/p", "exceeds max_workers"),
        ('temp_location = "/tmp/x"', "gs://a/p", "must be a gs:// location"),
        ("job_name = 'My Job'", "gs://a/p", "job_name"),
        ("zone_typo = 1", "gs://a/p", "unknown settings"),
    ],
)
def test_dataflow_refuses_contradictions(tmp_path, capsys, extra, input, message):
    config = _config(tmp_path, f"[dataflow]\n{extra}\n")
    code, _, err = _submit(
        capsys,
        *("--runner", "dataflow", "--input", input, "--output", "gs://a/run"),
        *("--config", str(config), "--dry-run"),
    )
    assert code == 2 and message in err


def test_spark_dry_run_prints_spark_submit_and_dataproc(tmp_path, capsys):
    config = _config(tmp_path)
    code, out, _ = _submit(
        capsys,
        *("--runner", "spark", "--input", "gs://acme/photos", "--output", "gs://acme/run1"),
        *("--queries", "gs://acme/q", "--config", str(config), "--dry-run"),
    )
    assert code == 0
    submit, dataproc = _commands(out)
    assert "# 1/8 extract (workers)" in out  # the job's stages, as evaluate runs them
    assert submit[:7] == [
        "spark-submit",
        "--master",
        "yarn",
        "--deploy-mode",
        "cluster",
        "--name",
        "cbir-index",
    ]
    assert submit[submit.index("--archives") + 1] == "gs://acme-cbir/cbir-env.tar.gz#environment"
    confs = {submit[i + 1] for i, word in enumerate(submit) if word == "--conf"}
    for expected in (
        "spark.executor.memory=8g",
        "spark.executor.cores=4",
        "spark.task.cpus=2",
        "spark.pyspark.python=./environment/bin/python",
        "spark.pyspark.driver.python=./environment/bin/python",
        "spark.sql.execution.arrow.pyspark.enabled=true",
        "spark.sql.execution.arrow.maxRecordsPerBatch=512",  # from [spark_conf]
    ):
        assert expected in confs
    assert submit[submit.index("--files") + 1] == str(config)  # cluster mode: config shipped
    job = submit.index("deploy/spark/job.py")
    args = parse_job_args(submit[job + 1 :])
    assert (args.input, args.output, args.queries, args.k) == (
        "gs://acme/photos",
        "gs://acme/run1",
        "gs://acme/q",
        100,
    )
    assert args.config == "job.toml"  # the shipped copy, in the driver's working folder

    assert dataproc[:6] == [
        "gcloud",
        "dataproc",
        "jobs",
        "submit",
        "pyspark",
        "deploy/spark/job.py",
    ]
    assert "--cluster=acme-dataproc" in dataproc and "--region=europe-west4" in dataproc
    assert "--archives=gs://acme-cbir/cbir-env.tar.gz#environment" in dataproc
    props = next(w for w in dataproc if w.startswith("--properties="))
    assert "spark.task.cpus=2" in props and "spark.executor.memory=8g" in props
    separator = dataproc.index("--")
    assert parse_job_args(dataproc[separator + 1 :]).output == "gs://acme/run1"
    assert "(what runs: [spark] cluster is set)" in out
    assert (REPO / "deploy/spark/job.py").exists()


def test_spark_on_kubernetes_uses_the_image(tmp_path, capsys):
    config = _config(
        tmp_path,
        '[spark]\nmaster = "k8s://https://10.0.0.1:443"\ndeploy_mode = "cluster"\n'
        'container_image = "registry.example/cbir-spark:0.1.0"\n'
        '[spark_conf]\n"spark.kubernetes.namespace" = "vision"\n'
        '"spark.driver.extraJavaOptions" = "-Da=1,b"\n',
    )
    code, out, _ = _submit(
        capsys,
        *("--runner", "spark", "--input", "s3://b/p", "--output", "s3://b/run"),
        *("--config", str(config), "--dry-run"),
    )
    assert code == 0
    submit, dataproc = _commands(out)
    assert "--archives" not in submit
    assert "spark.kubernetes.container.image=registry.example/cbir-spark:0.1.0" in submit
    assert "spark.kubernetes.namespace=vision" in submit
    assert IMAGE_JOB_FILE in submit
    props = next(w for w in dataproc if w.startswith("--properties="))
    assert props.startswith("--properties=^#^")  # a value holds a comma
    assert "set cluster, region, env_archive in the [spark] section" in out


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('master = "yarn"\nexecutor_cores = 2\ntask_cpus = 4', "exceeds executor_cores"),
        ('master = "local[2]"\ndeploy_mode = "cluster"', "no cluster to deploy"),
        ('deploy_mode = "server"', "'client' or 'cluster'"),
        ('master = "yarn"\ncontainer_image = "x"', "for Kubernetes masters"),
    ],
)
def test_spark_refuses_contradictions(tmp_path, capsys, section, message):
    config = _config(tmp_path, f"[spark]\n{section}\n")
    code, _, err = _submit(
        capsys,
        *("--runner", "spark", "--input", "gs://a/p", "--output", "gs://a/r"),
        *("--config", str(config), "--dry-run"),
    )
    assert code == 2 and message in err


def test_flex_template_metadata_matches_its_program():
    metadata = json.loads((REPO / "deploy/dataflow/metadata.json").read_text())
    # Generated from the setting declarations (`python pipelines/submit/flex_template.py
    # --write-metadata`), never edited by hand: a setting added to the template is one place.
    assert metadata == flex_template.metadata()
    assert metadata["name"] and metadata["description"]
    names = [p["name"] for p in metadata["parameters"]]
    assert names == list(flex_template.PARAMETERS)
    assert {"image_size", "local_features", "local_image_size"} <= set(names)
    for parameter in metadata["parameters"]:
        assert {"name", "label", "helpText"} <= set(parameter)
        assert isinstance(parameter.get("isOptional", False), bool)
        for regex in parameter.get("regexes", []):
            re.compile(regex)
        example = re.search(r"Example: (\S+)", parameter["helpText"])
        if example:
            assert all(re.fullmatch(r, example.group(1)) for r in parameter["regexes"])
    required = [p["name"] for p in metadata["parameters"] if not p.get("isOptional")]
    assert required == ["input", "output"]
    args, pipeline_args = flex_template.parse(
        [
            "--input=gs://b/p",
            "--output=gs://b/d",
            "--image_size=512",
            "--scales=0.7,1",
            "--runner=DataflowRunner",
            "--project=p",
        ]
    )
    assert (args.input, args.image_size, args.scales) == ("gs://b/p", 512, [0.7, 1.0])
    assert pipeline_args == ["--runner=DataflowRunner", "--project=p"]
    dockerfile = (REPO / "deploy/dataflow/Dockerfile").read_text()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/cbir/pipelines/submit/flex_template.py" in dockerfile


def test_spark_operator_manifest_runs_the_same_job():
    manifest = yaml.safe_load((REPO / "deploy/spark/spark-application.yaml").read_text())
    assert manifest["kind"] == "SparkApplication"
    spec = manifest["spec"]
    assert spec["type"] == "Python" and spec["mainApplicationFile"] == IMAGE_JOB_FILE
    args = parse_job_args(spec["arguments"])
    assert args.input and args.output
    assert int(spec["sparkConf"]["spark.task.cpus"]) <= spec["executor"]["cores"]


@pytest.mark.parametrize("dockerfile", ["deploy/dataflow/Dockerfile", "deploy/spark/Dockerfile"])
def test_dockerfiles_copy_files_that_exist_and_build(dockerfile):
    text = (REPO / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine on this machine: the image build is not run")
    subprocess.run(
        [docker, "build", "-f", dockerfile, "-t", "cbir-test", "."], cwd=REPO, check=True
    )


def test_spark_submission_runs_the_whole_job(tmp_path, capsys):
    """`retrieval submit --runner spark` for real: spark-submit on local[2] runs
    deploy/spark/job.py, which runs the default job in its Spark driver and leaves a bundle."""
    images = require_benchmark("ukbench-56") / "images"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(images.iterdir())[:8]:
        (corpus / path.name).symlink_to(path)
    config = _config(
        tmp_path,
        '[extract]\nshard_size = 4\n[spark]\nmaster = "local[2]"\n'
        '[spark_conf]\n"spark.driver.memory" = "1g"\n',
    )
    out = tmp_path / "run"
    code, printed, _ = _submit(
        capsys,
        *("--runner", "spark", "--input", str(corpus), "--output", str(out)),
        *("--config", str(config)),
    )
    assert code == 0, printed
    summary = json.loads((out / "descriptors" / "summary.json").read_text())
    assert (summary["inputs"], summary["indexed"], summary["shards"]) == (8, 8, 2)
    assert summary.get("local_features") is None  # the default job: on first use
    merged = json.loads((out / "index" / "summary.json").read_text())
    assert merged["inputs"] == merged["indexed"] == 8
    assert (out / "index" / "index.faissindex").exists()
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["local_features_first_use"] == "local_features"
    assert bundle["local_model"]["id"] == "rootsift-pca56@448x1000"


def test_flex_template_program_runs_the_extraction(tmp_path):
    """The Flex Template's program end to end on the local runner (Dataflow's options replaced
    by ``--runner=FnApiRunner``): the corpus is planned, every shard committed, every input
    accounted for; a second start finds nothing to do."""
    from support import pattern_images, save_tiny_saved_model

    from retrieval.shards import descriptor_shards

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in pattern_images(6).items():
        (corpus / name).write_bytes(data)
    (corpus / "broken.jpg").write_bytes(b"not an image")
    model = save_tiny_saved_model(tmp_path / "tiny")
    argv = [
        f"--input={corpus}",
        f"--output={tmp_path / 'desc'}",
        f"--backbone=savedmodel:{model}",
        "--image_size=64",
        "--shard_size=3",
        "--runner=FnApiRunner",
    ]
    assert flex_template.main(argv) == 0
    manifests = descriptor_shards.list_shards(str(tmp_path / "desc"))
    assert len(manifests) == 3
    assert sum(m["rows"] for m in manifests) == 6
    assert sum(m["errors"] for m in manifests) == 1
    assert flex_template.main(argv) == 0  # every shard committed: no job
