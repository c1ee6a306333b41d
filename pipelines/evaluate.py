"""``retrieval evaluate``: the whole default pipeline on a benchmark folder, then a report.

    images/ ─► extract (GeM) ─► mine verified pairs (local features on first use) ─► learn
    whitening ─► whiten ─► train ─► index ─► merge ─► search + spatial verification (the
    shortlists' local features on first use) + verified QE ─► metrics; every step also scored
    as its own row (``global`` = the floor).

``results[0]`` is what the default pipeline answers (``retrieval search`` over the whitened
index with ``--local``); the other rows add one step at a time to ``global``, so the report
shows what each step gains, and α-query expansion and PQ compression for comparison.

Where the protocol defines queries as crops, or keeps query images out of the database
(Oxford5k, Paris6k, Revisited Oxford/Paris, GLDv2), the queries are described (global and local
features) from their own cropped images (``retrieval.evaluation.queries``). With several
``protocols`` (e.g. the Revisited Easy, Medium and Hard), every ranking is scored under each,
one row per pair.
"""

from __future__ import annotations

import csv
import io
import logging
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import job, stages
from pipelines.config import RunConfig
from pipelines.job import Bundle
from retrieval import plan as run_plan
from retrieval import shard_manifests, storage
from retrieval.evaluation import protocols as protocol_rules
from retrieval.evaluation.ground_truth import Benchmark, load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.evaluation.queries import write_query_inputs
from retrieval.evaluation.report import write_report
from retrieval.extraction import failures, summarize_local_features
from retrieval.index import factory as factories
from retrieval.index.codebook import with_id_map
from retrieval.index.search import NO_EXPANSION, SearchableIndex, load_index
from retrieval.manifests import utc_now
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.rerank.shortlist import RerankConfig, rerank_search, shortlisted_ids
from retrieval.shards import descriptor_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore
from retrieval.version_data import relative

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


@dataclass(frozen=True)
class Variant:
    """One report row: which index, whether queries are whitened, and which re-ranking."""

    name: str
    index_dir: str
    whitened: bool = False
    expansion: QueryExpansion = NO_EXPANSION
    rerank: RerankConfig | None = None


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


