"""Evaluation of retrieval results against benchmark ground truth.

- ``ground_truth``: load and validate a benchmark (``gt.json`` + ``images/``);
- ``metrics``: AP (Revisited Oxford/Paris protocol), precision@k, UKBench N-S, PR curves,
  and ``evaluate_rankings`` for a whole benchmark;
- ``report``: JSON / Markdown / HTML reports (imported on demand: it pulls in matplotlib).
"""

from retrieval.evaluation.ground_truth import Benchmark, Query, load_benchmark
from retrieval.evaluation.metrics import (
    RankingMetrics,
    average_precision,
    evaluate_rankings,
    pr_curve,
    precision_at_k,
    ukbench_ns_score,
)

__all__ = [
    "Benchmark",
    "Query",
    "RankingMetrics",
    "average_precision",
    "evaluate_rankings",
    "load_benchmark",
    "pr_curve",
    "precision_at_k",
    "ukbench_ns_score",
]
