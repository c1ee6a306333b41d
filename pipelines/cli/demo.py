"""Where `retrieval demo` and the tests find a benchmark: the shared oxford-dev next to the
repository, else the smallest standard set, fetched from its publisher on first use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipelines.cli.errors import CommandError

DEMO_BENCHMARK = "oxford-dev"
# Fetched by `retrieval demo` when the shared benchmarks are absent: the smallest standard set
# (1,491 images, about 1.1 GB from INRIA's FTP server).
DEMO_FALLBACK = "holidays"

REPOSITORY = Path(__file__).resolve().parents[2]  # pipelines/cli/demo.py -> the checkout


def benchmarks_dir() -> Path:
    """Where the shared benchmarks are: $CBIR_BENCHMARKS, else ../shared/benchmarks next to the
    repository, else next to the current folder (the first that exists; else the repo one)."""
    if os.environ.get("CBIR_BENCHMARKS"):
        return Path(os.environ["CBIR_BENCHMARKS"])
    candidates = [base.parent / "shared" / "benchmarks" for base in (REPOSITORY, Path.cwd())]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def demo_data_dir() -> Path:
    """Where the demo fetches its fallback benchmark: $CBIR_DEMO_DATA, else data/ in the repo."""
    if os.environ.get("CBIR_DEMO_DATA"):
        return Path(os.environ["CBIR_DEMO_DATA"])
    return REPOSITORY / "data"


def demo_benchmark() -> Path:
    """The shared oxford-dev if present; else the fallback set, fetched on first use (from
    $CBIR_DATASETS_MIRROR when set). Raises CommandError with what to do when neither works."""
    candidate = benchmarks_dir() / DEMO_BENCHMARK
    if (candidate / "gt.json").exists():
        return candidate
    from retrieval.datasets import registry
    from retrieval.datasets.fetch import FetchError, fetch_dataset
    from retrieval.datasets.formats import FormatError

    target = demo_data_dir() / DEMO_FALLBACK
    spec = registry.get(DEMO_FALLBACK)
    print(
        f"{candidate} not found; fetching {spec.title} ({spec.download_size}) to {target}",
        file=sys.stderr,
    )
    try:
        fetch_dataset(spec, target, mirror=os.environ.get("CBIR_DATASETS_MIRROR"))
    except (FetchError, FormatError, OSError) as exc:
        raise CommandError(
            f"no benchmark at {candidate} and {DEMO_FALLBACK} could not be fetched ({exc}); "
            f"run `retrieval datasets fetch {DEMO_FALLBACK} --to {target}` where the "
            "publisher is reachable (or point $CBIR_BENCHMARKS at a folder holding "
            f"{DEMO_BENCHMARK}/), then `make demo` again"
        ) from exc
    return target
