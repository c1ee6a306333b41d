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
divisor of d/4 that faiss PQ supports.

**A memory budget** (``--max-index-memory``, :func:`choose_factory`) picks the largest code that
fits: the index costs about ``n × (bytes per vector)`` plus the codebook, where a vector costs
``4d + 8`` bytes exact (float32 + id) and ``m + 8`` bytes in IVF-PQ (code + id in its list), and
the codebook ``4 × (k + 256 + d) × d'`` bytes for ``k`` coarse centroids, the PQ centroids and
the d → d' rotation. The exact index is kept up to 20,000 vectors while it fits; otherwise ``m``
steps down through 128, 112, 96, 80, 64, 48, 32, 24, 16, 12, 8, 4 (at most twice the default
``m``; steps of 16 bytes down to 32, so a budget is not left a quarter or a third unused for
want of a size between 64 and 128), and for each ``m`` the rotation keeps 4, then 3, then 2
dimensions per code byte (d' = 4m, 3m, 2m) before the code shrinks; a budget below ``n × 12``
bytes is refused with the figure needed. A budget is a request to use that memory for
accuracy, as autofaiss reads it too. Why narrow the rotation before shrinking the code: every
vector's error depends on its code's bytes, while the dimensions the rotation drops are the
ones of least variance (the sample's principal axes come first), and CNN global descriptors
keep their retrieval quality when reduced to a few hundred dimensions (Babenko & Lempitsky
2015; Radenović et al. 2018 whiten to 512 and fewer); at small n the rotation and centroids
are a large share of the budget, and narrowing them is what lets a larger code fit. Measured
on the index benchmark's 100k × 1280-d vectors in 16 MiB (one benchmark, synthetic: real GeM
descriptors mixed plus noise): ``OPQ96_384,PQ96`` (the rule before) recall@10 0.509,
``OPQ112_448,PQ112`` (4 dims per byte, finer steps) 0.529, ``OPQ128_256,PQ128`` (the rule now)
0.542; search time falls with d'. **The pre-transform** before IVF-PQ is OPQ (rotation learned
with the PQ, the default), PCA (``PCAR{4m}``: cheaper to train, a little less accurate) or none.

