"""`make demo` away from this project's machines: no ../shared/benchmarks (CBIR_BENCHMARKS
points at an empty folder). It fetches the fallback benchmark when it can, and otherwise
exits with one line saying what to do, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from official_layouts import ServedFiles, http_server, jpeg_bytes, tar_bytes
from support import free_port

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_demo_without_data_or_network_prints_one_line(tmp_path):
    env = {
        **os.environ,
        "CBIR_BENCHMARKS": str(tmp_path / "absent"),
        "CBIR_DEMO_DATA": str(tmp_path / "data"),
        # nothing listens there: the download fails at once, as on a machine offline
        "CBIR_DATASETS_MIRROR": f"http://127.0.0.1:{free_port()}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("retrieval: error: no benchmark at ")
    assert "retrieval datasets fetch holidays --to" in last


def test_demo_fetches_the_fallback_benchmark(tmp_path, monkeypatch):
    # Holidays in its official layout, 8 groups of 3 (enough vectors for the PQ variant)
    members = {
        f"jpg/10{g:02d}{i:02d}.jpg": jpeg_bytes(40 * g + i, (96, 72))
        for g in range(8)
        for i in range(3)
    }
    files = {
        "jpg1.tar.gz": tar_bytes(dict(list(members.items())[:12])),
        "jpg2.tar.gz": tar_bytes(dict(list(members.items())[12:])),
    }
    monkeypatch.setenv("CBIR_BENCHMARKS", str(tmp_path / "absent"))
    monkeypatch.setenv("CBIR_DEMO_DATA", str(tmp_path / "data"))
    with http_server(ServedFiles(files)) as url:
        monkeypatch.setenv("CBIR_DATASETS_MIRROR", url)
        out = tmp_path / "report"
        assert main(["demo", "--out", str(out), "--runner", "local", "--image-size", "96"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == "holidays"
    assert report["images"] == 24 and report["queries"] == 8
    assert report["accounting"] == {"inputs": 24, "indexed": 24, "failed": 0}
