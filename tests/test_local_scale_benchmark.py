"""benchmarks/local_scale.py at a tiny scale: the figures it reports are what the stores read."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "local_scale.py"


@pytest.fixture(scope="module")
def local_scale():
    spec = importlib.util.spec_from_file_location("local_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reading_by_image_reads_about_the_shortlists_bytes(local_scale, tmp_path):
    args = argparse.Namespace(
        images=600, queries=4, shard_queries=2, shortlist=12, features=100, dim=128, seed=0,
        workdir=str(tmp_path),
    )  # fmt: skip
    result = local_scale.run(args)
    image, shard = result["image"], result["shard"]
    # Distinct random shortlists of 12 out of 600 rarely overlap: about what they need is read.
    assert 0.8 <= image["read_amplification"] <= 1.05
    assert image["bytes_read_per_query"] < 1.05 * image["shortlist_feature_bytes_per_query"]
    # The whole-shard layout reads a shard of up to 256 images per shortlisted image.
    assert shard["read_amplification"] > 20
    assert shard["queries"] == 2 and image["queries"] == 4
    assert list(tmp_path.iterdir()) == []  # both stores removed after their measurement
