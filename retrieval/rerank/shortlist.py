"""Re-ranking a global shortlist: spatial verification, then query expansion with verified
neighbours only.

    global search (top max(k, shortlist)) ─► verify the shortlist (matching + RANSAC)
        ─► verified images first, by inliers (DELF's re-scoring); the rest in global order
        ─► verified QE: the query averaged with its best verified neighbours, searched again;
           the final list is the verified images, then the expanded search's other results.

α-query expansion trusts the top neighbours blindly, which pulls strangers in when a query has
only one or two true matches; verified QE only averages images that passed RANSAC, so a query
without verified neighbours keeps its plain global ranking.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from retrieval.descriptors.pooling import l2_normalize
from retrieval.local_features.features import LocalFeatures
from retrieval.rerank.spatial import VerificationConfig, verify_pairs

# Chosen on oxford-dev and ukbench-56 together (README, "Re-ranking").
DEFAULT_VERIFIED_QE = 10

FeatureLookup = Callable[[str], LocalFeatures | None]


def prefetch(lookup: FeatureLookup, image_ids: set[str]) -> None:
    """Ask a lookup that can fetch many images at once (a ``LocalFeatureStore``: parallel ranged
    reads) for ``image_ids`` before they are verified one pair at a time; a plain function or a
    dict's ``get`` has nothing to prefetch."""
    fetch = getattr(lookup, "prefetch", None)
    if fetch is not None and image_ids:
        fetch(image_ids)


