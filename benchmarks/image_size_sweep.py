"""mAP of the default pipeline by image size (longer side), to choose the default by measurement.

    python benchmarks/image_size_sweep.py [--benchmark DIR] [--sizes 288,362,448,512]

Writes ``benchmarks/results/image_size_sweep.json``: per size, results[0] mAP and landmark mAP.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipelines.config import RunConfig
from pipelines.evaluate import evaluate_benchmark

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--benchmark", default=str(REPO.parent / "shared" / "benchmarks" / "oxford-dev")
    )
    parser.add_argument("--sizes", default="288,362,448,512")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "image_size_sweep.json")
    )
    args = parser.parse_args()
    rows = []
    base = RunConfig()
    for size in (int(s) for s in args.sizes.split(",")):
        config = replace(base, gem=replace(base.gem, image_size=size))
        with tempfile.TemporaryDirectory() as out:
            report = evaluate_benchmark(args.benchmark, out, config, variants=False)
        best = report["results"][0]
        rows.append(
            {
                "image_size": size,
                "mAP": best["mAP"],
                "landmark_mAP": best["landmark_mAP"],
                "mP@10": best["mP@10"],
            }
        )
        print(
            f"{size:5d} px  mAP {best['mAP']:6.2f}  landmark mAP {best['landmark_mAP']:6.2f}",
            flush=True,
        )
    result = {
        "benchmark": Path(args.benchmark).name,
        "rows": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
