"""``retrieval evaluate``: the whole default pipeline on a benchmark folder, then a report.

    images/ ─► extract ─► train ─► index (per shard) ─► merge ─► search every query ─► metrics
                                                                                          │
    variants (exact search, PQ compression) on the same descriptors ─────────────────────┘

``results[0]`` is what the default pipeline (``retrieval search``, with α-query expansion)
answers; the other rows use the same descriptors without expansion and with another index
(exact or PQ), so the report shows what expansion gains and what compression costs.

Where the protocol defines queries as crops, or keeps query images out of the database
(Oxford5k, Paris6k, Revisited Oxford/Paris, GLDv2), the queries are described from their own
cropped images (``retrieval.evaluation.queries``). With several ``protocols`` (e.g. the
Revisited Easy, Medium and Hard), every ranking is scored under each, one row per pair.
"""

from __future__ import annotations

import csv
import io
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import stages
from pipelines.config import RunConfig
from retrieval import storage
from retrieval.evaluation import protocols as protocol_rules
from retrieval.evaluation.ground_truth import Benchmark, load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.evaluation.queries import write_query_inputs
from retrieval.evaluation.report import write_report
from retrieval.extraction import failures
from retrieval.index import factory as factories
from retrieval.index.codebook import with_id_map
from retrieval.index.search import NO_EXPANSION, SearchableIndex, load_index
from retrieval.manifests import utc_now
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.shards import descriptor_shards

log = logging.getLogger(__name__)

# Rankings are complete up to this many images (benchmarks are scored on full rankings).
MAX_RANKING = 10_000


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)


def build_index(
    descriptors: str, root: str, config: RunConfig, timings: dict[str, float], prefix: str = ""
) -> str:
    """train -> index -> merge under ``root``; returns the merged index folder."""
    codebook, shards, index = (storage.join(root, n) for n in ("codebook", "index_shards", "index"))
    with _timed(timings, f"{prefix}train_s"):
        stages.train(descriptors, codebook, config)
    with _timed(timings, f"{prefix}index_s"):
        stages.index(descriptors, codebook, shards, config)
    with _timed(timings, f"{prefix}merge_s"):
        stages.merge(shards, index, config)
    return index


def write_benchmark_listing(benchmark: Benchmark, out: str) -> str:
    """A corpus manifest (``out``/images.csv) naming each benchmark image by its ground-truth id.

    Listing ``images/`` would name images by file name (extension included); the ground truth
    names them without. The manifest gives each file its ground-truth id explicitly.
    """
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["id", "uri"])
    for image_id in benchmark.images:
        writer.writerow([image_id, "file://" + str(benchmark.image_path(image_id).resolve())])
    uri = storage.join(out, "images.csv")
    storage.write_bytes(uri, rows.getvalue().encode())
    return uri


def rank_queries(
    index: SearchableIndex,
    benchmark: Benchmark,
    vectors_by_id: dict[str, np.ndarray],
    expansion: QueryExpansion,
) -> dict[str, list[str]]:
    """Full rankings for every query; a query whose image failed gets an empty ranking.

    Query expansion skips the query's own image among its neighbours, except where the
    protocol keeps the query in its ranking (a crop's full image is a true match)."""
    query_ids = sorted({q.id for q in benchmark.queries})
    present = [q for q in query_ids if q in vectors_by_id]
    rankings: dict[str, list[str]] = {q: [] for q in query_ids}
    if present:
        queries = np.stack([vectors_by_id[q] for q in present])
        k = min(index.ntotal, MAX_RANKING)
        own_ids = None if benchmark.query_in_ranking else present
        _, found = index.search_expanded(queries, k, expansion, own_ids)
        rankings.update(zip(present, index.ranked_ids(found), strict=True))
    return rankings