class GlobalIndex(Protocol):
    """What re-ranking uses of the global index (``retrieval.index.search.SearchableIndex``).

    Described here rather than imported: that index's own search applies αQE from this package
    (``query_expansion.py``), so ``rerank`` sits below ``index`` and must not import it.
    """

    ids: np.ndarray  # image id per faiss id
    uris: np.ndarray  # image URI per faiss id

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def reconstruct(self, found: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RerankConfig:
    """``verification`` None turns re-ranking off (plain global search)."""

    verification: VerificationConfig | None = field(default_factory=VerificationConfig)
    verified_qe: int = DEFAULT_VERIFIED_QE  # verified neighbours averaged into the query

    def __post_init__(self) -> None:
        if self.verified_qe < 0:
            raise ValueError("verified_qe must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.verification is not None

    def as_dict(self) -> dict[str, Any] | None:
        if self.verification is None:
            return None
        return {"verification": self.verification.as_dict(), "verified_qe": self.verified_qe}


@dataclass
class Reranked:
    """Per query: faiss ids in final order, their scores (cosine similarity to the query, or
    to the expanded query) and inliers (-1: not verified); plus what it cost."""

    found: list[np.ndarray]
    scores: list[np.ndarray]
    inliers: list[np.ndarray]
    stats: dict[str, Any]


def search_depth(index: GlobalIndex, k: int, verification: VerificationConfig) -> int:
    """How deep the global search of a re-ranked search goes (the shortlist, or ``k``)."""
    return min(max(k, verification.shortlist), index.ntotal)


def shortlist_pairs(
    index: GlobalIndex, query_ids: Sequence[str], found: np.ndarray, shortlist: int
) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """(query id, image id) pairs to verify: each query's top ``shortlist`` but itself, and
    where each sits in ``found`` (query row, rank)."""
    pairs, where = [], []
    for q, qid in enumerate(query_ids):
        for r, faiss_id in enumerate(found[q, :shortlist]):
            if faiss_id >= 0 and index.ids[faiss_id] != qid:
                pairs.append((qid, str(index.ids[faiss_id])))
                where.append((q, r))
    return pairs, where


def shortlisted_ids(
    index: GlobalIndex,
    query_ids: Sequence[str],
    queries: np.ndarray,
    k: int,
    verification: VerificationConfig,
) -> set[str]:
    """The corpus images :func:`rerank_search` would verify for these queries (the same
    search): what must have local features before it runs."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = index.search(queries, search_depth(index, k, verification))
    pairs, _ = shortlist_pairs(index, query_ids, found, verification.shortlist)
    return {image_id for _, image_id in pairs}


def rerank_search(
    index: GlobalIndex,
    query_ids: Sequence[str],
    queries: np.ndarray,
    k: int,
    config: RerankConfig,
    query_features: FeatureLookup,
    database_features: FeatureLookup,
    inlier_cache: dict[tuple[str, str], int] | None = None,
) -> Reranked:
    """Top-``k`` per query after spatial verification and verified query expansion.

    ``inlier_cache`` ((query id, image id) -> inliers) skips pairs verified before and keeps
    the new ones: variants of one evaluation share most of their shortlists.
    """
    if config.verification is None:
        raise ValueError("re-ranking needs a verification config")
    verification = config.verification
    start = time.perf_counter()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    depth = search_depth(index, k, verification)
    scores, found = index.search(queries, depth)
    pairs, where = shortlist_pairs(index, query_ids, found, verification.shortlist)
    cache = inlier_cache if inlier_cache is not None else {}
    todo = [p for p in dict.fromkeys(pairs) if p not in cache]
    verify_start = time.perf_counter()
    prefetch(query_features, {a for a, _ in todo})
    prefetch(database_features, {b for _, b in todo})
    new = verify_pairs(todo, query_features, verification, database_features)
    verify_s = time.perf_counter() - verify_start
    cache.update(zip(todo, new.tolist(), strict=True))
    counts = [cache[p] for p in pairs]
    inliers = np.full(found.shape, -1, np.int64)
    for (q, r), n in zip(where, counts, strict=True):
        inliers[q, r] = n

    out_found, out_scores, out_inliers = [], [], []
    expanded_queries = verified_queries = 0
    for q, qid in enumerate(query_ids):
        row, row_scores, row_inliers = found[q], scores[q], inliers[q]
        valid = row >= 0
        self_hit = [r for r in np.nonzero(valid)[0] if index.ids[row[r]] == qid]
        verified = [r for r in np.nonzero(row_inliers >= verification.min_inliers)[0]]
        verified.sort(key=lambda r: -row_inliers[r])  # stable: ties keep the global order
        head = self_hit + verified
        verified_queries += bool(verified)
        if verified and config.verified_qe:
            chosen = row[verified[: config.verified_qe]]
            expanded = l2_normalize(queries[q] + index.reconstruct(chosen[None])[0].sum(axis=0))
            tail_scores, tail = index.search(expanded[None].astype(np.float32), depth)
            tail_scores, tail = tail_scores[0], tail[0]
            expanded_queries += 1
        else:
            tail_scores, tail = row_scores, row
        head_ids = row[head]
        taken = set(head_ids.tolist())
        rest = [i for i, f in enumerate(tail) if f >= 0 and f not in taken]
        ids = np.concatenate([head_ids, tail[rest]])[:k]
        sims = np.concatenate([row_scores[head], tail_scores[rest]])[:k]
        by_id = {f: n for f, n in zip(row, row_inliers, strict=True) if n >= 0}
        out_found.append(ids)
        out_scores.append(sims)
        out_inliers.append(np.asarray([by_id.get(f, -1) for f in ids], np.int64))
    total_s = time.perf_counter() - start
    n = max(len(query_ids), 1)
    return Reranked(
        out_found,
        out_scores,
        out_inliers,
        {
            "queries": len(query_ids),
            "pairs_in_shortlists": len(pairs),
            "pairs_verified": len(todo),
            "queries_with_verified_results": verified_queries,
            "queries_expanded": expanded_queries,
            "verify_ms_per_pair": round(1000 * verify_s / len(todo), 2) if todo else None,
            "rerank_ms_per_query": round(1000 * total_s / n, 1),
        },
    )


def reranked_table(index: GlobalIndex, query_ids: Sequence[str], reranked: Reranked):
    """Results as a table: query_id, rank, id, uri, score, inliers (-1: not verified)."""
    import pyarrow as pa

    counts = [len(f) for f in reranked.found]
    found = np.concatenate(reranked.found).astype(np.int64) if counts else np.zeros(0, np.int64)
    return pa.table(
        {
            "query_id": pa.array(
                np.repeat(np.asarray(query_ids, dtype=object), counts), pa.string()
            ),
            "rank": pa.array(np.concatenate([np.arange(c) for c in counts] or [[]]), pa.int32()),
            "id": pa.array(index.ids[found], pa.string()),
            "uri": pa.array(index.uris[found], pa.string()),
            "score": pa.array(np.concatenate(reranked.scores or [[]]), pa.float32()),
            "inliers": pa.array(np.concatenate(reranked.inliers or [[]]), pa.int32()),
        }
    )
