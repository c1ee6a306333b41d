"""Sweep of the re-ranking and learning settings over one `retrieval evaluate` output folder.

Reads the folder's descriptors and local features (no re-extraction), verifies every pair once
(cached in memory), and prints mAP for: spatial verification by inlier threshold, verified QE
by number of neighbours, and learned whitening by mining setting x dimensions x shrinkage. The
defaults were chosen from this sweep on oxford-dev AND ukbench-56 (README, "What each step
costs and gains"). Writes benchmarks/results/rerank_sweep_<benchmark>.json.

    python benchmarks/rerank_sweep.py --benchmark ../shared/benchmarks/oxford-dev \\
        --run reports/oxford-dev
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from retrieval import local_feature_cache
from retrieval.descriptors.pooling import l2_normalize
from retrieval.evaluation.ground_truth import load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.learning.mining import MiningConfig, propose_pairs
from retrieval.learning.whitening import learn_whitening
from retrieval.rerank.spatial import VerificationConfig, verify_pairs
from retrieval.shards import descriptor_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--run", required=True, help="a `retrieval evaluate --out` folder")
    parser.add_argument("--shortlist", type=int, default=100)
    args = parser.parse_args()

    bench = load_benchmark(args.benchmark)
    ids, _, x = descriptor_shards.read_all(str(Path(args.run) / "descriptors"))
    # An evaluate run's local features: its first-use layers (every image of a benchmark smaller
    # than the mining sample has them), or one extracted folder (--local-at extract).
    store = LocalFeatureStore(local_feature_cache.folders(str(Path(args.run) / "local_features")))
    position = {i: n for n, i in enumerate(ids)}
    qids = sorted({q.id for q in bench.queries} & set(position))
    cache: dict[tuple[str, str], int] = {}
    config = VerificationConfig(min_inliers=4)

    def inliers(pairs: list[tuple[str, str]]) -> list[int]:
        todo = [p for p in dict.fromkeys(pairs) if p not in cache]
        cache.update(zip(todo, verify_pairs(todo, store.get, config).tolist(), strict=True))
        return [cache[p] for p in pairs]

    def score(rankings: dict[str, list[str]]) -> dict[str, float | None]:
        m = evaluate_rankings(rankings, bench).as_dict()
        return {"mAP": round(m["mAP"], 2), "ns": m.get("ns_score")}

    def ranked(v: np.ndarray, q: np.ndarray) -> dict[str, list[str]]:
        order = np.argsort(-(q @ v.T), axis=1)
        return {qid: [ids[j] for j in order[i]] for i, qid in enumerate(qids)}

    def reranked(v, q, tau, vqe):
        base = ranked(v, q)
        out = {}
        for i, qid in enumerate(qids):
            top = [c for c in base[qid][: args.shortlist] if c != qid]
            n = inliers([(qid, c) for c in top])
            verified = sorted(
                (c for c, k in zip(top, n, strict=True) if k >= tau), key=lambda c: -cache[(qid, c)]
            )
            tail = base[qid]
            if verified and vqe:
                e = l2_normalize(q[i] + v[[position[c] for c in verified[:vqe]]].sum(axis=0))
                tail = [ids[j] for j in np.argsort(-(e @ v.T))]
            head = [qid, *verified]
            out[qid] = head + [c for c in tail if c not in set(head)]
        return out

    q = x[[position[i] for i in qids]]
    results: dict[str, dict] = {"global": score(ranked(x, q))}
    for tau, vqe in itertools.product((15, 20, 30), (0, 3, 10, 100)):
        results[f"sv tau={tau} vqe={vqe}"] = score(reranked(x, q, tau, vqe))
    for neighbours, min_inliers in itertools.product((5, 10, 20), (20, 30, 50)):
        proposed = propose_pairs(x, MiningConfig(neighbours=neighbours))
        n = np.asarray(inliers([(ids[i], ids[j]) for i, j in proposed]))
        pairs = proposed[n >= min_inliers]
        for dim, shrinkage in itertools.product((128, 256, 512), (0.0, 0.1, 0.3)):
            if len(pairs) == 0:
                continue
            w = learn_whitening(x, pairs, dim=dim, shrinkage=shrinkage)
            key = f"lw nn={neighbours} mi={min_inliers} pairs={len(pairs)} d={dim} s={shrinkage}"
            results[key] = score(ranked(w.apply(x), w.apply(q)))
    for key, value in results.items():
        print(f"{key:<50} {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rerank_sweep_{bench.name}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
