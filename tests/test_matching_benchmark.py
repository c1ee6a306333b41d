"""benchmarks/matching.py at a tiny scale: it compares the two matchers on real photos and
reports whether they agree pair by pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import require_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "matching.py"


def test_the_matching_benchmark_finds_the_same_matches_as_opencv(tmp_path):
    images = require_benchmark("oxford-dev") / "images"
    out = tmp_path / "matching.json"
    argv = [sys.executable, str(SCRIPT), "--images", str(images), "--limit", "6"]
    argv += ["--pairs", "8", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["pairs"] == 8 and record["images"] == 6
    assert record["pairs_with_the_same_matches"] == 8  # the matcher's claim, on real features
    assert record["ms_per_pair"]["blas"] > 0 and record["ms_per_pair"]["opencv"] > 0
    assert record["features_per_image"] > 100
