"""Which faiss index to build, from the number of vectors and their dimension.

The rule, with the reasons (descriptors are L2-normalized, so the metric is inner product):

==========================  =====================================  ==============================
vectors n                   default factory string                 why
==========================  =====================================  ==============================
n <= 20,000                 ``IDMap2,Flat``                        exact search costs little;
                                                                   compression only loses mAP
20,000 < n <= 2,000,000     ``OPQ{m}_{4m},IVF{k},PQ{m}``            OPQ rotates and reduces to 4m
                                                                   dims so PQ{m} (m bytes per
                                                                   vector) loses little; k ≈ 4√n
                                                                   lists keep lists ~√n/4 long
n > 2,000,000               ``OPQ{m}_{4m},IVF{k}_HNSW32,PQ{m}``    an HNSW coarse quantizer keeps
                                                                   assignment fast with 2^16+ lists
==========================  =====================================  ==============================

``m`` is 64 (64 bytes per vector) for descriptors of 256 dimensions or more, else the largest
divisor of d/4 that faiss PQ supports. The training sample is large enough for k-means on the
lists (~50 points per list) and for the PQ codebooks, capped so training fits in memory.
"""

from __future__ import annotations

import math
import re

EXACT_MAX_VECTORS = 20_000
HNSW_COARSE_MIN_VECTORS = 2_000_000
MAX_TRAINING_SAMPLE = 200_000


def pq_bytes(d: int) -> int:
    """Bytes per vector (PQ sub-quantizers) for dimension ``d``."""
    if d >= 256:
        return 64
    m = max(1, d // 4)
    while d % m:
        m -= 1
    return m


def n_lists(n: int) -> int:
    """IVF list count: a power of two near 4·√n, between 64 and 65,536."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def default_factory(n: int, d: int) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d`` (see module doc)."""
    if n <= EXACT_MAX_VECTORS:
        return "IDMap2,Flat"
    m = pq_bytes(d)
    coarse = f"IVF{n_lists(n)}" + ("_HNSW32" if n > HNSW_COARSE_MIN_VECTORS else "")
    return f"OPQ{m}_{min(d, 4 * m)},{coarse},PQ{m}"


def compressed_factory(n: int, d: int) -> str:
    """A PQ index for any n, to show what compression costs even where the default is exact.

    Small sets cannot train 256-centroid sub-quantizers well, so below 10,000 vectors the codes
    use 4 bits (16 centroids) per sub-quantizer; the OPQ rotation (whose own training uses
    256-centroid codebooks) is added from 1,000 vectors on.
    """
    if n > EXACT_MAX_VECTORS:
        return default_factory(n, d)
    m = pq_bytes(d)
    bits = 8 if n >= 10_000 else 4
    rotation = f"OPQ{m}_{min(d, 4 * m)}," if n >= 1_000 else ""
    return f"{rotation}PQ{m}x{bits}"


def training_sample_size(factory: str, n: int) -> int:
    """How many vectors to train ``factory`` on (all of them when the set is small)."""
    match = re.search(r"IVF(\d+)", factory)
    lists = int(match.group(1)) if match else 0
    wanted = max(50 * lists, 65_536)
    return min(n, wanted, MAX_TRAINING_SAMPLE)


def needs_training(factory: str) -> bool:
    return any(token in factory for token in ("IVF", "PQ", "OPQ", "PCA", "SQ"))
