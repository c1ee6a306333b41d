"""Every runner's worker builds its model with ``retrieval.extraction.worker_extractor``: the
runtime gets the worker plan's threads, and a converted runtime never imports TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from retrieval.descriptors.gem import GeMConfig, prepare_runtime

PROBE = """
import json, sys
from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import worker_extractor
from retrieval.runtimes.device import plan_worker

extractor = worker_extractor(GeMConfig(), plan_worker("cpu", cores=4, workers=2))
print(json.dumps({"threads": extractor.runner.threads, "tf": "tensorflow" in sys.modules}))
"""


def test_a_worker_model_gets_its_share_of_the_cores_without_tensorflow(model_cache):
    prepare_runtime(GeMConfig())  # the launcher's conversion: workers find a warm cache
    env = {**os.environ, "RETRIEVAL_MODEL_CACHE": str(model_cache)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe == {"threads": 2, "tf": False}  # 4 cores / 2 workers; LiteRT needs no TF


def test_sparks_partition_function_commits_shards_with_the_worker_plans_model(
    oxford_images, tmp_path
):
    """The function Spark runs on each partition (called here directly, as a Python worker
    would): each shard in is extracted and committed, its number out, with one model per worker
    built from the worker plan (its threads) and kept for the next shard."""
    import pyarrow as pa

    from pipelines.runners import spark as spark_runner
    from pipelines.stages import ExtractShards
    from retrieval import plan
    from retrieval.corpus import ImageRef, ShardSpec
    from retrieval.extraction import ShardJob
    from retrieval.images import DecodeLimits
    from retrieval.runtimes.device import plan_worker
    from retrieval.shards import descriptor_shards

    worker = plan_worker("cpu", cores=6, workers=2)
    refs = [ImageRef(p.stem, str(p)) for p in oxford_images[:3]]
    missing = ImageRef("gone", str(tmp_path / "gone.jpg"))
    specs = [ShardSpec("part-00000", tuple(refs[:2])), ShardSpec("part-00001", (refs[2], missing))]
    output = str(tmp_path / "desc")
    plan.write_extraction_plan(output, specs, source=str(tmp_path), shard_size=2)
    spark_runner._states.clear()
    from retrieval.descriptors.gem import model_info as gem_model_info

    job = ShardJob(output, GeMConfig(), gem_model_info(GeMConfig()), DecodeLimits(), worker)
    numbers = pa.RecordBatch.from_pydict({"item": [0, 1]})
    out = spark_runner.run_partition(
        iter([numbers]), task=ExtractShards(job), items=["part-00000", "part-00001"]
    )
    assert pa.Table.from_batches(list(out)).to_pylist() == [{"item": 0}, {"item": 1}]
    manifests = descriptor_shards.list_shards(output)
    assert [(m["shard"], m["rows"], m["errors"]) for m in manifests] == [
        ("part-00000", 2, 0),
        ("part-00001", 1, 1),
    ]
    assert len(spark_runner._states) == 1  # one model for both shards
    model, _ = next(iter(spark_runner._states.values()))
    assert model.runner.threads == worker.inference_threads == 3
