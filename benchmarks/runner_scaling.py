"""Runner scaling: Beam and Spark extraction with 1 and 2 workers against the bare loop.

    python benchmarks/runner_scaling.py [--images DIR] [--limit N] [--workers 1,2]

On the same images, each in a fresh subprocess:

* bare loop with T threads of the default runtime (T = each worker count; the loop of
  extract_throughput.py): read + decode + describe in one process, model build excluded (the
  strictest baseline at the same cores).
* beam with W worker processes of one TensorFlow thread each (``pipelines.stages.extract``):
  timed end to end: pipeline and worker start-up, model loading, reading, decoding, inference,
  Parquet writing and commits.
* spark with local[W] (one TensorFlow thread per task slot): the same stage, timed the same way,
  once the SparkSession is up; the session's start (JVM) is reported on its own, since a
  session serves every stage of a run (and a cluster's is already up).

Ratios: scaling (W=2 over W=1, per runner; target >= 1.8) and each runner over the bare loop at
the same cores (target >= 0.9). Writes ``benchmarks/results/runner_scaling.json``.
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

from extract_throughput import DEFAULT_IMAGES, REPO, _image_folder, run_bare


def run_runner(runner: str, images: str, workers: int, output: str) -> dict:
    from pipelines import stages
    from pipelines.config import RunConfig

    config = RunConfig(runner=runner, workers=workers, threads_per_worker=1, shard_size=32)
    session_s = None
    if runner == "spark":
        start = time.perf_counter()
        stages.spark_session(config)
        session_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = stages.extract(images, output, config)
    seconds = time.perf_counter() - start
    result = {
        "images": summary["indexed"],
        "seconds": seconds,
        "images_per_s": summary["indexed"] / seconds,
        "workers": workers,
        "threads_per_worker": 1,
    }
    if session_s is not None:
        result["session_start_s"] = session_s
    return result


def _child(side: str, images: str, workers: int, output: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--images", images]
    cmd += ["--workers", str(workers), "--output", output]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--limit", type=int, default=160, help="use the first N images")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "runner_scaling.json")
    )
    parser.add_argument("--child", choices=["bare", "beam", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "bare":
        # The same bare loop as extract_throughput.py, with the default runtime and T threads.
        from retrieval.descriptors.gem import GeMConfig

        print(json.dumps(run_bare(args.images, int(args.workers), GeMConfig().runtime)))
        return
    if args.child:
        print(json.dumps(run_runner(args.child, args.images, int(args.workers), args.output)))
        return

    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[str, dict[str, dict]] = {"bare": {}, "beam": {}, "spark": {}}
    with tempfile.TemporaryDirectory() as scratch:
        images = str(_image_folder(Path(args.images), args.limit, Path(scratch)))
        for workers in counts:
            for side in ("bare", "beam", "spark"):
                output = str(Path(scratch) / f"{side}-{workers}")
                result = _child(side, images, workers, output)
                runs[side][str(workers)] = result
                print(f"{side:5} x{workers}: {result['images_per_s']:.2f} images/s", flush=True)
    low, high = str(min(counts)), str(max(counts))
    ratios = {
        f"{side}_scaling_{high}_over_{low}": runs[side][high]["images_per_s"]
        / runs[side][low]["images_per_s"]
        for side in ("bare", "beam", "spark")
    }
    for side in ("beam", "spark"):
        for w in map(str, counts):
            ratios[f"{side}_{w}_over_bare_{w}"] = (
                runs[side][w]["images_per_s"] / runs["bare"][w]["images_per_s"]
            )
    result = {
        "benchmark": "runner_scaling",
        "images_source": args.images,
        "images": args.limit,
        "runs": runs,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {"scaling": 1.8, "runner_over_bare": 0.9},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.3f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
