"""The stages of the indexing pipeline, each run on the chosen runner.

Each function plans with ``retrieval`` (what exists, what is left to do), hands the pending
shards to a runner (in-process loop, or Beam), then checks the result and writes the stage's
``summary.json``. Runners only decide where the core functions run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from pipelines import runners
from pipelines.config import RunConfig
from pipelines.runners import WorkerTask
from retrieval import leases, local_feature_cache, storage, versions
from retrieval.descriptors.gem import model_info, prepare_runtime
from retrieval.extraction import (
    LocalShardJob,
    ShardJob,
    decode_sides,
    plan_extraction,
    summarize_extraction,
)
from retrieval.index import group_index
from retrieval.index.codebook import train_codebook
from retrieval.index.merge import MergeTask, finish_merge, plan_merge, run_merge_task
from retrieval.index.search import DEFAULT_NPROBE, NO_EXPANSION, load_index
from retrieval.learning.mining import mine_pairs
from retrieval.learning.whitening import (
    InsufficientPairsError,
    learn_whitening,
    query_whitening,
    save_whitening,
    whiten_descriptor_folder,
)
from retrieval.local_feature_cache import FirstUse
from retrieval.local_features.extractor import local_info_for
from retrieval.plan import read_plan
from retrieval.redaction import sealing_key
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.rerank.shortlist import RerankConfig, rerank_search, reranked_table
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore
from retrieval.summary import format_accounting, write_summary

log = logging.getLogger(__name__)


class ExtractShards(WorkerTask):
    """Extraction on a runner's workers: each item a planned shard id, extracted and committed
    by ``ShardJob.run`` with the worker's models (built once per worker)."""

    def __init__(self, job: ShardJob):
        self.job = job

    def setup(self) -> Any:
        return self.job.build_models()

    def setup_key(self) -> Hashable:
        return (self.job.config, self.job.worker, self.job.local)

    def prepare_in_launcher(self) -> None:
        prepare_runtime(self.job.config)

    def run(self, state: Any, item: str) -> None:
        self.job.run(item, *state)


class ExtractLocalShards(WorkerTask):
    """First-use local features on a runner's workers: each item a planned shard of a layer,
    computed and committed by ``LocalShardJob.run`` with the worker's extractor."""

    def __init__(self, job: LocalShardJob):
        self.job = job

    def setup(self) -> Any:
        return self.job.build_model()

    def setup_key(self) -> Hashable:
        return ("local", self.job.local, self.job.worker)

    def run(self, state: Any, item: str) -> None:
        self.job.run(item, state)


class BuildIndexGroups(WorkerTask):
    """Index building on a runner's workers: each item an index group task, encoded and
    committed to ``output`` (the codebook is loaded once per worker by the core)."""

    def __init__(self, output: str):
        self.output = output

    def run(self, state: Any, item: group_index.IndexGroupTask) -> None:
        group_index.build_group_index(item, self.output)


class RunMergeTasks(WorkerTask):
    """One merge task per item (``retrieval.index.merge.run_merge_task``)."""

    def run(self, state: Any, item: MergeTask) -> None:
        run_merge_task(item)


def extract(
    source: str, output: str, config: RunConfig, *, local_output: str | None = None
) -> dict[str, Any]:
    """List ``source``, describe every image not yet in a committed shard, summarize.

    With ``local_output`` (and local features not turned off in ``config``) the same pass
    also extracts local features into their own shards there.
    """
    local_output = local_output if config.local.enabled else None
    # One writer per output: a second run into the same folders (another corpus, say) would
    # replace this one's plan and shards under it, and one of the two would report counts the
    # folders do not hold.
    with leases.hold_all(
        [output, local_output], what="retrieval extract", wait_s=config.lease_wait
    ) as held:
        return _extract(source, output, config, local_output, held)


def _extract(
    source: str,
    output: str,
    config: RunConfig,
    local_output: str | None,
    held: list[leases.Lease],
) -> dict[str, Any]:
    start = time.perf_counter()
    info = model_info(config.gem)
    local_config = config.local if config.local.enabled and local_output else None
    local_info = local_info_for(local_config) if local_config else None
    local_output = local_output if local_config else None
    plan = plan_extraction(
        source,
        output,
        info,
        shard_size=config.shard_size,
        local_output=local_output,
        local_info=local_info,
    )
    storage.makedirs(output)
    run_start = time.perf_counter()
    if plan.pending:
        # Every runner runs the same ShardJob; only the worker plan (cores per model) differs.
        runner = runners.runner_for(config)
        job = ShardJob(
            plan.output,
            config.gem,
            info,
            config.limits,
            runner.worker_plan(config.gem.max_side),
            local=local_config,
            local_output=local_output,
            local_info=local_info,
            sealing_key=sealing_key(),
        )
        runner.map(
            ExtractShards(job),
            plan.pending_ids,
            label="extract",
            progress_dir=plan.output,
            already=len(plan.shards) - len(plan.pending),
        )
    timings = {"extract_s": time.perf_counter() - run_start, "total_s": time.perf_counter() - start}
    for lease in held:  # a run whose lease was taken over reports nothing
        lease.check()
    summary = summarize_extraction(
        plan, info, timings, local_output=local_output, local_info=local_info
    )
    log.info(format_accounting(summary))
    return summary


