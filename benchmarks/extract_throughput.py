"""Extraction throughput: the default pipeline end to end vs bare loops, same images and cores.

    python benchmarks/extract_throughput.py [--images DIR] [--limit N] [--threads T]
                                            [--repeat K] [--all-runtimes]

Measured in one run, on the same images and the same T threads, each in a fresh subprocess (so
none inherits another's thread pools):

* ``tf_fp32_bare``: the fixed reference. One process, the ``tensorflow`` runtime with T threads,
  ``for image: read + decode + describe`` one image at a time (model build excluded).
* ``default_bare``: the same bare loop with the default runtime (model load excluded).
* ``pipeline``: ``retrieval extract`` with the defaults on Beam (FnApiRunner, T worker processes,
  the default runtime, real batches, decode fan-in), timed end to end: pipeline and worker
  start-up, model loading, reading, decoding, inference, Parquet writing and commits.
* ``decode``: read + decode + resize alone on one thread (images/s per core), and
  ``decode_fan_in`` on T threads (``retrieval.extraction.load_images``).
* ``steady`` (``--repeat K``, default 8; 0 turns it off): the same three sides once more on a
  K-times larger corpus, a CSV manifest listing every image K times under distinct ids
  (``copy0/…``, ``copy1/…``), so the pipeline's fixed costs (Beam and worker start-up, model
  load, teardown) are spread over K times more work, as on a real corpus. The small-set figures
  stay the headline ones; both are reported, and ``pipeline_cost_model`` solves the pipeline's
  time as ``fixed_s + images / steady_images_per_s`` from the two sizes (only meaningful when
  the machine's load is steady across the run).
* ``global_job`` and ``default_job`` (``--jobs``, on by default; 0 turns them off): whole
  indexing jobs (``pipelines.job.run_index_job``, the one declaration every entry point runs, on
  Beam with T workers) on ``--jobs`` augmented copies of every image (``copy0`` the original,
  the others cropped, rescaled and re-encoded: distinct files that are near-duplicates of each
  other, as a real corpus holds; at least 4,000 images with the default 8). ``global_job`` is
  extract -> train -> index -> merge with global descriptors only; ``default_job`` is the whole
  default job (GeM + local features, mining + learned whitening, whiten, train, index, merge),
  with a mining sample of 1/8 of the images (what a 40,000-image corpus sees at the default
  sample of 5,000). Both in images/s of corpus, with each stage's seconds, and
  ``default_cost_ratio = global_job / default_job``. ``default_cost_ratio_at_1m`` models the
  same ratio for a million images: each stage's measured seconds per image (extract, whiten,
  index, merge) or per verified pair (learn: 5,000 sampled images x their neighbours), train as
  the same fixed cost in both jobs (its sample is capped), and says so in ``model``.
  ``default_job_extract`` is the default job with ``--local-at extract`` (every image's local
  features made with its descriptor, the former default), in the same run; the default computes
  them on first use, for the images mining (and later searches) ask for.
  ``--also-local PX[:PCA_DIM:DTYPE]`` adds ``default_job_local...``: the default job with other
  local features in the same run (``640:0:float16`` is the former default's former features).
* with ``--all-runtimes``: the bare loop of every runtime (``runtimes``), for the README's table;
  the int8 runtimes calibrate on their built-in sample unless ``--calibration URI`` is given.

The three sides run in ``--rounds`` alternating rounds (median per side, every round kept).
Writes ``benchmarks/results/extract_throughput.json`` with ``images_per_s`` for each,
``speedup = pipeline / tf_fp32_bare`` and ``efficiency = pipeline / default_bare`` (and the same
under ``steady``), plus the machine's load average before and after (timings on a shared machine
are noisy; the ratios are taken side by side in one run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "benchmarks" / "oxford-dev" / "images"


def _image_folder(source: Path, limit: int | None, scratch: Path) -> Path:
    """A folder of links to the first ``limit`` images, so every side sees the same inputs."""
    folder = scratch / "images"
    folder.mkdir()
    for path in sorted(source.iterdir())[:limit]:
        (folder / path.name).symlink_to(path)
    return folder


def _repeated_manifest(folder: Path, repeat: int, scratch: Path) -> Path:
    """A CSV manifest listing every image of ``folder`` ``repeat`` times under distinct ids."""
    manifest = scratch / f"repeat{repeat}.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri"])
        for k in range(repeat):
            for path in sorted(folder.iterdir()):
                writer.writerow([f"copy{k}/{path.name}", str(path.resolve())])
    return manifest


def _augmented_folder(folder: Path, copies: int, scratch: Path) -> Path:
    """``copies`` versions of every image of ``folder`` as JPEG files: ``copy0`` the original
    (linked), ``copy1``... each a seeded crop (80-100% of each side), rescale (60-100%) and
    re-encode (quality 80-95): distinct bytes and pixels, near-duplicates of each other."""
    import numpy as np
    from PIL import Image

    target = scratch / f"augmented{copies}"
    rng = np.random.default_rng(0)
    for path in sorted(folder.iterdir()):
        for k in range(copies):
            out = target / f"copy{k}" / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            if k == 0:
                out.symlink_to(path.resolve())
                continue
            with Image.open(path) as image:
                image = image.convert("RGB")
                w, h = image.size
                cw, ch = (round(side * rng.uniform(0.8, 1.0)) for side in (w, h))
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                scale = rng.uniform(0.6, 1.0)
                image = image.crop((x, y, x + cw, y + ch)).resize(
                    (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.LANCZOS
                )
                image.save(out.with_suffix(".jpg"), quality=int(rng.integers(80, 96)))
    return target


EXTRACT_ROW = "extract"  # --also-local's name for the default job with --local-at extract


def run_job(images: str, threads: int, output: str, which: str, local: str = "") -> dict:
    """One whole indexing job on Beam with ``threads`` workers: ``global`` (local features
    off, so no learning) or ``default`` (every default, mining sample = 1/8 of the images)."""
    start = time.perf_counter()
    import dataclasses

    import apache_beam  # noqa: F401  (part of every job's cost, as for the pipeline side)

    from pipelines.config import RunConfig
    from pipelines.job import run_index_job
    from retrieval.corpus import list_corpus
    from retrieval.local_features.features import LocalFeatureConfig

    images_listed = sum(1 for _ in list_corpus(images))
    config = RunConfig(runner="beam", workers=threads)
    if which == "global":
        config = dataclasses.replace(config, local=LocalFeatureConfig(method="none"))
    else:
        mining = dataclasses.replace(config.mining, sample_size=max(1, images_listed // 8))
        config = dataclasses.replace(config, mining=mining)
        if local == EXTRACT_ROW:  # local features of every image, at extract
            config = dataclasses.replace(config, local_at="extract")
        elif local:  # a comparison row, not the default: PX[:PCA_DIM:DTYPE]
            size, _, rest = local.partition(":")
            pca_dim, _, dtype = rest.partition(":")
            changes: dict = {"image_size": int(size)}
            if pca_dim:
                changes["pca_dim"] = int(pca_dim)
            if dtype:
                changes["dtype"] = dtype
            local_config = dataclasses.replace(config.local, **changes)
            config = dataclasses.replace(config, local=local_config)
    record = run_index_job(images, output, config)
    seconds = time.perf_counter() - start
    indexed = record["accounting"]["indexed"]
    learning = record.get("learning", {})
    mining = learning.get("mining", {})
    return {
        "job": which,
        "images": indexed,
        "seconds": seconds,
        "images_per_s": indexed / seconds,
        "stages_s": record.get("timings", {}),
        "mining_sample": config.mining.sample_size if which == "default" else 0,
        "local_model": config.local.model_id if config.local.enabled else None,
        "local_dtype": config.local.stored_dtype if config.local.enabled else None,
        "local_at": config.local_at if config.local.enabled else None,
        "mining": mining,
        "learning_skipped": learning.get("skipped"),
        "workers": threads,
    }


def _job_cost_model(global_job: dict, default_job: dict, corpus: int = 1_000_000) -> dict:
    """``global_job / default_job`` in images/s modelled for ``corpus`` images from the two
    measured jobs: per-image stages scale with the corpus, learn with its verified pairs (the
    default sample of 5,000 images x their neighbours), train is a fixed cost in both."""
    from retrieval.learning.mining import MiningConfig

    def per_image(job: dict) -> float:
        stages = job["stages_s"]
        fixed = stages.get("train_s", 0.0) + stages.get("learn_s", 0.0)
        return (job["seconds"] - fixed) / job["images"]

    pairs = default_job["mining"].get("proposed_pairs") or 0
    if not pairs or default_job["learning_skipped"]:  # nothing measured to model from
        return {"corpus": corpus, "ratio": None, "why": default_job["learning_skipped"]}
    mining = default_job["mining"]
    # First use: learn computes the local features of the proposed pairs' images, a cost per
    # image (at most sample x (1 + neighbours) images at 1M), not per pair.
    local_s = mining.get("local_features_s") or 0.0
    local_images = mining.get("images_proposed") or 0
    per_local_image = local_s / local_images if local_images else 0.0
    # The proposals' exact kNN (every sampled image against the whole corpus) grows with both
    # the sample and the corpus; the rest of learn (verification, whitening) with the pairs.
    knn_s = max(0.0, mining["mining_s"] - local_s - mining["verify_ms_per_pair"] * pairs / 1000)
    per_pair = (default_job["stages_s"]["learn_s"] - knn_s - local_s) / pairs
    defaults = MiningConfig()
    pairs_at = min(defaults.sample_size, corpus) * defaults.neighbours
    local_images_at = min(corpus, min(defaults.sample_size, corpus) * (defaults.neighbours + 1))
    train_g = global_job["stages_s"].get("train_s", 0.0)
    train_d = default_job["stages_s"].get("train_s", 0.0)
    global_s = corpus * per_image(global_job) + train_g
    knn_at = (
        knn_s
        * (corpus / default_job["images"])
        * (min(defaults.sample_size, corpus) / default_job["mining_sample"])
    )
    local_at = local_images_at * per_local_image
    default_s = corpus * per_image(default_job) + train_d + pairs_at * per_pair + knn_at + local_at
    return {
        "corpus": corpus,
        "global_s": global_s,
        "default_s": default_s,
        "ratio": default_s / global_s,
        "learn_s_per_proposed_pair": per_pair,
        "mining_knn_s": knn_at,
        "first_use_local_s_per_image": per_local_image,
        "first_use_local_images": local_images_at,
        "first_use_local_s": local_at,
        "model": "seconds = images x (each job's measured seconds per image outside train and "
        "learn, start-up included: an overestimate for both) + train (measured, as fixed) + "
        "learn (default only: measured seconds per proposed pair, mining and learning the "
        f"whitening included, x {defaults.sample_size} sampled images x "
        f"{defaults.neighbours} neighbours; plus the proposals' exact kNN, measured and scaled "
        "by corpus x sample; plus, on first use, the local features of the proposed pairs' "
        "images: measured seconds per image x at most sample x (1 + neighbours) images). "
        "Searches then compute those of the shortlisted images they meet, once (not modelled: "
        "it depends on the queries)",
    }


def run_bare(images: str, threads: int, runtime: str, calibration: str | None = None) -> dict:
    """``images`` is a folder or a manifest (``--repeat``)."""
    from retrieval.corpus import list_corpus
    from retrieval.descriptors.gem import GeMConfig, GeMExtractor, configure_tf_threads
    from retrieval.extraction import LoadedImage, load_image
    from retrieval.images import DecodeLimits

    if runtime == "tensorflow":
        configure_tf_threads(threads)
    config = GeMConfig(runtime=runtime, calibration=calibration if "int8" in runtime else None)
    extractor = GeMExtractor(config, threads=threads)
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
    return {
        "runtime": runtime,
        "images": described,
        "seconds": seconds,
        "images_per_s": described / seconds,
        "threads": threads,
    }


def run_decode(images: str, threads: int) -> dict:
    from retrieval.corpus import list_corpus
    from retrieval.descriptors.gem import DEFAULT_IMAGE_SIZE
    from retrieval.extraction import LoadedImage, load_images
    from retrieval.images import DecodeLimits

    refs = list_corpus(images)
    limits = DecodeLimits()
    start = time.perf_counter()
    loaded = load_images(
        refs,
        max_side=DEFAULT_IMAGE_SIZE,
        limits=limits,
        threads=0 if threads == 1 else threads,
        prefetch=4 * threads,
    )
    done = sum(isinstance(result, LoadedImage) for result in loaded)
    seconds = time.perf_counter() - start
    return {"images": done, "seconds": seconds, "images_per_s": done / seconds, "threads": threads}


def run_pipeline(images: str, threads: int, output: str) -> dict:
    start = time.perf_counter()
    import apache_beam  # noqa: F401  (timed apart: a fixed cost of every Beam job)

    from pipelines import stages
    from pipelines.config import RunConfig

    imported = time.perf_counter()
    config = RunConfig(runner="beam", workers=threads)
    summary = stages.extract(images, output, config)
    seconds = time.perf_counter() - start
    return {
        "runtime": config.gem.runtime,
        "images": summary["indexed"],
        "seconds": seconds,
        "images_per_s": summary["indexed"] / seconds,
        # where the time went: imports, then listing + planning + the Beam job (worker start,
        # model load, read, decode, inference, writes, commits, teardown), then the summary
        "import_s": imported - start,
        "extract_s": summary["timings"]["extract_s"],
        "workers": threads,
        "threads_per_worker": config.threads,
    }


def _child(
    side: str,
    images: str,
    threads: int,
    output: str = "",
    runtime: str = "",
    calibration: str | None = None,
    job: str = "",
    local: str = "",
) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--images", images]
    cmd += ["--threads", str(threads), "--output", output, "--runtime", runtime]
    if job:
        cmd += ["--job", job, "--local", local]
    if calibration:
        cmd += ["--calibration", calibration]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sides(images: str, threads: int, rounds: int, scratch: Path) -> dict:
    """tf_fp32_bare, default_bare and pipeline on ``images`` in ``rounds`` alternating rounds,
    each side's median, and their speedup and efficiency."""
    from retrieval.runtimes import DEFAULT_RUNTIME

    runs: dict[str, list[dict]] = {"tf_fp32_bare": [], "default_bare": [], "pipeline": []}
    # Alternate the sides round by round, so that a change in the machine's load hits all of
    # them alike; each side's figure is its median over the rounds (all rounds are kept).
    for r in range(rounds):
        for name, runtime in (("tf_fp32_bare", "tensorflow"), ("default_bare", DEFAULT_RUNTIME)):
            runs[name].append(_child("bare", images, threads, runtime=runtime))
        output = str(scratch / f"descriptors-{r}")
        runs["pipeline"].append(_child("pipeline", images, threads, output=output))
    sides: dict = {}
    for name, side_runs in runs.items():
        rates = [run["images_per_s"] for run in side_runs]
        sides[name] = {**side_runs[-1], "images_per_s": statistics.median(rates), "rounds": rates}
    pipeline = sides["pipeline"]["images_per_s"]
    sides["speedup"] = pipeline / sides["tf_fp32_bare"]["images_per_s"]
    sides["efficiency"] = pipeline / sides["default_bare"]["images_per_s"]
    return sides


