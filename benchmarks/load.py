"""Load test: many small generated images through the Beam extraction with 2 workers.

Generates N small images (default 5,000 and 20,000), runs ``retrieval extract`` on the Beam
FnApiRunner with 2 worker processes and a tiny SavedModel backbone (the load is on listing,
planning, reading, decoding, shuffling and writing shards, not on the model), and reports for
each size: throughput, the launcher's and each worker's peak RSS (VmHWM, sampled every 0.2 s), the
accounting (inputs = indexed + failed). Memory must stay flat as the corpus grows.

Each size runs in a fresh process: a process's peak RSS (VmHWM) only ever rises, so a second
size measured in the same launcher would report the larger of the two peaks.

    .venv/bin/python benchmarks/load.py [--sizes 5000 20000] [--workdir DIR]

Writes ``benchmarks/results/load.json``. Not part of ``make test`` (minutes of CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def generate(folder: Path, n: int) -> None:
    """n small JPEGs (64x48 random blocks), 1% of them broken (accounting must still add up)."""
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        if i % 100 == 99:
            (sub / f"{i:06d}.jpg").write_bytes(b"not an image")
            continue
        blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((64, 48), Image.Resampling.NEAREST).save(
            sub / f"{i:06d}.jpg", quality=85
        )


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


class MemorySampler:
    """Peak RSS (VmHWM, Linux /proc) of this process and each of its descendants, sampled in a
    thread while they live (a worker's peak is read before it exits)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parents[int(entry)] = int(_status(int(entry))["PPid"])
                except (OSError, KeyError, ValueError):
                    continue
        found, frontier = [], [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [c for c, p in parents.items() if p == pid]
            found += children
            frontier += children
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [os.getpid(), *self._descendants()]:
                try:
                    peak_kb = int(_status(pid)["VmHWM"].split()[0])
                except (OSError, KeyError, ValueError):
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak_kb * 1024)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(n: int, workdir: Path, model: Path) -> dict:
    from pipelines import stages
    from pipelines.config import RunConfig
    from retrieval.descriptors.gem import GeMConfig

    images = workdir / f"images-{n}"
    if not images.exists():
        generate(images, n)
    config = RunConfig(
        runner="beam",
        workers=2,
        threads_per_worker=1,
        gem=GeMConfig(backbone=f"savedmodel:{model}", image_size=64),
    )
    output = workdir / f"desc-{n}"
    shutil.rmtree(output, ignore_errors=True)  # a fresh extraction, not a re-run that skips
    start = time.perf_counter()
    with MemorySampler() as memory:
        summary = stages.extract(str(images), str(output), config)
    elapsed = time.perf_counter() - start
    me = os.getpid()
    # The two largest descendants are the SDK workers holding the model.
    workers = sorted((rss for pid, rss in memory.peaks.items() if pid != me), reverse=True)[:2]
    return {
        "images": n,
        "inputs": summary["inputs"],
        "indexed": summary["indexed"],
        "failed": summary["failed"],
        "adds_up": summary["inputs"] == summary["indexed"] + summary["failed"] == n,
        "seconds": round(elapsed, 1),
        "images_per_s": round(n / elapsed, 1),
        "launcher_peak_rss_mb": round(memory.peaks.get(me, 0) / 2**20, 1),
        "worker_peak_rss_mb": [round(r / 2**20, 1) for r in workers],
    }


def _run_in_child(n: int, workdir: Path, model: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--workdir", str(workdir)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/load.json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one size, in this fresh process
        print(json.dumps(run(args.child, args.workdir, args.workdir / "tiny")))
        return
    from support import save_tiny_saved_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cbir-load-"))
    model = workdir / "tiny"
    if not model.exists():
        save_tiny_saved_model(model)
    rows = [_run_in_child(n, workdir, model) for n in args.sizes]
    result = {
        "benchmark": "load",
        "runner": "Beam FnApiRunner, 2 worker processes, 1 thread each",
        "backbone": "tiny SavedModel (4 channels): measures the pipeline, not the model",
        "note": "timings vary with the machine's load; each size in a fresh process",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
