"""Runner scaling: Beam and Spark extraction with 1 and 2 workers against the bare loop.

    python benchmarks/runner_scaling.py [--images DIR] [--limit N] [--copies C] [--workers 1,2]
                                        [--cores free,pinned]

Two image sets, each side on the same images in a fresh subprocess:

* ``small``: the first ``--limit`` (160) images of oxford-dev: start-up costs dominate.
* ``steady``: every oxford-dev image listed ``--copies`` times (4: 2,008 images) under distinct
  ids, through a manifest: long enough for per-job costs to fade (the steady state). ``--copies
  0`` skips it.

Sides, for each worker count W:

* bare loop with W threads of the default runtime (the loop of extract_throughput.py): read +
  decode + describe in one process, model build excluded (the strictest baseline).
* beam with W worker processes of one runtime thread each (``pipelines.stages.extract``), timed
  end to end: pipeline and worker start-up, model loading, reading, decoding, inference, Parquet
  writing and commits.
* spark with local[W] (one runtime thread per task slot): the same stage, timed the same way,
  once the SparkSession is up; the session's start (JVM) is reported on its own
  (``session_start_s``, and ``images_per_s_with_session``), since a session serves every stage of
  a run (and a cluster's is already up).

Cores: ``free`` runs each side on the whole machine (a runner's decode threads and its own
process may use the idle second core while W=1); ``pinned`` confines each side's process tree
(JVM and Python workers included) to W cores (``sched_setaffinity``), which is what "the same
cores" means for the targets. ``marginal_images_per_s`` = (steady images - small images) /
(steady seconds - small seconds): the per-image rate with every fixed cost taken out.

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

SIDES = ("bare", "beam", "spark")


def run_runner(runner: str, images: str, workers: int, output: str, shard_size: int) -> dict:
    from pipelines import stages
    from pipelines.config import RunConfig
    from pipelines.runners.spark import session_for

    config = RunConfig(runner=runner, workers=workers, threads_per_worker=1, shard_size=shard_size)
    session_s = None
    if runner == "spark":
        start = time.perf_counter()
        session_for(config)
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
        result["images_per_s_with_session"] = summary["indexed"] / (seconds + session_s)
    return result


def _steady_manifest(source: Path, copies: int, scratch: Path) -> Path:
    """A manifest listing every image of ``source`` ``copies`` times under distinct ids."""
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    lines = ["id,uri"]
    for copy in range(copies):
        lines += [f"copy{copy}/{p.stem},file://{p.resolve()}" for p in images]
    manifest = scratch / "steady.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _child(
    side: str, images: str, workers: int, output: str, pinned: bool, shard_size: int
) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--images", images]
    cmd += ["--workers", str(workers), "--output", output, "--shard-size", str(shard_size)]
    if pinned:
        cmd += ["--pin-cores", str(workers)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cores"] = "pinned" if pinned else "free"
    return result


def _ratios(runs: dict[str, dict[str, dict]], counts: list[int], key: str) -> dict[str, float]:
    low, high = str(min(counts)), str(max(counts))
    ratios = {}
    for side in SIDES:
        if runs[side].get(high, {}).get(key) and runs[side].get(low, {}).get(key):
            ratios[f"{side}_scaling_{high}_over_{low}"] = (
                runs[side][high][key] / runs[side][low][key]
            )
    for side in ("beam", "spark"):
        for w in map(str, counts):
            bare = runs["bare"].get(w, {}).get(key)
            if bare and runs[side].get(w, {}).get(key):
                ratios[f"{side}_{w}_over_bare_{w}"] = runs[side][w][key] / bare
    return {k: round(v, 3) for k, v in ratios.items()}


def _marginal(small: dict, steady: dict) -> float | None:
    images = steady["images"] - small["images"]
    seconds = steady["seconds"] - small["seconds"]
    return images / seconds if images > 0 and seconds > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--limit", type=int, default=160, help="small set: the first N images")
    parser.add_argument(
        "--copies", type=int, default=4, help="steady set: every image C times (0: skip it)"
    )
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=32,
        help="images per shard, the runners' unit of work (default 32: the small set makes "
        "5 shards, so 2 workers have work; a shard is also a task with its own overhead)",
    )
    parser.add_argument(
        "--cores", default="free,pinned", help="free, pinned or both (comma-separated)"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "runner_scaling.json")
    )
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--pin-cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.pin_cores:  # before anything starts a thread: children inherit the mask
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.pin_cores]))
        if args.child == "bare":
            # The same bare loop as extract_throughput.py, with the default runtime, T threads.
            from retrieval.descriptors.gem import GeMConfig

            result = run_bare(args.images, int(args.workers), GeMConfig().runtime)
        else:
            result = run_runner(
                args.child, args.images, int(args.workers), args.output, args.shard_size
            )
        print(json.dumps(result))
        return

    counts = [int(w) for w in args.workers.split(",")]
    modes = [m.strip() for m in args.cores.split(",") if m.strip()]
    if any(m not in ("free", "pinned") for m in modes):
        parser.error("--cores takes free, pinned or both")
    if "pinned" in modes and max(counts) > len(os.sched_getaffinity(0)):
        parser.error(f"cannot pin {max(counts)} workers to {len(os.sched_getaffinity(0))} cores")
    load_before = os.getloadavg()
    sets: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        inputs = {"small": str(_image_folder(Path(args.images), args.limit, Path(scratch)))}
        if args.copies > 0:
            inputs["steady"] = str(_steady_manifest(Path(args.images), args.copies, Path(scratch)))
        for name, images in inputs.items():
            sets[name] = {}
            for mode in modes:
                runs: dict[str, dict[str, dict]] = {side: {} for side in SIDES}
                for workers in counts:
                    for side in SIDES:
                        output = str(Path(scratch) / f"{name}-{mode}-{side}-{workers}")
                        result = _child(
                            side, images, workers, output, mode == "pinned", args.shard_size
                        )
                        runs[side][str(workers)] = result
                        print(
                            f"{name:6} {mode:6} {side:5} x{workers}: "
                            f"{result['images_per_s']:.2f} images/s ({result['images']} images)",
                            flush=True,
                        )
                sets[name][mode] = {"runs": runs, "ratios": _ratios(runs, counts, "images_per_s")}
    if "steady" in sets:
        for mode in modes:
            small, steady = sets["small"][mode]["runs"], sets["steady"][mode]["runs"]
            for side in SIDES:
                for w in map(str, counts):
                    steady[side][w]["marginal_images_per_s"] = _marginal(
                        small[side][w], steady[side][w]
                    )
            sets["steady"][mode]["marginal_ratios"] = _ratios(
                steady, counts, "marginal_images_per_s"
            )
    result = {
        "benchmark": "runner_scaling",
        "images_source": args.images,
        "small_images": args.limit,
        "steady_copies": args.copies,
        "shard_size": args.shard_size,
        "sets": sets,
        "targets": {"scaling": 1.8, "runner_over_bare": 0.9},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_at_end": os.getloadavg(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, by_mode in sets.items():
        for mode, data in by_mode.items():
            for kind in ("ratios", "marginal_ratios"):
                for key, value in data.get(kind, {}).items():
                    print(f"{name} {mode} {kind}: {key}: {value:.3f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
