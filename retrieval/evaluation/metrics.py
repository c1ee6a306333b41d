"""Retrieval metrics: AP (Revisited Oxford/Paris protocol), precision@k, UKBench N-S, PR curves.

Every per-query function takes the ranking as a list of image ids, best first, and first
applies the same clean-up, so that all metrics see the same ranking:

- junk images of the query are removed (they are neither rewarded nor penalised, as in the
  Revisited Oxford/Paris evaluation code, ``compute_map`` in filipradenovic/revisitop);
- the query image itself is removed when ``query_id`` is given (the leave-one-out protocol
  of the shared benchmarks: finding yourself is no achievement);
- repeated ids keep only their first position, so a ranking that lists a positive twice
  cannot score above 1.

Ids that are not in the benchmark are simply negatives. Positives absent from the ranking
(a truncated top-k list) count as never retrieved.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.evaluation.ground_truth import Benchmark

#: Recall levels of the interpolated PR curve: 0.00, 0.01, ..., 1.00.
RECALL_LEVELS: np.ndarray = np.linspace(0.0, 1.0, 101)
UKBENCH_TOP = 4


def clean_ranking(
    ranked_ids: Iterable[str], junk: Collection[str] = (), query_id: str | None = None
) -> list[str]:
    """The ranking the metrics score: junk, the query itself and repeated ids removed."""
    drop = set(junk)
    if query_id is not None:
        drop.add(query_id)
    seen: set[str] = set()
    kept: list[str] = []
    for image_id in ranked_ids:
        if image_id in drop or image_id in seen:
            continue
        seen.add(image_id)
        kept.append(image_id)
    return kept


def _positive_ranks(cleaned: Sequence[str], positives: Collection[str]) -> list[int]:
    """0-based ranks, in the cleaned ranking, of the positives it contains (ascending)."""
    return [rank for rank, image_id in enumerate(cleaned) if image_id in positives]


def average_precision(
    ranked_ids: Sequence[str],
    positives: Collection[str],
    junk: Collection[str] = (),
    query_id: str | None = None,
) -> float:
    """Average precision of one ranking, in [0, 1], computed as ``compute_ap`` in revisitop.

    The area under the precision-recall curve is summed with trapezoids: the i-th retrieved
    positive (0-based) at cleaned rank r (0-based) adds
    ``((i / r if r > 0 else 1) + (i + 1) / (r + 1)) / 2 / nrel`` with ``nrel = len(positives)``,
    so positives missing from the ranking lower the AP instead of being ignored.

    Returns NaN when there are no positives: AP is undefined, and 0 would unfairly drag a
    mean down. Callers skip NaN queries (``evaluate_rankings`` does).
    """
    positives = frozenset(positives)
    nrel = len(positives)
    if nrel == 0:
        return math.nan
    ranks = _positive_ranks(clean_ranking(ranked_ids, junk, query_id), positives)
    ap = 0.0
    for i, rank in enumerate(ranks):
        precision_0 = i / rank if rank > 0 else 1.0
        precision_1 = (i + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / 2.0
    return ap / nrel


def precision_at_k(
    ranked_ids: Sequence[str],
    positives: Collection[str],
    k: int,
    junk: Collection[str] = (),
    query_id: str | None = None,
) -> float:
    """Fraction of the first k (cleaned) results that are positives: hits / k, in [0, 1].

    The denominator is always k (the textbook definition), so a query with fewer than k
    positives cannot reach 1; revisitop's mP@k instead divides by min(k, rank of the last
    retrieved positive). A ranking shorter than k counts its missing places as misses.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    positives = frozenset(positives)
    top = clean_ranking(ranked_ids, junk, query_id)[:k]
    return sum(image_id in positives for image_id in top) / k


