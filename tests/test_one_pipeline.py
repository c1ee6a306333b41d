"""One pipeline: the job users submit (Spark on a real standalone cluster, and the Dataflow job's
Beam form), the nightly re-index and `retrieval evaluate` build the same thing, and a bundle
answers `retrieval search --query-images` as the report says it would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import require_benchmark

from pipelines import cli
from retrieval.evaluation import protocols
from retrieval.evaluation.ground_truth import load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings


def rankings_of(results: Path) -> dict[str, list[str]]:
    """results.parquet as rankings, ids without their extension (the ground truth's ids)."""
    table = pq.read_table(results).to_pylist()
    out: dict[str, list[tuple[int, str]]] = {}
    for row in table:
        out.setdefault(Path(row["query_id"]).stem, []).append((row["rank"], Path(row["id"]).stem))
    return {q: [i for _, i in sorted(rows)] for q, rows in out.items()}


def results_map(results: Path, benchmark_dir: Path) -> float:
    """The mAP of a job's results.parquet scored against the benchmark's gt.json."""
    benchmark = load_benchmark(str(benchmark_dir))
    scored = protocols.apply(benchmark, protocols.DEFAULT)
    return evaluate_rankings(rankings_of(results), scored).as_dict()["mAP"]


def evaluate_default(report_dir: Path) -> dict:
    return json.loads((report_dir / "report.json").read_text())["results"][0]


def test_spark_cluster_submission_answers_like_evaluate(spark_cluster, ukbench_run, tmp_path):
    """`retrieval submit --runner spark` for real, on a standalone master and two workers on
    127.0.0.1: the whole default job and the queries' search, scored against gt.json, give
    `retrieval evaluate`'s default row."""
    folder = require_benchmark("ukbench-56")
    out = tmp_path / "job"
    argv = ["submit", "--runner", "spark", "--master", spark_cluster.master]
    argv += ["--input", str(folder / "images"), "--queries", str(folder / "images")]
    assert cli.main([*argv, "--output", str(out)]) == 0
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["whitening"] == "whitening" and bundle["local_features"] is None
    assert bundle["local_features_first_use"] == "local_features"  # computed where needed
    default = evaluate_default(ukbench_run)
    assert default["name"] == "global+lw+sv+vqe"
    assert results_map(out / "results" / "results.parquet", folder) == pytest.approx(
        default["mAP"], abs=0.1
    )
    results = pq.read_table(out / "results" / "results.parquet")
    assert results.column_names == ["query_id", "rank", "id", "uri", "score", "inliers"]
    # The work ran on the cluster's executors (their logs in the workers' folders), not in a
    # driver of its own, and the application finished.
    apps = [a for a in spark_cluster.state()["completedapps"] if a["name"] == "cbir-index"]
    assert apps, spark_cluster.state()
    tasks = sum(
        log.read_text(errors="replace").count("Finished task")
        for work_dir in spark_cluster.work_dirs
        for log in work_dir.glob(f"{apps[-1]['id']}/*/stderr")
    )
    # The corpus's shard and the queries' shard were extracted there (a single index group
    # and merge task run in the driver: starting a task for one costs more than it saves).
    assert tasks >= 2


def test_beam_form_of_the_dataflow_job_answers_like_evaluate(ukbench_run, tmp_path):
    """The Dataflow job's stages, with Beam's local runner: the same bundle and answers."""
    from pipelines.config import RunConfig
    from pipelines.submit.driver import run_job

    folder = require_benchmark("ukbench-56")
    out = tmp_path / "job"
    config = RunConfig(runner="beam", workers=2, shard_size=16)
    images = str(folder / "images")
    run_job(images, str(out), config, queries=images)
    default = evaluate_default(ukbench_run)
    assert results_map(out / "results" / "results.parquet", folder) == pytest.approx(
        default["mAP"], abs=0.1
    )


def test_search_a_bundle_with_query_images(ukbench_run, tmp_path):
    """`retrieval search --index BUNDLE --query-images URI` with no other flag answers with
    the bundle's default pipeline: evaluate's default row."""
    folder = require_benchmark("ukbench-56")
    out = tmp_path / "search"
    argv = ["search", "--index", str(ukbench_run), "--query-images", str(folder / "images")]
    assert cli.main([*argv, "--output", str(out), "--runner", "local"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rerank"] is not None and summary["whitening"] is not None
    default = evaluate_default(ukbench_run)
    assert results_map(out / "results.parquet", folder) == pytest.approx(default["mAP"], abs=0.1)
    # A setting given on the command line overrides the bundle's default.
    plain = tmp_path / "plain"
    argv = ["search", "--index", str(ukbench_run), "--queries", str(out / "query_descriptors")]
    assert cli.main([*argv, "--output", str(plain), "--shortlist", "0"]) == 0
    assert json.loads((plain / "summary.json").read_text())["rerank"] is None


def _group_benchmark(folder: Path, images: dict[str, Path]) -> Path:
    """A benchmark folder over ``images`` (name -> UKBench file): an image's positives are the
    other images showing the same object (UKBench numbers its objects' views in fours)."""
    (folder / "images").mkdir(parents=True)
    groups: dict[int, list[str]] = {}
    for name, source in images.items():
        shutil.copyfile(source, folder / "images" / f"{name}.jpg")
        groups.setdefault(int(source.stem[-5:]) // 4, []).append(name)
    queries = [
        {
            "id": name,
            "landmark": f"object{group}",
            "positives": [other for other in members if other != name],
            "junk": [],
        }
        for group, members in groups.items()
        for name in members
    ]
    gt = {"source": "ukbench subset", "protocol": "ukbench", "images": sorted(images)}
    (folder / "gt.json").write_text(json.dumps({**gt, "queries": queries}))
    return folder


def test_reindex_keeps_the_whole_default(tmp_path):
    """40 images, then 10 added, 3 changed, 5 deleted: exactly the 13 new and changed images
    get global descriptors (local features on first use, by the version's mining and
    searches), and the new version answers `search --query-images` within 0.5 mAP of a full
    rebuild of the same images."""
    from pipelines.config import RunConfig
    from pipelines.reindex import reindex

    source = sorted((require_benchmark("ukbench-56") / "images").iterdir())
    config = RunConfig(runner="local", shard_size=16)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in source[:40]:
        shutil.copyfile(path, corpus / path.name)
    root = tmp_path / "root"
    first = reindex(str(corpus), str(root), config)
    assert first["new"] == 40

    for path in source[40:50]:  # 10 new
        shutil.copyfile(path, corpus / path.name)
    content = {p.name: p for p in source[:50]}
    for name, replacement in zip(
        [p.name for p in source[0:3]], source[50:53], strict=True
    ):  # 3 changed: another object's photo under the same name
        shutil.copyfile(replacement, corpus / name)
        content[name] = replacement
    for path in source[36:40] + source[4:5]:  # 5 deleted
        (corpus / path.name).unlink()
        del content[path.name]
    second = reindex(str(corpus), str(root), config)
    counts = {k: second[k] for k in ("new", "changed", "deleted", "unchanged", "failed")}
    assert counts == {"new": 10, "changed": 3, "deleted": 5, "unchanged": 32, "failed": 0}
    batch = json.loads((root / "data" / "v000002" / "descriptors" / "summary.json").read_text())
    assert batch["inputs"] == 13 and batch.get("local_features") is None
    version = json.loads((root / "versions" / "v000002" / "bundle.json").read_text())
    # Its own first-use layers go to its batch; it reads v1's less the 3 changed, 5 deleted.
    assert version["local_features_first_use"] == str(root / "data" / "v000002" / "local_features")
    from pipelines.job import Bundle

    inherited = Bundle.read(str(root / "versions" / "v000002")).first_use.inherited
    assert inherited and set().union(*(i.excluded for i in inherited)) == {
        p.name for p in source[0:5] + source[36:40] if p != source[3]
    }

    benchmark = _group_benchmark(
        tmp_path / "bench", {Path(name).stem: path for name, path in content.items()}
    )
    rebuilt = tmp_path / "rebuilt"
    assert reindex(str(corpus), str(rebuilt), config)["new"] == 45
    scores = {}
    for name, index in (("reindexed", root), ("rebuilt", rebuilt)):
        out = tmp_path / f"search-{name}"
        argv = ["search", "--index", str(index), "--query-images", str(corpus), "--k", "45"]
        assert cli.main([*argv, "--output", str(out), "--runner", "local"]) == 0
        scores[name] = results_map(out / "results.parquet", benchmark)
    assert scores["reindexed"] == pytest.approx(scores["rebuilt"], abs=0.5)
    assert scores["rebuilt"] > 80  # a real ranking, not two equally broken ones


@pytest.fixture(scope="module")
def oxford_default(tmp_path_factory) -> tuple[Path, float]:
    """`retrieval evaluate --default-only` on oxford-dev: its folder and default row's mAP."""
    folder = require_benchmark("oxford-dev")
    out = tmp_path_factory.mktemp("oxford-evaluate")
    argv = ["evaluate", "--benchmark", str(folder), "--out", str(out), "--default-only"]
    assert cli.main([*argv, "--runner", "local"]) == 0
    default = evaluate_default(out)
    assert default["name"] == "global+lw+sv+vqe" and default["mAP"] >= 65.5
    return folder, default["mAP"]


@pytest.mark.slow
def test_oxford_dev_submission_answers_like_evaluate(spark_cluster, oxford_default, tmp_path):
    folder, expected = oxford_default
    out = tmp_path / "job"
    images = str(folder / "images")
    argv = ["submit", "--runner", "spark", "--master", spark_cluster.master, "--k", "502"]
    assert cli.main([*argv, "--input", images, "--queries", images, "--output", str(out)]) == 0
    got = results_map(out / "results" / "results.parquet", folder)
    assert got == pytest.approx(expected, abs=0.1)


@pytest.mark.slow
def test_oxford_dev_reindexed_version_answers_like_evaluate(oxford_default, tmp_path):
    """A version built by the nightly `reindex` (here its first) answers `search --index ROOT
    --query-images` within 0.5 of evaluate's default row."""
    from pipelines.config import RunConfig
    from pipelines.reindex import reindex

    folder, expected = oxford_default
    root = tmp_path / "root"
    reindex(str(folder / "images"), str(root), RunConfig(runner="local"))
    out = tmp_path / "search"
    argv = ["search", "--index", str(root), "--query-images", str(folder / "images")]
    assert cli.main([*argv, "--k", "502", "--output", str(out), "--runner", "local"]) == 0
    assert results_map(out / "results.parquet", folder) == pytest.approx(expected, abs=0.5)


@pytest.mark.slow
def test_oxford_dev_beam_form_answers_like_evaluate(oxford_default, tmp_path):
    from pipelines.config import RunConfig
    from pipelines.submit.driver import run_job

    folder, expected = oxford_default
    images = str(folder / "images")
    out = tmp_path / "job"
    run_job(images, str(out), RunConfig(runner="beam", workers=2), queries=images, k=502)
    got = results_map(out / "results" / "results.parquet", folder)
    assert got == pytest.approx(expected, abs=0.1)


def test_a_rerun_of_the_job_keeps_what_it_committed(ukbench_run, tmp_path):
    """Every stage is idempotent: run again over its own output, the job extracts nothing,
    keeps its whitening (learned from the same inputs), its whitened shards and its codebook,
    and leaves the same bundle."""
    from pipelines import job
    from pipelines.config import RunConfig

    out = tmp_path / "again"
    shutil.copytree(ukbench_run, out)
    kept = ["whitening/whitening.json", "whitened_descriptors/part-00000.manifest.json"]
    kept += ["codebook/codebook.json"]
    before = {name: (out / name).stat().st_mtime_ns for name in kept if (out / name).exists()}
    assert len(before) == len(kept), sorted(p.name for p in out.iterdir())
    record = job.run_index_job(str(out / "images.csv"), str(out), RunConfig(shard_size=16))
    assert record["summaries"]["extract"]["shards_skipped"] == 4
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == before
    assert record["whitening"] == "whitening" and record["learning"]["sha256"]


@pytest.mark.parametrize("runner", ["beam", "spark"])
def test_reranked_search_on_workers_equals_the_local_runner(ukbench_run, tmp_path, runner, request):
    """Search with spatial verification and verified QE, each of the 4 query shards answered on
    a worker (reading only its shortlists' local features): the same rankings, inliers and
    scores as the in-process runner."""
    import numpy as np

    from pipelines.config import RunConfig
    from pipelines.job import Bundle, search_bundle

    if runner == "spark":
        request.getfixturevalue("spark")  # join the session's local[2] cluster
    bundle = Bundle.read(str(ukbench_run))
    queries = str(ukbench_run / "descriptors")
    local = search_bundle(bundle, queries, str(tmp_path / "local"), bundle.config(RunConfig()))
    config = bundle.config(RunConfig(runner=runner, workers=2))
    spread = search_bundle(bundle, queries, str(tmp_path / runner), config)
    assert local["rerank_stats"]["pairs_verified"] > 0
    assert spread["rerank_stats"] == {**local["rerank_stats"], **timing_keys(spread)}
    parts = sorted(p.name for p in (tmp_path / runner / "parts").glob("*.manifest.json"))
    assert len(parts) == 4  # one results part per query shard
    expected = pq.read_table(tmp_path / "local" / "results.parquet")
    found = pq.read_table(tmp_path / runner / "results.parquet")
    for column in ("query_id", "rank", "id", "uri", "inliers"):
        assert found.column(column).to_pylist() == expected.column(column).to_pylist(), column
    np.testing.assert_allclose(found.column("score"), expected.column("score"), atol=1e-6)

    # A re-run answers nothing again: every part is committed for the same queries and bundle.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / runner / "parts").iterdir()}
    search_bundle(bundle, queries, str(tmp_path / runner), config)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / runner / "parts").iterdir()} == before


def timing_keys(summary: dict) -> dict:
    """The re-ranking statistics that are times (they differ from run to run)."""
    stats = summary["rerank_stats"]
    return {k: stats[k] for k in ("verify_ms_per_pair", "rerank_ms_per_query")}


def test_a_bundle_describes_queries_with_the_local_features_it_was_built_with():
    """A bundle records what "auto" chose, so queries are described like its corpus whatever
    the default becomes; one made before projections existed (no local_pca_dim in its
    settings) was unprojected, whatever today's default is."""
    from dataclasses import replace

    from pipelines.config import RunConfig, bundle_settings
    from pipelines.job import Bundle
    from retrieval.local_features.features import LocalFeatureConfig

    config = RunConfig()
    made = LocalFeatureConfig()
    record = {"settings": bundle_settings(config), "local_model": {"config": made.as_dict()}}
    assert record["settings"]["local_pca_dim"] == 56
    assert record["settings"]["local_dtype"] == "int8"
    assert Bundle("b", record).config().local.as_dict() == made.as_dict()

    before = LocalFeatureConfig(image_size=640, pca_dim=0, dtype="float16")
    settings = bundle_settings(replace(config, local=before))
    del settings["local_pca_dim"]  # what bundles wrote before the setting existed
    old = {"settings": settings, "local_model": {"config": before.as_dict()}}
    described = Bundle("b", old).config().local
    assert (described.projection_dim, described.stored_dtype) == (0, "float16")
    assert described.config_hash() == before.config_hash()
