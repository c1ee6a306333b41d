"""Training the codebook: one empty, trained faiss index shared by every shard.

The training sample is drawn uniformly at random across all shards (seeded), not from the first
rows: listings are usually ordered (by landmark, date, crawl), so the first N rows are a biased
sample and the coarse quantizer would fit only part of the corpus.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from retrieval import storage
from retrieval.index import factory as factories
from retrieval.index.drift import quantization_error
from retrieval.index.faiss_io import read_index, write_index
from retrieval.manifests import read_manifest, require_same, write_manifest
from retrieval.shards import descriptor_shards
from retrieval.summary import write_summary

log = logging.getLogger(__name__)

CODEBOOK_FILE = "codebook.faissindex"
CODEBOOK_MANIFEST = "codebook.json"
CODEBOOK_KIND = "codebook"
SAMPLE_FILE = "training_sample.parquet"


def uniform_sample(total: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct positions out of ``total``, uniformly at random, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(size, total), replace=False))


def with_id_map(factory: str) -> str:
    """Shards are added under global ids; only IVF indexes store ids themselves."""
    if "IVF" in factory or factory.startswith("IDMap"):
        return factory
    return "IDMap2," + factory


def new_index(factory: str, d: int) -> faiss.Index:
    return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)


def _components(index: Any) -> Any:
    """The index and everything inside it: wrapped indexes, coarse quantizers, transforms."""
    index = faiss.downcast_index(index)
    yield index
    for attr in ("index", "quantizer"):
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            yield from _components(inner)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            yield faiss.downcast_VectorTransform(index.chain.at(i))


def _accept_small_samples(index: faiss.Index) -> None:
    """Let k-means train on fewer than faiss's recommended 39 points per centroid, quietly.

    The sample size is already chosen deliberately (``factory.training_sample_size``); on small
    corpora faiss would otherwise print one warning per sub-quantizer (64 lines for PQ64).
    """
    for part in _components(index):
        for clustering in (
            getattr(part, "cp", None),
            getattr(getattr(part, "pq", None), "cp", None),
        ):
            if clustering is not None:
                clustering.min_points_per_centroid = 1


def training_settings(factory: str, n: int, d: int) -> dict[str, int]:
    """How ``factory`` is trained on ``n`` vectors of dimension ``d`` (see ``factory.py``)."""
    return {
        "sample": factories.training_sample_size(factory, n, d),
        "opq_niter": factories.OPQ_ITERATIONS,
        "opq_points": factories.OPQ_TRAINING_POINTS,
        "opq_init": factories.OPQ_INIT,
    }


def apply_training_settings(
    index: faiss.Index, settings: dict[str, Any], sample: np.ndarray | None = None
) -> None:
    """Set the OPQ rotation's iterations and training points (faiss: 50 and 65,536) and, with
    ``opq_init == "pca"``, start it from the sample's principal axes (``pca_rotation``) instead
    of faiss's random rotation. Everything else trains with faiss's own defaults."""
    parts = list(_components(index))
    for part in parts:
        if isinstance(part, faiss.OPQMatrix):
            part.niter = settings["opq_niter"]
            part.max_train_points = settings["opq_points"]
    for part in parts:  # after the settings: the start uses the same points as the OPQ
        if isinstance(part, faiss.IndexPreTransform) and sample is not None:
            first = faiss.downcast_VectorTransform(part.chain.at(0))
            if settings.get("opq_init") == "pca" and isinstance(first, faiss.OPQMatrix):
                rotation = pca_rotation(sample[: first.max_train_points], first.d_out, first.M)
                faiss.copy_array_to_vector(rotation.ravel(), first.A)


def pca_rotation(sample: np.ndarray, d_out: int, m: int) -> np.ndarray:
    """``d_out`` × d projection onto the sample's top principal axes, grouped for ``m`` sub-
    quantizers by eigenvalue allocation (Ge et al., "Optimized Product Quantization", 2013,
    the parametric solution that the paper uses to start its iterative OPQ): axes are dealt, from
    the largest variance down, to the sub-space whose product of variances is the smallest so
    far, so every sub-quantizer gets a similar share of the variance. faiss starts OPQ from a
    random rotation instead, which needs its 50 iterations (each a d × d_out product over the
    whole sample and a PQ training) to find the high-variance sub-space at all."""
    pca = faiss.PCAMatrix(sample.shape[1], d_out)
    pca.train(np.ascontiguousarray(sample, dtype=np.float32))
    axes = faiss.vector_to_array(pca.A).reshape(-1, sample.shape[1])[:d_out]
    variances = faiss.vector_to_array(pca.eigenvalues)[:d_out]
    size = d_out // m
    buckets: list[list[int]] = [[] for _ in range(m)]
    log_products = np.zeros(m)
    for axis, variance in enumerate(variances):
        open_ = [b for b in range(m) if len(buckets[b]) < size]
        b = min(open_, key=lambda j: log_products[j])
        buckets[b].append(axis)
        log_products[b] += np.log(max(float(variance), 1e-12))
    order = [axis for bucket in buckets for axis in bucket]
    return np.ascontiguousarray(axes[order], dtype=np.float32)


def train_codebook(
    descriptors: str,
    output: str,
    *,
    factory: str = "auto",
    sample_size: int | None = None,
    seed: int = 0,
    max_index_memory: int | None = None,
    pretransform: str = "opq",
) -> dict[str, Any]:
    """Train an empty index on a uniform sample of the descriptors; write it and its manifest."""
    start = time.perf_counter()
    shard_manifests = descriptor_shards.list_shards(descriptors)
    if not shard_manifests:
        raise FileNotFoundError(f"no committed descriptor shards under {descriptors}")
    counts = [m["rows"] for m in shard_manifests]
    total, d = sum(counts), int(shard_manifests[0]["dim"])
    for m in shard_manifests[1:]:
        require_same(
            m["model"],
            shard_manifests[0]["model"],
            ("config_hash", "weights_sha256"),
            what=f"{descriptors}: shards {shard_manifests[0]['shard']} and {m['shard']} "
            "come from different models",
        )
    if total == 0:
        raise ValueError(f"{descriptors}: no descriptors to train on (every input failed)")
    if factory == "auto":
        factory = factories.choose_factory(
            total, d, max_index_memory=max_index_memory, pretransform=pretransform
        )
    factory = with_id_map(factory)
    settings = training_settings(factory, total, d)
    size = sample_size or settings["sample"]
    # The codebook is a function of these; if a committed one matches, training is skipped.
    inputs_digest = storage.sha256_bytes(
        "\n".join(descriptor_shards.shard_digest(m) for m in shard_manifests).encode()
    )
    wanted = {
        "factory": factory,
        "seed": seed,
        "sample_size": min(size, total),
        "opq_niter": settings["opq_niter"],
        "opq_init": settings["opq_init"],
        "descriptors_digest": inputs_digest,
    }
    existing = _committed_codebook(output, wanted)
    if existing is not None:
        log.info("%s: codebook already trained on these descriptors; skipping", output)
        return existing
    positions = uniform_sample(total, size, seed)

    # Walk the shards once, keeping only the sampled rows of each.
    vectors, ids = [], []
    offset = 0
    for manifest, count in zip(shard_manifests, counts, strict=True):
        local = positions[(positions >= offset) & (positions < offset + count)] - offset
        if len(local):
            shard = descriptor_shards.read_shard(descriptors, manifest)
            vectors.append(shard.vectors[local])
            ids += [shard.ids[i] for i in local]
        offset += count
    sample = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)

    index = new_index(factory, d)
    if not index.is_trained:
        _accept_small_samples(index)
        apply_training_settings(index, settings, sample)
        log.info("training %s on %d of %d vectors", factory, len(sample), total)
        index.train(sample)
    train_s = time.perf_counter() - start
    data = write_index(storage.join(output, CODEBOOK_FILE), index)
    sample_table = pa.table(
        {"position": pa.array(positions, pa.int64()), "id": pa.array(ids, pa.string())}
    )
    storage.write_parquet(storage.join(output, SAMPLE_FILE), sample_table)
    # Recorded so re-indexing can tell when new vectors no longer fit (``drift.py``).
    training_error = quantization_error(index, sample)
    body = {
        "training_quantization_error": training_error,
        "codebook_id": storage.sha256_bytes(data)[:16],
        "factory": factory,
        "metric": "inner_product",
        "dim": d,
        "vectors": total,
        "sample_size": len(sample),
        "opq_niter": settings["opq_niter"],
        "opq_init": settings["opq_init"],
        "seed": seed,
        "descriptors_digest": inputs_digest,
        "sha256": storage.sha256_bytes(data),
        "descriptors": descriptors,
        "model": shard_manifests[0]["model"],
    }
    manifest = write_manifest(storage.join(output, CODEBOOK_MANIFEST), CODEBOOK_KIND, body)
    write_summary(
        output,
        "train",
        inputs=total,
        indexed=total,
        failed=0,
        timings={"train_s": train_s},
        factory=factory,
        sample_size=len(sample),
    )
    return manifest


def _committed_codebook(output: str, wanted: dict[str, Any]) -> dict[str, Any] | None:
    uri = storage.join(output, CODEBOOK_MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = read_codebook_manifest(output)
    if any(manifest.get(key) != value for key, value in wanted.items()):
        return None
    return manifest


def read_codebook_manifest(codebook: str) -> dict[str, Any]:
    """The codebook folder's checked ``codebook.json``."""
    uri = storage.join(codebook, CODEBOOK_MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{codebook}: no {CODEBOOK_MANIFEST} (not a codebook folder; run `retrieval train`)"
        )
    return read_manifest(uri, kind=CODEBOOK_KIND)


def read_codebook(codebook: str, manifest: dict[str, Any] | None = None) -> faiss.Index:
    """The trained, empty index of a codebook folder, checked against its manifest."""
    manifest = manifest or read_codebook_manifest(codebook)
    return read_index(storage.join(codebook, CODEBOOK_FILE), expect_sha256=manifest["sha256"])


@functools.lru_cache(maxsize=2)
def _trained_index(codebook: str, sha256: str) -> faiss.Index:
    return read_codebook(codebook, {"sha256": sha256})


def load_codebook(codebook: str) -> tuple[faiss.Index, dict[str, Any]]:
    """A fresh copy of the trained, empty index and its manifest.

    The codebook is read from storage once per worker process (cached by its checksum) and
    copied in memory for each task, so a worker running many index tasks reads it once.
    """
    manifest = read_codebook_manifest(codebook)
    return faiss.clone_index(_trained_index(codebook, manifest["sha256"])), manifest