def revisitop_precision_at_k(
    ranked_ids: Sequence[str],
    positives: Collection[str],
    k: int,
    junk: Collection[str] = (),
    query_id: str | None = None,
) -> float:
    """Precision at k as the Revisited Oxford/Paris code defines its mP@k (``compute_map`` in
    filipradenovic/revisitop): with r the (1-based, junk-removed) rank of the last positive
    retrieved, the cut-off is ``min(k, r)`` and the score is hits in the cut-off / cut-off.

    So a query whose every positive is in the top 3 scores 1 at k=10, unlike ``precision_at_k``.
    A ranking with no positive at all scores 0 (revisitop's code assumes full rankings, which
    always contain every positive, and has no such case).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks = _positive_ranks(clean_ranking(ranked_ids, junk, query_id), frozenset(positives))
    if not ranks:
        return 0.0
    cutoff = min(ranks[-1] + 1, k)
    return sum(rank < cutoff for rank in ranks) / cutoff


#: How mP@k is defined: "standard" (hits in the top k / k) or "revisitop" (see above).
PRECISION_DEFINITIONS = {"standard": precision_at_k, "revisitop": revisitop_precision_at_k}


def pr_curve(
    ranked_ids: Sequence[str],
    positives: Collection[str],
    junk: Collection[str] = (),
    query_id: str | None = None,
) -> np.ndarray:
    """Interpolated precision at the 101 recall levels 0, 0.01, ..., 1 (values in [0, 1]).

    Interpolated precision at recall level r is the best precision reached at any cut-off
    whose recall is >= r (0 when the ranking never reaches r), which makes the curve
    monotone and lets curves of different queries be averaged point by point.
    Returns an all-NaN curve when there are no positives (skip it, as for AP).
    """
    positives = frozenset(positives)
    nrel = len(positives)
    if nrel == 0:
        return np.full(RECALL_LEVELS.shape, np.nan)
    ranks = np.asarray(_positive_ranks(clean_ranking(ranked_ids, junk, query_id), positives))
    curve = np.zeros(RECALL_LEVELS.shape)
    if ranks.size == 0:
        return curve
    hits = np.arange(1, ranks.size + 1)
    # Precision only drops between hits, so the best precision at recall >= r is reached at
    # a hit: take the running maximum of the precisions at the hits, from the end.
    precision = hits / (ranks + 1)
    best_from = np.maximum.accumulate(precision[::-1])[::-1]
    recall = hits / nrel
    first_hit = np.searchsorted(recall, RECALL_LEVELS - 1e-12, side="left")
    reached = first_hit < ranks.size
    curve[reached] = best_from[first_hit[reached]]
    return curve


def ukbench_ns_score(
    rankings: Mapping[str, Sequence[str]], groups: Iterable[Collection[str]]
) -> float:
    """UKBench N-S score: mean, over every image of every group, of how many of its group of
    4 (itself included) are in its top 4. Ranges over 0..4.

    Unlike AP, the query is NOT removed from its ranking: the classic score counts it, so a
    perfect system scores 4.0. Every group member must have a ranking (KeyError otherwise).
    """
    counts: list[int] = []
    for group in groups:
        members = frozenset(group)
        for query_id in members:
            if query_id not in rankings:
                raise KeyError(f"no ranking for UKBench query {query_id!r}")
            top = clean_ranking(rankings[query_id])[:UKBENCH_TOP]
            counts.append(sum(image_id in members for image_id in top))
    if not counts:
        raise ValueError("ukbench_ns_score needs at least one group")
    return sum(counts) / len(counts)


@dataclass
class RankingMetrics:
    """Scores of one set of rankings on one benchmark; fractions in [0, 1] except N-S.

    Queries without positives have NaN AP, are listed in ``skipped_queries`` and are left
    out of every mean. ``as_dict`` gives the JSON form, in percentages.
    """

    mean_ap: float
    landmark_mean_ap: float
    mean_precision_at: dict[int, float]
    ns_score: float | None
    per_query_ap: dict[str, float]
    per_landmark_ap: dict[str, float]
    pr_curve: np.ndarray
    skipped_queries: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: percentages 0-100 (N-S stays 0..4), NaN as None."""
        out: dict[str, Any] = {
            "mAP": _percent(self.mean_ap),
            "landmark_mAP": _percent(self.landmark_mean_ap),
        }
        for k, value in sorted(self.mean_precision_at.items()):
            out[f"mP@{k}"] = _percent(value)
        out["ns_score"] = None if self.ns_score is None else float(self.ns_score)
        out["per_landmark"] = {name: _percent(v) for name, v in self.per_landmark_ap.items()}
        out["per_query"] = {name: _percent(v) for name, v in self.per_query_ap.items()}
        out["pr_curve"] = [_percent(v) for v in self.pr_curve]
        return out


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    benchmark: Benchmark,
    ks: Sequence[int] = (1, 5, 10),
    precision: str | None = None,
) -> RankingMetrics:
    """Score the rankings of every benchmark query (ranked image ids, best first).

    A query missing from ``rankings`` raises KeyError naming it: scoring only the queries
    that happen to be present would report a mAP on a different benchmark. Extra entries in
    ``rankings`` are ignored. ``landmark_mean_ap`` averages per landmark first, so that a
    landmark with many queries does not dominate; the N-S score is computed only when the
    benchmark is UKBench-shaped (see ``Benchmark.ukbench_groups``).

    ``rankings`` is keyed by query id; per-query results are keyed by
    ``Benchmark.query_keys`` (the id, or "<id>@<landmark>" for an image that is a query of
    several landmarks and is scored once per landmark, with that landmark's ground truth).

    The query image is removed from its ranking unless ``benchmark.query_in_ranking``.
    ``precision`` picks the mP@k definition (``PRECISION_DEFINITIONS``); by default
    "revisitop" for a Revisited protocol (``benchmark.protocol`` "revisited-..."), else
    "standard".
    """
    if precision is None:
        revisited = (benchmark.protocol or "").startswith("revisited")
        precision = "revisitop" if revisited else "standard"
    precision_at = PRECISION_DEFINITIONS[precision]
    missing = [q.id for q in benchmark.queries if q.id not in rankings]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"no ranking for query {shown}{more} of benchmark {benchmark.name!r}")

    per_query: dict[str, float] = {}
    by_landmark: dict[str, list[float]] = defaultdict(list)
    precisions: dict[int, list[float]] = {k: [] for k in ks}
    curves: list[np.ndarray] = []
    skipped: list[str] = []
    for key, query in benchmark.query_keys().items():
        ranking = rankings[query.id]
        self_id = None if benchmark.query_in_ranking else query.id
        ap = average_precision(ranking, query.positives, query.junk, self_id)
        per_query[key] = ap
        if math.isnan(ap):
            skipped.append(key)
            continue
        by_landmark[query.landmark].append(ap)
        for k in ks:
            precisions[k].append(precision_at(ranking, query.positives, k, query.junk, self_id))
        curves.append(pr_curve(ranking, query.positives, query.junk, self_id))

    per_landmark = {name: _mean(aps) for name, aps in by_landmark.items()}
    groups = benchmark.ukbench_groups()
    return RankingMetrics(
        mean_ap=_mean(ap for ap in per_query.values() if not math.isnan(ap)),
        landmark_mean_ap=_mean(per_landmark.values()),
        mean_precision_at={k: _mean(values) for k, values in precisions.items()},
        ns_score=None if groups is None else ukbench_ns_score(rankings, groups),
        per_query_ap=per_query,
        per_landmark_ap=per_landmark,
        pr_curve=np.mean(curves, axis=0) if curves else np.full(RECALL_LEVELS.shape, np.nan),
        skipped_queries=skipped,
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan


def _percent(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else 100.0 * value
