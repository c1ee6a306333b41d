"""Mining matching pairs in a corpus without labels: global kNN proposes, spatial verification
disposes.

Each image of a seeded sample proposes its ``neighbours`` nearest images by global descriptor;
every distinct unordered pair is verified by local-feature matching + RANSAC, and the pairs
with at least ``min_inliers`` inliers are kept. Two photos that agree on hundreds of local
features under one homography show the same thing, so the kept pairs are trustworthy positives
(as in "CNN Image Retrieval Learns from BoW", Radenović et al. 2016). No ground truth is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from retrieval.local_features.features import LocalFeatures
from retrieval.rerank.spatial import VerificationConfig, verify_pairs


@dataclass(frozen=True)
class MiningConfig:
    neighbours: int = 10  # global nearest neighbours proposed per sampled image
    min_inliers: int = 20  # a proposed pair with at least this many inliers is a match
    sample_size: int = 5000  # images that propose pairs (seeded sample on larger corpora)
    seed: int = 0
    min_pairs: int = 20  # fewer verified pairs: too little to learn from (learning is skipped)

    def __post_init__(self) -> None:
        if self.neighbours < 1 or self.min_inliers < 4 or self.sample_size < 1:
            raise ValueError("mining needs neighbours >= 1, min_inliers >= 4, sample_size >= 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MinedPairs:
    """Verified pairs as (m, 2) row indices into the corpus, their inliers, and the costs."""

    pairs: np.ndarray
    inliers: np.ndarray
    stats: dict[str, Any]


def propose_pairs(vectors: np.ndarray, config: MiningConfig) -> np.ndarray:
    """Distinct unordered (i, j), i < j, pairs from the kNN of a seeded sample of rows."""
    n = len(vectors)
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(n, size=min(config.sample_size, n), replace=False))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    k = min(config.neighbours + 1, n)
    _, found = index.search(np.ascontiguousarray(vectors[sample], np.float32), k)
    keep = (found >= 0) & (found != sample[:, None])
    # At most ``neighbours`` per image: the first k - 1 that are not the image itself.
    keep &= np.cumsum(keep, axis=1) <= config.neighbours
    a = np.broadcast_to(sample[:, None], found.shape)[keep]
    pairs = np.sort(np.stack([a, found[keep]], axis=1), axis=1)
    return np.unique(pairs, axis=0)


FeatureLookup = Callable[[str], LocalFeatures | None]


def mine_pairs(
    ids: Sequence[str],
    vectors: np.ndarray,
    features: FeatureLookup | None,
    config: MiningConfig,
    verification: VerificationConfig,
    *,
    provide: Callable[[list[str]], FeatureLookup] | None = None,
) -> MinedPairs:
    """Propose pairs by global kNN and keep the spatially verified ones.

    ``provide``: given the ids the proposed pairs name, returns the lookup to verify them with
    (local features computed on first use: only those images ever pay for them); it replaces
    ``features``."""
    start = time.perf_counter()
    proposed = propose_pairs(vectors, config)
    needed = [ids[i] for i in np.unique(proposed)]
    local_s = 0.0
    if provide is not None:
        local_start = time.perf_counter()
        features = provide(needed)
        local_s = time.perf_counter() - local_start
    if features is None:
        raise ValueError("mining needs local features (a lookup, or a way to provide one)")
    verify_start = time.perf_counter()
    inliers = verify_pairs([(ids[i], ids[j]) for i, j in proposed], features, verification)
    verify_s = time.perf_counter() - verify_start
    keep = inliers >= config.min_inliers
    sampled = min(config.sample_size, len(ids))
    total_s = time.perf_counter() - start
    return MinedPairs(
        proposed[keep],
        inliers[keep],
        {
            "images": len(ids),
            "sampled_images": sampled,
            "proposed_pairs": len(proposed),
            "verified_pairs": int(keep.sum()),
            "images_in_pairs": len(np.unique(proposed[keep])),
            "images_proposed": len(needed),  # what needs local features
            "local_features_s": round(local_s, 3),  # computing them on first use
            "mining_s": round(total_s, 3),
            "verify_ms_per_pair": round(1000 * verify_s / max(len(proposed), 1), 2),
            "ms_per_sampled_image": round(1000 * total_s / max(sampled, 1), 2),
            "config": config.as_dict(),
        },
    )
