"""``benchmarks/reindex_scale.py`` at a tiny scale (600 images, 1% changed), in its own process
(it replaces the models in the modules it loads): a re-index writes its changes' worth of
descriptors and local features, not the corpus's, and the JSON says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHARED_PARTS = (
    "extracted descriptors",
    "extracted local features",
    "version descriptors (references)",
)


def test_the_reindex_scale_benchmark_at_a_tiny_scale(tmp_path: Path):
    out = tmp_path / "reindex_scale.json"
    script = REPO / "benchmarks" / "reindex_scale.py"
    argv = ["--images", "600", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    changes = result["changes"]
    assert changes["new"] + changes["changed"] == changes["extracted"] == 5  # 1%: 6 changes
    assert changes["deleted"] == 1 and result["reindex"]["indexed"] == 600 - 1 + 2
    full, again = result["full_build"]["by_part"], result["reindex"]["by_part"]
    # Local features at their real size: the bulk of a full build.
    assert abs(result["local_bytes_per_image"] / result["local_bytes_per_image_target"] - 1) < 0.1
    # Descriptors and local features: what changed is written, the rest is shared.
    shared = sum(full.get(p, 0) for p in SHARED_PARTS)
    assert sum(again.get(p, 0) for p in SHARED_PARTS) <= 0.05 * shared
    assert again["version descriptors (references)"] < 0.05 * full["extracted descriptors"]
    assert result["ratio"] == round(result["reindex"]["bytes"] / result["full_build"]["bytes"], 5)
    assert "benchmarks/results" not in str(out)  # the committed figures stay as measured
