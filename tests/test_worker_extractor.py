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


def test_sparks_partition_function_builds_its_model_from_the_worker_plan(oxford_images):
    """The function Spark runs on each partition (called here directly, as a Python worker
    would): its model has the plan's threads, and it decodes ahead on the plan's threads."""
    import pyarrow as pa

    from pipelines.spark import extract as spark_extract
    from retrieval.images import DecodeLimits
    from retrieval.runtimes.device import plan_worker

    worker = plan_worker("cpu", cores=6, workers=2)
    refs = pa.RecordBatch.from_pydict(
        {
            "shard": ["part-00000"] * 3,
            "id": ["a", "b", "c"],
            "uri": [str(p) for p in oxford_images[:3]],
            "problem": [None] * 3,
        },
        schema=spark_extract.REFS_SCHEMA,
    )
    out = list(
        spark_extract.describe_partition(
            iter([refs]), config=GeMConfig(), limits=DecodeLimits(), worker=worker
        )
    )
    table = pa.Table.from_batches(out)
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("error_kind").null_count == 3
    model = spark_extract._EXTRACTORS[(GeMConfig(), worker)]
    assert model.runner.threads == worker.inference_threads == 3