def rank_queries_reranked(
    index: SearchableIndex,
    benchmark: Benchmark,
    vectors_by_id: dict[str, np.ndarray],
    rerank: RerankConfig,
    store: LocalFeatureStore,
    query_store: LocalFeatureStore,
    inlier_cache: dict[tuple[str, str], int],
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Full rankings after spatial verification (and verified QE), with their costs."""
    query_ids = sorted({q.id for q in benchmark.queries})
    present = [q for q in query_ids if q in vectors_by_id]
    rankings: dict[str, list[str]] = {q: [] for q in query_ids}
    if not present:
        return rankings, {}
    queries = np.stack([vectors_by_id[q] for q in present])
    k = min(index.ntotal, MAX_RANKING)
    reranked = rerank_search(index, present, queries, k, rerank, query_store, store, inlier_cache)
    rankings.update(zip(present, index.ranked_ids_list(reranked.found), strict=True))
    return rankings, reranked.stats


def rank_with_bundle(
    searcher: job.BundleSearch,
    benchmark: Benchmark,
    vectors_by_id: dict[str, np.ndarray],
    query_store: LocalFeatureStore | None,
    inlier_cache: dict[tuple[str, str], int],
) -> tuple[dict[str, list[str]], dict[str, Any] | None]:
    """Full rankings from the bundle's own search (its whitening, re-ranking and expansion)."""
    query_ids = sorted({q.id for q in benchmark.queries})
    present = [q for q in query_ids if q in vectors_by_id]
    rankings: dict[str, list[str]] = {q: [] for q in query_ids}
    if not present:
        return rankings, None
    queries = np.stack([vectors_by_id[q] for q in present])
    k = min(searcher.index.ntotal, MAX_RANKING)
    lookup = query_store
    ranked = searcher.rank(present, queries, k, lookup, inlier_cache)
    rankings.update(zip(present, searcher.index.ranked_ids_list(ranked.found), strict=True))
    return rankings, ranked.stats or None


def rank_on_runner(
    bundle: Bundle,
    config: RunConfig,
    benchmark: Benchmark,
    queries: str,
    query_local: str | None,
    results: str,
) -> tuple[dict[str, list[str]], dict[str, Any] | None]:
    """Full rankings from the search stage on the run's runner (``job.search_bundle``: each
    shard of queries answered on a worker, reading only its shortlists' local features), read
    back from ``results``/results.parquet: the default row as ``retrieval search`` answers it."""
    query_ids = sorted({q.id for q in benchmark.queries})
    rankings: dict[str, list[str]] = {q: [] for q in query_ids}
    if not descriptor_shards.list_shards(queries):
        return rankings, None
    summary = job.search_bundle(
        bundle, queries, results, config, k=MAX_RANKING, query_local=query_local
    )
    table = storage.read_parquet(storage.join(results, "results.parquet"))
    table = table.select(["query_id", "rank", "id"]).sort_by(
        [("query_id", "ascending"), ("rank", "ascending")]
    )
    for query_id, found in zip(
        table.column("query_id").to_pylist(), table.column("id").to_pylist(), strict=True
    ):
        rankings.setdefault(query_id, []).append(found)
    return rankings, summary.get("rerank_stats")


def corpus_query_shards(descriptors: str, query_ids: set[str], target: str) -> str:
    """The query side of a benchmark whose queries are corpus images, as a descriptor folder
    the search stage reads: for each corpus shard holding queries, a reference to it keeping
    only the query rows (no descriptor copied; re-index versions share shards the same way)."""
    planned = []
    for manifest in descriptor_shards.list_shards(descriptors):
        ids = descriptor_shards.read_shard(descriptors, manifest).ids
        if query_ids.isdisjoint(ids):
            continue
        body = descriptor_shards.reference(
            relative(target, descriptors),
            manifest,
            shard_id=manifest["shard"],
            drop=[i for i in ids if i not in query_ids],
        )
        planned.append((manifest["shard"], body))
    for shard_id, body in planned:
        shard_manifests.commit(target, shard_id, body)
    shards = [run_plan.PlannedShard(i, b["rows"], b["input_digest"]) for i, b in planned]
    run_plan.write_plan(target, shards, stage="queries")
    return target


def query_vectors(
    benchmark: Benchmark,
    database: dict[str, np.ndarray],
    out: str,
    bundle: Bundle,
    config: RunConfig,
) -> tuple[dict[str, np.ndarray], dict[str, str], str | None, str | None]:
    """Query descriptors by query id, {query id: reason} for queries without one, the
    queries' local-feature folder (None when the queries are corpus images: the bundle's own)
    and their descriptor folder (None likewise: the corpus's).

    Database descriptors serve when every query is a whole database image; otherwise each
    query's own (cropped) image is written and described by the job's describe stage (the
    bundle's model), as ``retrieval search --query-images`` would.
    """
    if not benchmark.needs_query_inputs:
        return database, {}, None, None  # the queries are corpus images: the corpus's own
    written, problems = write_query_inputs(benchmark, storage.join(out, "query_inputs"))
    # A manifest names each query input by its query id (a folder listing would not).
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["id", "uri"])
    for query_id, uri in sorted(written.items()):
        local = storage.is_local(uri) and not uri.startswith("file://")
        writer.writerow([query_id, "file://" + str(Path(uri).resolve()) if local else uri])
    listing = storage.join(out, "query_inputs.csv")
    storage.write_bytes(listing, rows.getvalue().encode())
    descriptors, query_local, _ = job.describe_queries(bundle, listing, out, config)
    ids, _, vectors = descriptor_shards.read_all(descriptors)
    found = dict(zip(ids, vectors, strict=True))
    for error in failures(descriptors):
        problems.setdefault(error.id, f"{error.error_kind}: {error.message}")
    return found, problems, query_local, descriptors


def complete_for_rows(
    searcher: job.BundleSearch,
    benchmark: Benchmark,
    queries_by_id: dict[str, np.ndarray],
    whitened_by_id: dict[str, np.ndarray],
    rows: Sequence[tuple[Variant, SearchableIndex]],
    queries_in_corpus: bool,
) -> dict[str, Any]:
    """First use, before the report's searches: the local features of every image the default
    row and the re-ranked variant rows will verify (each row's own shortlists, on the index
    that row is scored on), and of the queries when they are corpus images, computed in one
    request on the runner's workers."""
    present = sorted(q for q in {q.id for q in benchmark.queries} if q in queries_by_id)
    if not present:
        return {}
    raw = np.stack([queries_by_id[q] for q in present])
    k = min(searcher.index.ntotal, MAX_RANKING)
    wanted = searcher.shortlisted(present, raw, k)
    for variant, index in rows:
        if variant.rerank is None or variant.rerank.verification is None:
            continue
        by_id = whitened_by_id if variant.whitened else queries_by_id
        vectors = np.stack([by_id[q] for q in present])
        wanted |= shortlisted_ids(
            index, present, vectors, min(index.ntotal, MAX_RANKING), variant.rerank.verification
        )
    if queries_in_corpus:
        wanted.update(present)
    return searcher.complete(wanted, label="evaluate: local features")


def default_row_name(bundle: Bundle, config: RunConfig) -> str:
    """The default pipeline's steps, as the report names them (``global+lw+sv+vqe``)."""
    steps = ["global"] + (["lw"] if bundle.whitening else [])
    if bundle.verifies and config.rerank.enabled:
        steps += ["sv"] + (["vqe"] if config.verified_qe else [])
    if config.expansion.n:
        steps.append("aqe")
    return "+".join(steps)


