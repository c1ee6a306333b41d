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
