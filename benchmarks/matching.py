"""Matching local features: the project's one-BLAS-product matcher against OpenCV's brute force.

    python benchmarks/matching.py [--images DIR] [--pairs 300] [--threads 1]

Extracts the default local features (RootSIFT, 448 px, PCA-56) of oxford-dev images, draws
``--pairs`` seeded random pairs of them, and matches each pair both ways, side by side in one
run on ``--threads`` threads (OpenCV's and BLAS's): ``retrieval.rerank.spatial.match_features``
(nearest and second-nearest neighbours from one product and two row-wise minima, then the ratio
test) and ``cv2.BFMatcher(NORM_L2).knnMatch(k=2)`` with the same ratio test. Records the ms per
pair of each (best of ``--rounds``), their ratio, and whether every pair gave the same matches.
Writes ``benchmarks/results/matching.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_IMAGES = REPO.parent / "shared" / "benchmarks" / "oxford-dev" / "images"


def opencv_matches(matcher: Any, a: Any, b: Any, ratio: float) -> Any:
    import numpy as np

    found = [
        (m[0].queryIdx, m[0].trainIdx)
        for m in matcher.knnMatch(a, b, k=2)
        if len(m) == 2 and m[0].distance < ratio * m[1].distance
    ]
    return np.asarray(found, np.int64).reshape(-1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--limit", type=int, default=120, help="images to extract features of")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "matching.json"))
    args = parser.parse_args()
    # Before numpy is imported: BLAS reads its thread count once, when it loads.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import cv2
    import numpy as np

    from retrieval.images import decode_image
    from retrieval.local_features.extractor import build_local_extractor
    from retrieval.local_features.features import LocalFeatureConfig
    from retrieval.rerank.spatial import VerificationConfig, match_features

    config = LocalFeatureConfig()
    extractor = build_local_extractor(config, threads=args.threads)
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.limit]
    features = [
        extractor.extract(decode_image(p.read_bytes(), max_side=config.image_size)) for p in paths
    ]
    rng = np.random.default_rng(0)
    pairs = [tuple(rng.choice(len(features), size=2, replace=False)) for _ in range(args.pairs)]
    ratio = VerificationConfig().ratio
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    as_float = [np.ascontiguousarray(f.descriptors, np.float32) for f in features]

    def run_blas() -> list[np.ndarray]:
        return [match_features(features[i], features[j], ratio) for i, j in pairs]

    def run_opencv() -> list[np.ndarray]:
        return [opencv_matches(matcher, as_float[i], as_float[j], ratio) for i, j in pairs]

    best = {"blas": float("inf"), "opencv": float("inf")}
    results = {}
    for _ in range(args.rounds):  # alternating, best of the rounds for each
        for name, run in (("blas", run_blas), ("opencv", run_opencv)):
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    same = sum(
        np.array_equal(np.unique(x, axis=0), np.unique(y, axis=0))
        for x, y in zip(results["blas"], results["opencv"], strict=True)
    )
    record = {
        "benchmark": "matching",
        "images": len(paths),
        "pairs": len(pairs),
        "features_per_image": round(float(np.mean([len(f) for f in features])), 1),
        "local_model": config.model_id,
        "threads": args.threads,
        "ms_per_pair": {k: round(1000 * v / len(pairs), 2) for k, v in best.items()},
        "speedup": round(best["opencv"] / best["blas"], 2),
        "pairs_with_the_same_matches": int(same),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "opencv": cv2.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