def _jobs(images: str, threads: int, scratch: Path, local_specs: Sequence[str] = ()) -> dict:
    """global_job then default_job on the same images, each in a fresh process (and the
    default job with other local-feature image sizes, for comparison)."""
    jobs = {
        f"{which}_job": _child("job", images, threads, output=str(scratch / which), job=which)
        for which in ("global", "default")
    }
    for spec in (EXTRACT_ROW, *local_specs):
        name = spec.replace(":", "_")
        output = str(scratch / f"default-{name}")
        row = _child("job", images, threads, output=output, job="default", local=spec)
        jobs["default_job_extract" if spec == EXTRACT_ROW else f"default_job_local{name}"] = row
    jobs["default_cost_ratio"] = (
        jobs["global_job"]["images_per_s"] / jobs["default_job"]["images_per_s"]
    )
    model = _job_cost_model(jobs["global_job"], jobs["default_job"])
    jobs["default_cost_ratio_at_1m"] = model["ratio"]
    jobs["default_cost_model_at_1m"] = model
    return jobs


def _cost_model(small: dict, big: dict) -> dict:
    """The pipeline's seconds as ``fixed_s + images / per_image_rate``, solved from the two set
    sizes (medians): what a run costs before its first image, and its rate once running."""
    n1, t1 = small["images"], small["images"] / small["images_per_s"]
    n2, t2 = big["images"], big["images"] / big["images_per_s"]
    if n2 == n1:
        return {}
    rate = (n2 - n1) / (t2 - t1) if t2 > t1 else float("inf")
    return {"fixed_s": t1 - n1 / rate, "steady_images_per_s": rate}