# How long a first-use request waits for another run computing the same images (its layer's
# lease) before it stops with one line naming that run.
FIRST_USE_LEASE_WAIT_S = 3600.0


def complete_local_features(
    first_use: FirstUse, descriptors: str, ids: Iterable[str], config: RunConfig, *, label: str
) -> dict[str, Any]:
    """First use: compute the local features of those of ``ids`` that no layer of
    ``first_use`` has yet (a new layer under its root, on the run's runner;
    ``retrieval/local_feature_cache.py``) and return what the request came to.
    ``descriptors``: the corpus's descriptor folder, whose plans say where each image is read
    from."""
    start = time.perf_counter()
    request = local_feature_cache.plan_request(first_use, descriptors, ids)
    record: dict[str, Any] = {
        "requested": request.requested,
        "cached": request.cached,
        "failed_before": request.failed_before,
        "not_in_corpus": len(request.unknown),
        "computed": 0,
        "failed": 0,
    }
    if request.layer is not None:
        local_info = local_info_for(config.local)
        # Another run holding this layer's lease is computing exactly these images: wait for
        # it (then nothing is left to do) rather than stop.
        wait_s = max(config.lease_wait, FIRST_USE_LEASE_WAIT_S)
        with leases.hold(request.layer, what="retrieval local features", wait_s=wait_s):
            pending = local_feature_cache.write_layer_plan(
                request, descriptors, config.shard_size, local_info
            )
            runner = runners.runner_for(config, items=len(pending))
            side, _ = decode_sides(config.gem, config.local.image_size)
            job = LocalShardJob(
                request.layer,
                config.local,
                local_info,
                config.limits,
                runner.worker_plan(side),
                side,
                sealing_key=sealing_key(),
            )
            if pending:  # none: the run that held the lease before this one made them all
                runner.map(
                    ExtractLocalShards(job),
                    pending,
                    label=label,
                    progress_dir=request.layer,
                    already=len(read_plan(request.layer).shards) - len(pending),
                )
            made = local_feature_shards.list_shards(request.layer)  # all committed, or raises
        mine = set(pending)
        here = [m for m in made if m["shard"] in mine]  # the rest: an earlier run's
        record["computed"] = sum(m["rows"] for m in here)
        record["failed"] = sum(m["errors"] for m in here)
        record["layer"] = request.layer
        if record["failed"]:
            log.warning(
                "%s: %d of %d images have no local features (error rows in %s)",
                label,
                record["failed"],
                request.to_compute,
                request.layer,
            )
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def train(descriptors: str, output: str, config: RunConfig) -> dict[str, Any]:
    return train_codebook(
        descriptors,
        output,
        factory=config.index_factory,
        sample_size=config.sample_size,
        seed=config.seed,
        max_index_memory=config.max_index_memory,
        pretransform=config.pretransform,
    )


def index(descriptors: str, codebook: str, output: str, config: RunConfig) -> dict[str, Any]:
    """Encode groups of descriptor shards with the codebook (skipping groups already built)."""
    start = time.perf_counter()
    tasks = group_index.plan_index_groups(descriptors, codebook, group_vectors=config.group_vectors)
    group_index.write_index_plan(tasks, output)
    todo = group_index.pending(tasks, output)
    runners.runner_for(config, items=len(todo)).map(
        BuildIndexGroups(output),
        todo,
        label="index",
        progress_dir=output,
        already=len(tasks) - len(todo),
    )
    return group_index.summarize_index_groups(
        tasks, output, len(tasks) - len(todo), {"index_s": time.perf_counter() - start}
    )


def merge(shards: str, output: str, config: RunConfig | None = None) -> dict[str, Any]:
    """Merge the index groups in rounds of bounded fan-in into one index or N pieces."""
    config = config or RunConfig(runner="local")
    start = time.perf_counter()
    rounds = plan_merge(
        shards, output, fan_in=config.fan_in, pieces=config.pieces, on_disk=config.on_disk
    )
    storage.makedirs(output)
    runner = runners.runner_for(config, items=sum(len(r) for r in rounds))
    runner.map_rounds(RunMergeTasks(), rounds, label="merge")
    return finish_merge(shards, output, rounds, {"merge_s": time.perf_counter() - start})


