"""Kill -9 during extraction, index building and merging; the same command resumes and the
result equals an uninterrupted run's, byte for byte (manifest checksums, search results).

The killed process runs the real CLI in a subprocess whose ``storage.write_bytes`` SIGKILLs it
on a chosen file, after writing half of that file in place (a torn write, worse than what the
atomic writes allow), so the resumed run must never trust a file no manifest vouches for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import save_tiny_saved_model

from pipelines import cli

KILLER = """
import os, signal, sys
from retrieval import storage
from pipelines import cli
target, real = os.environ["KILL_AT"], storage.write_bytes
def write(uri, data):
    if uri.endswith(target):
        with open(uri, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(uri, data)
def upload(path, uri):  # large files (id maps, plan references) are uploaded from scratch
    if uri.endswith(target):
        write(uri, open(path, "rb").read())
    real_upload(path, uri)
real_upload = storage.upload
storage.write_bytes = write
storage.upload = upload
sys.exit(cli.main(sys.argv[1:]))
"""


def run_killed(argv: list[str], kill_at: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLER, *argv],
        env={**os.environ, "KILL_AT": kill_at},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr[-2000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        pixels = (rng.random((48, 40 + i, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    model = save_tiny_saved_model(root / "tiny")
    flags = ["--backbone", f"savedmodel:{model}", "--image-size", "64", "--shard-size", "3"]
    return root, images, flags


def stage_args(root: Path, images: Path, flags: list[str], run: str) -> dict[str, list[str]]:
    r = root / run
    local = ["--runner", "local"]
    return {
        "extract": ["extract", "--input", str(images), "--output", str(r / "desc"), *flags, *local],
        "train": ["train", "--descriptors", str(r / "desc"), "--output", str(r / "cb"), *local],
        "index": [
            "index",
            "--descriptors",
            str(r / "desc"),
            "--codebook",
            str(r / "cb"),
            "--output",
            str(r / "shards"),
            *local,
        ],
        "merge": ["merge", "--shards", str(r / "shards"), "--output", str(r / "index")],
        "search": [
            "search",
            "--index",
            str(r / "index"),
            "--queries",
            str(r / "desc"),
            "--output",
            str(r / "search"),
            "--k",
            "5",
        ],
    }


def fingerprint(run: Path) -> dict:
    """Checksums of what the run produced (as its manifests state them) and the search results."""
    out = {}
    for manifest in sorted((run / "desc").glob("part-*.manifest.json")):
        m = json.loads(manifest.read_text())
        out[manifest.name] = {k: f["sha256"] for k, f in m["files"].items()}
    index = json.loads((run / "index" / "index.json").read_text())
    out["index"] = [(p["index"]["sha256"], p["idmap"]["sha256"]) for p in index["pieces"]]
    out["results"] = (run / "search" / "results.parquet").read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    root, images, flags = setup
    for argv in stage_args(root, images, flags, "reference").values():
        assert cli.main(argv) == 0
    return fingerprint(root / "reference")


@pytest.mark.parametrize(
    ("stage", "kill_at"),
    [
        ("extract", "part-00001.errors.parquet"),
        ("index", "group-00000.codes"),
        ("merge", "index/idmap.parquet"),
    ],
)
def test_kill_and_resume(setup, reference, stage, kill_at):
    root, images, flags = setup
    run = f"killed-{stage}"
    args = stage_args(root, images, flags, run)
    order = list(args)
    for name in order[: order.index(stage)]:
        assert cli.main(args[name]) == 0
    run_killed(args[stage], kill_at)
    assert next((root / run).rglob(Path(kill_at).name)).exists()  # the torn file is there...
    if stage == "merge":  # ... and nothing trusts it: no index.json was committed
        assert cli.main(args["search"]) == 2
    for name in order[order.index(stage) :]:
        assert cli.main(args[name]) == 0  # the same commands resume
    summary = json.loads((root / run / "desc" / "summary.json").read_text())
    assert summary["inputs"] == summary["indexed"] + summary["failed"] == 11
    assert fingerprint(root / run) == reference