**The training sample** follows faiss's own guidance: k-means wants at least 39 and uses at
most 256 training points per centroid, so the sample is 64 points per IVF list, and at least
65,536 (256 × 256, what faiss's PQ and OPQ training use for 256-centroid sub-quantizers), capped
at 1 GiB of float32 vectors; all vectors when there are fewer.

**OPQ training** (``codebook.apply_training_settings``) was where the build time went: faiss's
``OPQMatrix`` starts from a random rotation and runs 50 iterations, each a d × 4m product over
up to 65,536 points and a PQ training of m sub-quantizers (at 1280-d, 64 bytes: an estimated
~14 CPU-s per iteration on this project's 2-core machine, ~12 CPU-minutes in all). Here the
rotation is the sample's principal axes grouped by eigenvalue allocation (Ge et al. 2013's
parametric OPQ, the start that paper uses for its iterative OPQ), computed in a few CPU-seconds,
and ``OPQ_ITERATIONS`` = 0 iterations of faiss's OPQ follow. Held-out squared error of the
OPQ64_256,PQ64 codec trained on 20,001 of the index benchmark's 1280-d vectors
(``benchmarks/codebook_training.py --codec-only``): this start alone 0.1645; it plus 4
iterations 0.1673 (iterating fits the sample, not the held-out vectors); faiss's random start
plus 4 iterations 0.1803, plus its default 50 iterations 0.1765 (3.2× the CPU time).
"""

from __future__ import annotations

import math
import re

EXACT_MAX_VECTORS = 20_000
HNSW_COARSE_MIN_VECTORS = 2_000_000
MAX_TRAINING_BYTES = 1 << 30
POINTS_PER_LIST = 64
PQ_TRAINING_POINTS = 65_536
OPQ_ITERATIONS = 0
OPQ_TRAINING_POINTS = 65_536
OPQ_INIT = "pca"
CODE_LADDER = (128, 112, 96, 80, 64, 48, 32, 24, 16, 12, 8, 4)
# Dimensions kept per code byte by the OPQ/PCA pre-transform, widest first: under a memory budget
# the rotation narrows before the code shrinks (see the module doc).
DIMS_PER_BYTE = (4, 3, 2)
ID_BYTES = 8
PRETRANSFORMS = ("opq", "pca", "none")


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


def default_factory(n: int, d: int, *, pretransform: str = "opq", m: int | None = None) -> str:
    """The default faiss factory string for ``n`` vectors of dimension ``d`` (see module doc)."""
    if n <= EXACT_MAX_VECTORS:
        return "IDMap2,Flat"
    return ivf_pq_factory(n, d, m or pq_bytes(d), pretransform)


def ivf_pq_factory(
    n: int, d: int, m: int, pretransform: str = "opq", *, dims_per_byte: int = 4
) -> str:
    if pretransform not in PRETRANSFORMS:
        raise ValueError(f"pretransform must be one of {PRETRANSFORMS}, not {pretransform!r}")
    coarse = f"IVF{n_lists(n)}" + ("_HNSW32" if n > HNSW_COARSE_MIN_VECTORS else "")
    out = min(d, dims_per_byte * m)
    prefix = {"opq": f"OPQ{m}_{out},", "pca": f"PCAR{out},", "none": ""}[pretransform]
    return f"{prefix}{coarse},PQ{m}"


def estimated_bytes(factory: str, n: int, d: int) -> int:
    """About how much memory an index of ``n`` vectors takes (codes, ids, codebook)."""
    lists = re.search(r"IVF(\d+)", factory)
    if factory.endswith("Flat") and not lists:
        return n * (4 * d + ID_BYTES)
    m = int(re.search(r"PQ(\d+)", factory).group(1))
    k = int(lists.group(1)) if lists else 0
    transform = re.search(r"(?:OPQ\d+_|PCAR?)(\d+)", factory)
    inner = min(d, int(transform.group(1))) if transform else d
    codebook = 4 * (k * inner + 256 * inner + (d * inner if inner != d else 0))
    return n * (m + ID_BYTES) + codebook


def choose_factory(
    n: int, d: int, *, max_index_memory: int | None = None, pretransform: str = "opq"
) -> str:
    """The default factory for ``n`` × ``d`` vectors within ``max_index_memory`` bytes."""
    if max_index_memory is None:
        return default_factory(n, d, pretransform=pretransform)
    if n <= EXACT_MAX_VECTORS and estimated_bytes("IDMap2,Flat", n, d) <= max_index_memory:
        return "IDMap2,Flat"
    for m in (c for c in CODE_LADDER if _code_fits_dimension(c, d, pretransform)):
        if n <= EXACT_MAX_VECTORS:
            candidates = [compressed_factory(n, d, m=m, pretransform=pretransform)]
        else:
            narrowing = DIMS_PER_BYTE if pretransform != "none" else DIMS_PER_BYTE[:1]
            candidates = [
                ivf_pq_factory(n, d, m, pretransform, dims_per_byte=per)
                for per in narrowing
                if per == narrowing[0] or per * m < d  # narrower than d, else the same string
            ]
        for factory in candidates:
            if estimated_bytes(factory, n, d) <= max_index_memory:
                return factory
    need = estimated_bytes(ivf_pq_factory(n, d, CODE_LADDER[-1], pretransform), n, d)
    raise ValueError(
        f"{n:,} vectors of {d} dimensions need at least {need:,} bytes of index; "
        f"--max-index-memory is {max_index_memory:,}"
    )


def _code_fits_dimension(m: int, d: int, pretransform: str) -> bool:
    """Up to twice the default code (4 dims per byte at most), in whole sub-vectors."""
    if m > 2 * pq_bytes(d):
        return False
    return d % m == 0 if pretransform == "none" else min(d, 4 * m) % m == 0


def parse_bytes(text: str | int) -> int:
    """``"16M"``, ``"2G"``, ``"500k"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def compressed_factory(n: int, d: int, *, m: int | None = None, pretransform: str = "opq") -> str:
    """A PQ index for any n, to show what compression costs even where the default is exact.

    Small sets cannot train 256-centroid sub-quantizers well, so below 10,000 vectors the codes
    use 4 bits (16 centroids) per sub-quantizer; the OPQ rotation (whose own training uses
    256-centroid codebooks) is added from 1,000 vectors on.
    """
    if n > EXACT_MAX_VECTORS:
        return default_factory(n, d)
    m = m or pq_bytes(d)
    bits = 8 if n >= 10_000 else 4
    rotation = f"OPQ{m}_{min(d, 4 * m)}," if n >= 1_000 and pretransform == "opq" else ""
    return f"{rotation}PQ{m}x{bits}"


def training_sample_size(factory: str, n: int, d: int = 1280) -> int:
    """How many vectors to train ``factory`` on, as faiss recommends (see module doc)."""
    match = re.search(r"IVF(\d+)", factory)
    lists = int(match.group(1)) if match else 0
    wanted = max(POINTS_PER_LIST * lists, PQ_TRAINING_POINTS)
    return min(n, wanted, MAX_TRAINING_BYTES // (4 * d))


def needs_training(factory: str) -> bool:
    return any(token in factory for token in ("IVF", "PQ", "OPQ", "PCA", "SQ"))