JOB_KEYS = (
    "global_job",
    "default_job",
    "default_cost_ratio",
    "default_cost_ratio_at_1m",
    "default_cost_model_at_1m",
)


def _print_jobs(results: dict) -> None:
    names = ["global_job", "default_job"] + [n for n in results if n.startswith("default_job_")]
    for name in names:
        job = results[name]
        stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in job["stages_s"].items())
        print(
            f"{name:>13}: {job['images_per_s']:7.2f} images/s ({job['images']} images; {stages} s)",
            flush=True,
        )
    at_1m = results["default_cost_ratio_at_1m"]
    modelled = f"{at_1m:.2f}" if at_1m is not None else "not modelled: no pairs were mined"
    print(
        f"default_cost_ratio: {results['default_cost_ratio']:.2f} "
        f"(modelled at 1M images: {modelled})",
        flush=True,
    )


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
    parser.add_argument(
        "--child", choices=["bare", "pipeline", "decode", "job"], help=argparse.SUPPRESS
    )
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds of the three sides (median)"
    )
    parser.add_argument(
        "--all-runtimes", action="store_true", help="also time the bare loop of every runtime"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=8,
        metavar="K",
        help="also measure on the images listed K times (steady state; 0: off)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=8,
        metavar="K",
        help="global_job and default_job on K augmented copies of every image (0: off)",
    )
    parser.add_argument(
        "--only-jobs", action="store_true", help="measure the two jobs alone (development)"
    )
    parser.add_argument(
        "--steady-rounds", type=int, default=1, help="alternating rounds on the larger set"
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="images the int8 runtimes calibrate on (default: their built-in sample)",
    )
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=["global", "default"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--also-local",
        action="append",
        default=[],
        metavar="PX[:PCA_DIM:DTYPE]",
        help="also run the default job with these local features, e.g. 640:0:float16 (the "
        "former default; repeatable; a comparison row)",
    )
    parser.add_argument("--local", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "bare":
        calibration = args.calibration or None
        print(json.dumps(run_bare(args.images, args.threads, args.runtime, calibration)))
        return
    if args.child == "pipeline":
        print(json.dumps(run_pipeline(args.images, args.threads, args.output)))
        return
    if args.child == "decode":
        print(json.dumps(run_decode(args.images, args.threads)))
        return
    if args.child == "job":
        job = run_job(args.images, args.threads, args.output, args.job, args.local)
        print(json.dumps(job))
        return

    from retrieval.runtimes import DEFAULT_RUNTIME, RUNTIMES

    load_before = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = _image_folder(Path(args.images), args.limit, Path(scratch))
        if args.jobs > 0:
            augmented = _augmented_folder(folder, args.jobs, Path(scratch))
            jobs_dir = Path(scratch) / "jobs"
            jobs = _jobs(str(augmented), args.threads, jobs_dir, args.also_local)
            results.update(jobs)
            _print_jobs(results)
        if args.only_jobs:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            return
        results.update(_sides(str(folder), args.threads, args.rounds, Path(scratch) / "small"))
        results["decode"] = _child("decode", str(folder), 1)
        results["decode_fan_in"] = _child("decode", str(folder), args.threads)
        if args.all_runtimes:
            results["runtimes"] = {
                name: _child(
                    "bare", str(folder), args.threads, runtime=name, calibration=args.calibration
                )
                for name in RUNTIMES
            }
        if args.repeat > 0:
            manifest = _repeated_manifest(folder, args.repeat, Path(scratch))
            steady = _sides(str(manifest), args.threads, args.steady_rounds, Path(scratch) / "big")
            results["steady"] = {"repeat": args.repeat, **steady}
            results["pipeline_cost_model"] = _cost_model(results["pipeline"], steady["pipeline"])
    for name, result in results.items():
        if name in JOB_KEYS or name.startswith("default_job_local"):
            continue
        if name not in ("runtimes", "steady", "speedup", "efficiency", "pipeline_cost_model"):
            print(f"{name:>13}: {result['images_per_s']:7.2f} images/s", flush=True)
    for name, result in results.get("runtimes", {}).items():
        print(f"{name:>13}: {result['images_per_s']:7.2f} images/s (bare loop)", flush=True)
    steady = results.get("steady")
    if steady:
        images = steady["pipeline"]["images"]
        for name in ("tf_fp32_bare", "default_bare", "pipeline"):
            rate = steady[name]["images_per_s"]
            print(f"{name:>13}: {rate:7.2f} images/s ({images} images)", flush=True)
        print(f"steady: speedup {steady['speedup']:.2f}, efficiency {steady['efficiency']:.2f}")
        model = results["pipeline_cost_model"]
        if model:
            print(
                f"pipeline: {model['fixed_s']:.1f} s fixed + "
                f"{model['steady_images_per_s']:.1f} images/s once running"
            )
    speedup, efficiency = results["speedup"], results["efficiency"]
    result = {
        "benchmark": "extract_throughput",
        "images_source": args.images,
        "threads": args.threads,
        "default_runtime": DEFAULT_RUNTIME,
        **results,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"speedup (pipeline / tf_fp32_bare): {speedup:.2f}")
    print(f"efficiency (pipeline / default_bare): {efficiency:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