def evaluate_benchmark(
    benchmark_dir: str,
    out: str,
    config: RunConfig,
    *,
    variants: bool = True,
    protocols: list[str] | None = None,
) -> dict[str, Any]:
    """Run the default job (``pipelines.job``) on ``benchmark_dir`` and write report.{json,md,
    html} to ``out``.

    ``results[0]`` is the default pipeline: the job's bundle (in ``out``) searched with its
    defaults (:class:`~pipelines.job.BundleSearch`, what ``retrieval search --index OUT``
    answers). The row ``global`` is the floor: the raw descriptors, exact search, nothing else.
    With ``variants`` every step also gets its own row, over the same artefacts, plus α-query
    expansion and PQ compression for comparison. ``protocols`` (names from
    ``retrieval.evaluation.protocols``; default: the gt.json as it is) score every ranking
    under each protocol; with more than one, row names end in " [E]", " [M]", ...
    """
    benchmark = load_benchmark(benchmark_dir)
    if not benchmark.queries:  # refused before the job runs, not as a division by zero after it
        raise ValueError(f"{benchmark_dir}: gt.json has no queries: there is nothing to evaluate")
    protocols = protocols or [protocol_rules.DEFAULT]
    scored_as = {p: protocol_rules.apply(benchmark, p) for p in protocols}  # fails early
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="retrieval-listing-") as scratch:
        # The listing names the benchmark's files on this machine, and a manifest read from
        # object storage may not (retrieval.corpus.resolve_manifest_uri): with the output in a
        # bucket, the listing stays here, beside the launcher that reads it.
        listing = write_benchmark_listing(benchmark, out if storage.is_local(out) else scratch)
        built = job.run_index_job(listing, out, config)
    timings.update(built["timings"])
    extract_summary = built["summaries"]["extract"]
    learning = built["learning"]
    bundle = job.Bundle.read(out)
    layout = job.JobLayout(out)
    descriptors = layout.descriptors
    ids, _, vectors = descriptor_shards.read_all(descriptors)
    vectors_by_id = dict(zip(ids, vectors, strict=True))
    with _timed(timings, "queries_s"):
        queries_by_id, query_problems, query_local, query_descriptors = query_vectors(
            benchmark, vectors_by_id, out, bundle, config
        )
    searcher = job.BundleSearch(bundle, bundle.config(config))
    n, d = vectors.shape
    chosen = searcher.index.manifest["factory"]
    exact = "IDMap2,Flat"
    variants_dir = storage.join(out, "variants")
    global_index = (
        bundle.index
        if chosen == exact and bundle.whitening is None
        else build_index(
            descriptors,
            storage.join(variants_dir, "global"),
            replace(config, index_factory=exact, runner="local"),
            timings,
            "global:",
        )
    )
    whitened = bundle.whitening is not None
    rerank = searcher.rerank if searcher.store is not None else None
    default_name = default_row_name(bundle, searcher.config)
    rows = [Variant("global", global_index)]  # the floor, always scored
    if variants:
        if whitened:
            rows.append(Variant("global+lw", bundle.index, True))
        if rerank is not None:
            sv_only = replace(rerank, verified_qe=0)
            rows.append(Variant("global+sv", global_index, rerank=sv_only))
            if rerank.verified_qe:
                rows.append(Variant("global+sv+vqe", global_index, rerank=rerank))
            if whitened and rerank.verified_qe:
                rows.append(Variant("global+lw+sv", bundle.index, True, rerank=sv_only))
        rows.append(Variant("global+aqe", global_index, expansion=QueryExpansion(n=3, alpha=3.0)))
        pq = with_id_map(factories.compressed_factory(n, d))
        if pq != chosen:
            pq_config = replace(config, index_factory=pq, runner="local")
            pq_dir = build_index(
                descriptors, storage.join(variants_dir, "pq"), pq_config, timings, "pq:"
            )
            rows.append(Variant("global+pq", pq_dir))
    rows = [r for r in rows if r.name != default_name]  # the default row is scored first
    # Each index the variants use, loaded once: first use asks for the rows' shortlists on the
    # index each is then scored on.
    loaded = {
        d: load_index(d, nprobe=config.nprobe) for d in dict.fromkeys(r.index_dir for r in rows)
    }
    indexed_rows = [(r, loaded[r.index_dir]) for r in rows]

    store = searcher.store
    query_store = None
    if store is not None:
        query_store = store if query_local is None else LocalFeatureStore(query_local)
    whitened_by_id = {}
    if searcher.whitening is not None and queries_by_id:
        query_ids = list(queries_by_id)
        whitened_vectors = searcher.whitening.apply(np.stack([queries_by_id[q] for q in query_ids]))
        whitened_by_id = dict(zip(query_ids, whitened_vectors, strict=True))
    inlier_cache: dict[tuple[str, str], int] = {}
    results, all_rankings = [], {}
    first_use = None
    if bundle.first_use_root is not None and store is not None:
        with _timed(timings, "local_features_first_use_s"):
            first_use = complete_for_rows(
                searcher,
                benchmark,
                queries_by_id,
                whitened_by_id,
                indexed_rows,
                query_local is None,
            )

    def score(name: str, index: SearchableIndex, rankings, rerank_stats, search_s, expansion, rr):
        for protocol, scored in scored_as.items():
            metrics = evaluate_rankings(rankings, scored)
            row_name = name if len(protocols) == 1 else f"{name} [{protocol_rules.label(protocol)}]"
            results.append(
                {
                    "name": row_name,
                    "index": index.manifest["factory"],
                    "whitening": index.manifest["model"].get("whitening"),
                    "query_expansion": {"n": expansion.n, "alpha": expansion.alpha}
                    if expansion.n
                    else None,
                    "rerank": rr.as_dict() if rr else None,
                    "rerank_stats": rerank_stats,
                    "search_s": search_s,
                    "protocol": protocol,
                    **metrics.as_dict(),
                }
            )
            all_rankings[row_name] = rankings

    with _timed(timings, "search_and_score_s"):
        # results[0]: the bundle answering with its own defaults, as `retrieval search` does.
        row_start = time.perf_counter()
        if config.runner == "local":
            rankings, stats = rank_with_bundle(
                searcher, benchmark, queries_by_id, query_store, inlier_cache
            )
        else:  # the search stage on the runner's workers, as `retrieval search` runs it
            if query_descriptors is None:
                wanted = {q.id for q in benchmark.queries}
                query_descriptors = corpus_query_shards(
                    descriptors, wanted, layout.query_descriptors
                )
            rankings, stats = rank_on_runner(
                bundle,
                searcher.config,
                benchmark,
                query_descriptors,
                query_local if searcher.store is not None else None,
                layout.results,
            )
        score(
            default_name,
            searcher.index,
            rankings,
            stats,
            round(time.perf_counter() - row_start, 3),
            searcher.config.expansion,
            rerank if query_store is not None else None,
        )
        for variant, index in indexed_rows:
            vectors_for_queries = whitened_by_id if variant.whitened else queries_by_id
            row_start = time.perf_counter()
            rerank_stats = None
            if variant.rerank is not None and store is not None and query_store is not None:
                rankings, rerank_stats = rank_queries_reranked(
                    index,
                    benchmark,
                    vectors_for_queries,
                    variant.rerank,
                    store,
                    query_store,
                    inlier_cache,
                )
            else:
                rankings = rank_queries(index, benchmark, vectors_for_queries, variant.expansion)
            search_s = round(time.perf_counter() - row_start, 3)
            score(
                variant.name,
                index,
                rankings,
                rerank_stats,
                search_s,
                variant.expansion,
                variant.rerank,
            )

    local_summary = extract_summary.get("local_features") or {}
    if bundle.first_use_root is not None:  # the images that needed them: mined or shortlisted
        layers = bundle.local_features or []
        made = summarize_local_features(layers, bundle.record["local_model"]) if layers else {}
        local_summary = {
            "at": "first-use",
            **made,
            "share_of_corpus": round(made.get("rows", 0) / max(len(ids), 1), 4),
            "search_request": first_use,
        }
    mining = learning.get("mining") or {}
    default_stats = results[0].get("rerank_stats") or {}
    timings.update(
        {
            "local_features_images_per_s_per_core": local_summary.get("images_per_s_per_core"),
            "local_features_bytes_per_image": local_summary.get("bytes_per_image"),
            "mining_s": mining.get("mining_s"),
            "mining_ms_per_image": mining.get("ms_per_sampled_image"),
            "mined_pairs_proposed": mining.get("proposed_pairs"),
            "mined_pairs_verified": mining.get("verified_pairs"),
            "rerank_ms_per_query": default_stats.get("rerank_ms_per_query"),
            "verify_ms_per_pair": default_stats.get("verify_ms_per_pair"),
        }
    )
    report = {
        "benchmark": benchmark.name,
        "benchmark_dir": str(benchmark_dir),
        "images": len(benchmark.images),
        "queries": len(benchmark.queries),
        "accounting": {k: extract_summary[k] for k in ("inputs", "indexed", "failed")},
        "results": results,
        "model": extract_summary["model"],
        "local_features": local_summary or None,
        "learning": learning,
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
        "bundle": out,
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "created": utc_now(),
    }
    # Thumbnails are coloured with the ground truth of the first protocol (results[0]'s).
    write_report(report, out, benchmark=scored_as[protocols[0]], rankings=all_rankings)
    return report
