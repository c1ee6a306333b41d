"""Extraction throughput: the Beam pipeline end to end vs a bare loop, same images and threads.

    python benchmarks/extract_throughput.py [--images DIR] [--limit N] [--threads T]

* baseline: one process, TensorFlow with T threads, ``for image: read + decode + describe``.
  Timed from the first image to the last (model build excluded: the strictest baseline).
* beam: ``pipelines.stages.extract`` with the Beam runner (FnApiRunner, T worker processes with
  one TensorFlow thread each: the same T threads), timed end to end: pipeline start-up, worker
  start-up and model loading, reading, decoding, inference, Parquet writing and commits.

Each side runs in a fresh subprocess so neither inherits the other's TensorFlow thread pools.
Writes ``benchmarks/results/extract_throughput.json`` with both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "benchmarks" / "oxford-dev" / "images"


def _image_folder(source: Path, limit: int | None, scratch: Path) -> Path:
    """A folder of links to the first ``limit`` images, so both sides see the same inputs."""
    folder = scratch / "images"
    folder.mkdir()
    for path in sorted(source.iterdir())[:limit]:
        (folder / path.name).symlink_to(path)
    return folder


def run_baseline(images: str, threads: int) -> dict:
    from retrieval.corpus import list_corpus
    from retrieval.descriptors.gem import GeMExtractor, configure_tf_threads
    from retrieval.extraction import LoadedImage, load_image
    from retrieval.images import DecodeLimits

    configure_tf_threads(threads)
    extractor = GeMExtractor()
    refs = list_corpus(images)
    limits = DecodeLimits()
    start = time.perf_counter()
    described = 0
    for ref in refs:
        loaded = load_image(ref, max_side=extractor.config.max_side, limits=limits)
        if isinstance(loaded, LoadedImage):
            extractor.describe(loaded.image)
            described += 1
    seconds = time.perf_counter() - start
    return {"images": described, "seconds": seconds, "images_per_s": described / seconds}


def run_beam(images: str, threads: int, output: str) -> dict:
    start = time.perf_counter()
    from pipelines import stages
    from pipelines.config import RunConfig

    config = RunConfig(runner="beam", workers=threads, threads_per_worker=1)
    summary = stages.extract(images, output, config)
    seconds = time.perf_counter() - start
    return {
        "images": summary["indexed"],
        "seconds": seconds,
        "images_per_s": summary["indexed"] / seconds,
        "workers": threads,
        "threads_per_worker": 1,
    }


def _child(side: str, images: str, threads: int, output: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--images",
        images,
        "--threads",
        str(threads),
        "--output",
        output,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--limit", type=int, default=None, help="use the first N images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "extract_throughput.json")
    )
    parser.add_argument("--child", choices=["baseline", "beam"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "baseline":
        print(json.dumps(run_baseline(args.images, args.threads)))
        return
    if args.child == "beam":
        print(json.dumps(run_beam(args.images, args.threads, args.output)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        images = str(_image_folder(Path(args.images), args.limit, Path(scratch)))
        baseline = _child("baseline", images, args.threads, "")
        print(f"baseline: {baseline['images_per_s']:.2f} images/s", flush=True)
        beam = _child("beam", images, args.threads, str(Path(scratch) / "descriptors"))
        print(f"beam:     {beam['images_per_s']:.2f} images/s", flush=True)
    result = {
        "benchmark": "extract_throughput",
        "images_source": args.images,
        "threads": args.threads,
        "baseline": baseline,
        "beam": beam,
        "ratio": beam["images_per_s"] / baseline["images_per_s"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio beam / baseline: {result['ratio']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
