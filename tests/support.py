"""Helpers shared by the test modules (imported as ``from support import ...``; pytest puts tests/
on ``sys.path`` because tests/ has no ``__init__.py``): local servers run as subprocesses, and a
tiny SavedModel backbone, and descriptor shards of random vectors."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from retrieval import plan
from retrieval.corpus import ImageRef, ShardSpec
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow

TINY_CHANNELS = 4


# --- local servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(
    endpoint: str, server: subprocess.Popen, name: str, timeout_s: float = 20
) -> None:
    """Return once ``endpoint`` gives any HTTP answer; fail the test if ``server`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (an emulator's root may be a 404) means the server is up
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start")
            time.sleep(0.05)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# --- a tiny SavedModel -------------------------------------------------------------------------


def tiny_kernel(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 3, 3, TINY_CHANNELS)).astype(np.float32)


def save_tiny_saved_model(path: Path, *, feature_map: bool = True, seed: int = 0) -> Path:
    """A SavedModel whose call maps (N, H, W, 3) float32 to a (N, H/2, W/2, 4) feature map.

    The conv kernel is a fixed (seeded) variable, so the weights fingerprint is reproducible.
    With ``feature_map=False`` the model pools to a (N, 4) vector instead, which GeM cannot use.
    """
    import tensorflow as tf

    kernel = tiny_kernel(seed)

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(kernel, name="kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            features = tf.nn.softplus(tf.nn.conv2d(images, self.kernel, 2, "SAME"))
            return features if feature_map else tf.reduce_mean(features, axis=[1, 2])

    tf.saved_model.save(Tiny(), str(path))
    return path


# --- descriptor shards ---------------------------------------------------------------------------

D = 32
MODEL_INFO = {"id": "gem-test", "config_hash": "f" * 16, "weights_sha256": "0" * 64, "dim": D}


def write_descriptors(
    directory: Path,
    shard_sizes: list[int],
    seed: int = 0,
    errors_per_shard: int = 0,
    model_info: dict = MODEL_INFO,
    vectors: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Unit vectors (random, or ``vectors`` in order) as committed descriptor shards; returns
    ids and vectors in order."""
    rng = np.random.default_rng(seed)
    all_ids, blocks, specs = [], [], []
    given = None if vectors is None else np.split(vectors, np.cumsum(shard_sizes)[:-1])
    for s, size in enumerate(shard_sizes):
        ids = [f"s{s:02d}/img{i:03d}" for i in range(size)]
        failed = [f"s{s:02d}/bad{i}" for i in range(errors_per_shard)]
        if given is not None:
            vectors = given[s]
        else:
            vectors = rng.standard_normal((size, D)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        spec = ShardSpec(f"part-{s:05d}", tuple(ImageRef(i, f"/img/{i}.jpg") for i in ids + failed))
        rows = [
            DescriptorRow(i, f"/img/{i}.jpg", "0" * 64, 64, 48, v)
            for i, v in zip(ids, vectors, strict=True)
        ]
        errors = [ErrorRow(i, f"/img/{i}.jpg", "decode", "truncated", "x") for i in failed]
        descriptor_shards.write_shard(str(directory), spec, rows, errors, model_info)
        specs.append(spec)
        all_ids += ids
        blocks.append(vectors)
    # What `retrieval extract` does: the folder's plan names exactly these shards.
    plan.write_extraction_plan(str(directory), specs, source="/img", shard_size=max(shard_sizes))
    return all_ids, np.concatenate(blocks)
