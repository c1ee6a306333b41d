"""Shared fixtures: the benchmark images, a tiny Keras backbone, and the real default backbone
(built at most once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.cli import benchmarks_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS = benchmarks_dir()
OXFORD_IMAGES = BENCHMARKS / "oxford-dev" / "images"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Converted models go to a cache of this test session, never the user's."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["RETRIEVAL_MODEL_CACHE"] = str(path)
    return path


def pytest_collection_modifyitems(config, items):
    """CI sets CBIR_REQUIRE_BENCHMARKS=1: there, missing benchmark data is an error, not a skip."""
    if os.environ.get("CBIR_REQUIRE_BENCHMARKS") and not BENCHMARKS.is_dir():
        raise pytest.UsageError(f"CBIR_REQUIRE_BENCHMARKS is set but {BENCHMARKS} does not exist")


@pytest.fixture(scope="session")
def oxford_images() -> list[Path]:
    """A few real oxford-dev photos (read in place, never copied into the repository)."""
    if not OXFORD_IMAGES.is_dir():
        pytest.skip(f"benchmark images not found at {OXFORD_IMAGES}")
    images = sorted(OXFORD_IMAGES.glob("*.jpg"))
    if len(images) < 6:
        pytest.skip("fewer than 6 oxford-dev images")
    return images


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random 2-layer conv net: 8 positive channels at 1/4 resolution, built in milliseconds."""
    import tensorflow as tf

    from retrieval.backbones import Backbone

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((None, None, 3)),
            tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu"),
            tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="softplus"),
        ]
    )
    return Backbone(
        spec="test:tiny",
        model=lambda x: model(x, training=False),
        preprocess=lambda x: x / 255.0,
        dim=8,
        weights_sha256="0" * 64,
    )


@pytest.fixture(scope="session")
def default_backbone():
    """The real default backbone (EfficientNet-Lite0), built once for the whole session."""
    from retrieval.backbones import DEFAULT_BACKBONE, load_backbone

    return load_backbone(DEFAULT_BACKBONE)


@pytest.fixture(scope="session")
def ukbench_run(tmp_path_factory) -> Path:
    """`retrieval evaluate` on ukbench-56 with Beam in 2 worker processes, shards of 16 (run once:
    the end-to-end tests read it, and the runner parity tests compare Spark and local to it)."""
    from support import require_benchmark

    from pipelines import cli

    folder = require_benchmark("ukbench-56")
    out = tmp_path_factory.mktemp("ukbench-beam")
    argv = ["evaluate", "--benchmark", str(folder), "--out", str(out)]
    assert cli.main([*argv, "--runner", "beam", "--workers", "2", "--shard-size", "16"]) == 0
    return out


@pytest.fixture(scope="session")
def spark():
    """One real SparkSession, local[2], for the whole test session (Java from the machine).

    The Spark stages join the running session instead of starting their own. If Spark cannot
    start, the tests that need it fail: nothing about Spark is mocked or skipped.
    """
    from pipelines.spark.session import SparkSettings, get_session

    try:
        session = get_session(SparkSettings(workers=2))
    except Exception as exc:
        pytest.fail(f"Spark (local[2]) did not start: {exc}")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    """A real Spark standalone cluster on 127.0.0.1, one master and two 1-core workers (JVMs
    started by pyspark's spark-class), for one test module: ``spark_cluster.master`` is the
    ``spark://`` URL. Fails, never skips, if it cannot start; stopped, JVMs and executors by
    process group, after the module (also when a test failed)."""
    from support import spark_standalone_cluster

    with spark_standalone_cluster(tmp_path_factory.mktemp("spark-cluster"), workers=2) as cluster:
        yield cluster
