"""mAP of α-query expansion by number of neighbours n and exponent α, to choose the defaults.

    retrieval evaluate --benchmark ../shared/benchmarks/oxford-dev --out reports/oxford-dev
    python benchmarks/query_expansion_sweep.py reports/oxford-dev [more evaluate outputs ...]

Reuses the descriptors and default index an evaluate run left in its output folder. Writes
``benchmarks/results/query_expansion_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.evaluate import rank_queries
from retrieval.evaluation.ground_truth import load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.index.search import load_index
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.shards import descriptor_shards

REPO = Path(__file__).resolve().parents[1]
NEIGHBOURS = (0, 1, 2, 3, 5, 10)
ALPHAS = (0.0, 1.0, 3.0)


def sweep(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    benchmark = load_benchmark(report["benchmark_dir"])
    ids, _, vectors = descriptor_shards.read_all(str(run / "descriptors"))
    vectors_by_id = dict(zip(ids, vectors, strict=True))
    index = load_index(str(run / "default" / "index"))
    rows = []
    for n in NEIGHBOURS:
        for alpha in ALPHAS if n else (0.0,):
            rankings = rank_queries(index, benchmark, vectors_by_id, QueryExpansion(n, alpha))
            scores = evaluate_rankings(rankings, benchmark).as_dict()
            rows.append(
                {
                    "n": n,
                    "alpha": alpha,
                    "mAP": scores["mAP"],
                    "landmark_mAP": scores["landmark_mAP"],
                    "ns_score": scores["ns_score"],
                }
            )
            print(f"{report['benchmark']:<12} n={n:<3} alpha={alpha:<4} mAP {scores['mAP']:6.2f}")
    return {"benchmark": report["benchmark"], "index": index.manifest["factory"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `retrieval evaluate`")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "query_expansion_sweep.json")
    )
    args = parser.parse_args()
    result = {
        "sweeps": [sweep(run) for run in args.runs],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