def query_vectors(
    benchmark: Benchmark, database: dict[str, np.ndarray], out: str, config: RunConfig
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Query descriptors by query id, and {query id: reason} for queries without one.

    Database descriptors serve when every query is a whole database image; otherwise each
    query's own (cropped) image is written and described by the same extraction stage.
    """
    if not benchmark.needs_query_inputs:
        return database, {}
    inputs = Path(out) / "query_inputs"
    problems = write_query_inputs(benchmark, inputs)
    # A manifest names each query input by its query id (a folder listing would not).
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["id", "uri"])
    for path in sorted(inputs.glob("*.png")):
        writer.writerow([path.stem, "file://" + str(path.resolve())])
    listing = storage.join(out, "query_inputs.csv")
    storage.write_bytes(listing, rows.getvalue().encode())
    descriptors = storage.join(out, "query_descriptors")
    stages.extract(listing, descriptors, config)
    ids, _, vectors = descriptor_shards.read_all(descriptors)
    found = dict(zip(ids, vectors, strict=True))
    for error in failures(descriptors):
        problems.setdefault(error.id, f"{error.error_kind}: {error.message}")
    return found, problems


def evaluate_benchmark(
    benchmark_dir: str,
    out: str,
    config: RunConfig,
    *,
    variants: bool = True,
    protocols: list[str] | None = None,
) -> dict[str, Any]:
    """Run the default pipeline on ``benchmark_dir`` and write report.{json,md,html} to ``out``.

    With ``variants`` the report also scores exact search and PQ compression of the same
    descriptors (whichever of them is not the default). ``protocols`` (names from
    ``retrieval.evaluation.protocols``; default: the gt.json as it is) score every ranking
    under each protocol; with more than one, row names end in " [E]", " [M]", ...
    """
    benchmark = load_benchmark(benchmark_dir)
    protocols = protocols or [protocol_rules.DEFAULT]
    scored_as = {p: protocol_rules.apply(benchmark, p) for p in protocols}  # fails early
    listing = write_benchmark_listing(benchmark, out)
    descriptors = storage.join(out, "descriptors")
    timings: dict[str, float] = {}

    with _timed(timings, "extract_s"):
        extract_summary = stages.extract(listing, descriptors, config)
    default_index = build_index(descriptors, storage.join(out, "default"), config, timings)

    ids, _, vectors = descriptor_shards.read_all(descriptors)
    vectors_by_id = dict(zip(ids, vectors, strict=True))
    with _timed(timings, "queries_s"):
        queries_by_id, query_problems = query_vectors(benchmark, vectors_by_id, out, config)
    n, d = vectors.shape
    chosen = with_id_map(
        factories.default_factory(n, d) if config.index_factory == "auto" else config.index_factory
    )
    # (row name, index folder, query expansion): results[0] is the default pipeline.
    rows = [(_row_name(chosen, config.expansion), default_index, config.expansion)]
    if variants:
        if config.expansion.n:
            rows.append((_row_name(chosen, NO_EXPANSION), default_index, NO_EXPANSION))
        for factory in ("IDMap2,Flat", with_id_map(factories.compressed_factory(n, d))):
            if factory == chosen:
                continue
            root = storage.join(out, "variants", _label(factory))
            variant_config = replace(config, index_factory=factory, runner="local")
            index_dir = build_index(
                descriptors, root, variant_config, timings, f"{_label(factory)}:"
            )
            rows += [
                (_row_name(factory, e), index_dir, e)
                for e in dict.fromkeys([config.expansion, NO_EXPANSION])
            ]

    results, all_rankings = [], {}
    with _timed(timings, "search_and_score_s"):
        for name, index_dir, expansion in rows:
            index = load_index(index_dir, nprobe=config.nprobe)
            rankings = rank_queries(index, benchmark, queries_by_id, expansion)
            for protocol, scored in scored_as.items():
                metrics = evaluate_rankings(rankings, scored)
                row_name = (
                    name if len(protocols) == 1 else f"{name} [{protocol_rules.label(protocol)}]"
                )
                results.append(
                    {
                        "name": row_name,
                        "index": index.manifest["factory"],
                        "query_expansion": {"n": expansion.n, "alpha": expansion.alpha}
                        if expansion.n
                        else None,
                        "protocol": protocol,
                        **metrics.as_dict(),
                    }
                )
                all_rankings[row_name] = rankings

    report = {
        "benchmark": benchmark.name,
        "benchmark_dir": str(benchmark_dir),
        "images": len(benchmark.images),
        "queries": len(benchmark.queries),
        "accounting": {k: extract_summary[k] for k in ("inputs", "indexed", "failed")},
        "results": results,
        "model": extract_summary["model"],
        "timings": timings,
        "throughput": {
            "extract_images_per_s": round(
                extract_summary["indexed"] / max(timings["extract_s"], 1e-9), 2
            )
        },
        "failures": [asdict(e) for e in failures(descriptors)]
        + [
            {"id": q, "uri": None, "stage": "query", "error_kind": "query_input", "message": m}
            for q, m in sorted(query_problems.items())
        ],
        "config": config.as_dict(),
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "created": utc_now(),
    }
    # Thumbnails are coloured with the ground truth of the first protocol (results[0]'s).
    write_report(report, out, benchmark=scored_as[protocols[0]], rankings=all_rankings)
    return report


def _label(factory: str) -> str:
    return "exact" if factory.endswith("Flat") and "IVF" not in factory else "pq"


def _row_name(factory: str, expansion: QueryExpansion) -> str:
    return f"gem+{_label(factory)}" + ("+qe" if expansion.n else "")