def search(
    index_dir: str,
    queries: str,
    output: str,
    *,
    k: int = 100,
    nprobe: int | None = None,
    expansion: QueryExpansion = NO_EXPANSION,
    rerank: RerankConfig | None = None,
    local: str | None = None,
    query_local: str | None = None,
) -> dict[str, Any]:
    """Top-``k`` results for every descriptor under ``queries`` -> ``output``/results.parquet.

    Query descriptors of the index's base model are whitened first when the index holds
    whitened descriptors. With ``rerank`` and the database's local features ``local`` (and the
    queries' ``query_local``, default ``local``), the shortlist is spatially verified and
    expanded with verified neighbours; results then carry each image's inlier count.
    """
    start = time.perf_counter()
    index_dir = versions.resolve_index(index_dir)  # a versioned root: follow CURRENT
    index = load_index(index_dir, nprobe=nprobe or DEFAULT_NPROBE)
    query_manifests = descriptor_shards.list_shards(queries)
    whitening = query_whitening(index.manifest["model"], [m["model"] for m in query_manifests])
    if whitening is None:
        index.check_query_model(query_manifests)
    query_ids, _, vectors = descriptor_shards.read_all(queries)
    if whitening is not None:
        vectors = whitening.apply(vectors)
    rerank_stats = None
    if rerank is not None and rerank.enabled and local:
        # A job's local_features/ holds first-use layers, an extract run's folder its shards.
        database = LocalFeatureStore(local_feature_cache.folders(local))
        query_store = database if not query_local or query_local == local else None
        query_store = query_store or LocalFeatureStore(local_feature_cache.folders(query_local))
        reranked = rerank_search(index, query_ids, vectors, k, rerank, query_store, database)
        table = reranked_table(index, query_ids, reranked)
        rerank_stats = reranked.stats
    else:
        table = index.results_table(query_ids, vectors, k, expansion)
    return write_results(
        output,
        table,
        len(query_ids),
        start,
        k=min(k, index.ntotal),
        query_expansion={"n": expansion.n, "alpha": expansion.alpha},
        whitening=index.manifest["model"].get("whitening"),
        rerank=rerank.as_dict() if rerank is not None and rerank_stats is not None else None,
        rerank_stats=rerank_stats,
        index=index_dir,
    )


def write_results(
    output: str, table: Any, queries: int, start: float, **record: Any
) -> dict[str, Any]:
    """The search stage's output: ``output``/results.parquet and its summary.json (queries =
    answered + failed), with ``record`` (k, whitening, re-ranking, ...) in the summary."""
    results = storage.join(output, "results.parquet")
    storage.write_parquet(results, table)
    answered = len(set(table.column("query_id").to_pylist()))
    return write_summary(
        output,
        "search",
        inputs=queries,
        indexed=answered,
        failed=queries - answered,
        timings={"search_s": time.perf_counter() - start},
        results=results,
        **record,
    )


def learn(
    descriptors: str,
    local: str | list[str],
    output: str,
    config: RunConfig,
    *,
    inputs: str | None = None,
    first_use: FirstUse | None = None,
) -> dict[str, Any]:
    """Mine verified pairs in the corpus (no labels) and learn a whitening from them.

    Writes ``whitening.npz`` + ``whitening.json`` (with the mining figures, and ``inputs``: a
    fingerprint of what it was learned from, by which a re-run knows to keep it) to ``output``.
    With ``first_use``, the local features are read from its layers (``local`` is not read),
    and those of the proposed pairs' images it has none of are computed first (on the runner's
    workers), for those images only.
    """
    ids, _, vectors = descriptor_shards.read_all(descriptors)
    base_model = descriptor_shards.list_shards(descriptors)[0]["model"]
    if first_use is not None:
        store = first_use.store()
    else:
        store = LocalFeatureStore(
            local_feature_cache.folders(local) if isinstance(local, str) else local
        )
    request: dict[str, Any] = {}

    def provide_in(first_use: FirstUse) -> Callable[[list[str]], LocalFeatureStore]:
        def provide(needed: list[str]) -> LocalFeatureStore:
            label = "learn: local features"
            record = complete_local_features(first_use, descriptors, needed, config, label=label)
            request.update(record)
            return first_use.refresh(store)

        return provide

    mined = mine_pairs(
        ids,
        vectors,
        store.get,
        config.mining,
        config.verification,
        provide=provide_in(first_use) if first_use is not None else None,
    )
    if request:
        mined.stats["local_features_first_use"] = request
    log.info("mined %s", mined.stats)
    needed = config.mining.min_pairs
    if len(mined.pairs) < needed:
        raise InsufficientPairsError(
            f"only {len(mined.pairs)} verified pairs in {len(ids)} images (at least {needed} "
            "are needed to learn a whitening): the corpus shows too few things twice; "
            "try a larger --mine-sample-size or --mine-neighbours"
        )
    start = time.perf_counter()
    whitening = learn_whitening(
        vectors, mined.pairs, dim=config.whitening_dim, shrinkage=config.whitening_shrinkage
    )
    learn_s = time.perf_counter() - start
    return save_whitening(
        whitening,
        output,
        mining=mined.stats,
        learn_s=round(learn_s, 3),
        descriptors=descriptors,
        local_features=local,
        base_model={k: base_model[k] for k in ("id", "config_hash", "weights_sha256")},
        local_model=store.model["id"] if store.model else local_info_for(config.local)["id"],
        inputs=inputs,
    )


def whiten(descriptors: str, whitening: str, output: str) -> dict[str, Any]:
    """Whitened copy of a descriptor folder (what `index` then builds on)."""
    return whiten_descriptor_folder(descriptors, whitening, output)
