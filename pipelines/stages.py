"""The stages of the indexing pipeline, each run on the chosen runner.

Each function plans with ``retrieval`` (what exists, what is left to do), hands the pending
shards to a runner (in-process loop, or Beam), then checks the result and writes the stage's
``summary.json``. Runners only decide where the core functions run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm import tqdm

from pipelines.config import RunConfig
from pipelines.progress import ShardProgress
from retrieval import storage, versions
from retrieval.descriptors.gem import model_info, prepare_runtime
from retrieval.extraction import ExtractionPlan, plan_extraction, run_local, summarize_extraction
from retrieval.index import group_index
from retrieval.index.codebook import train_codebook
from retrieval.index.merge import finish_merge, plan_merge, run_merge_task
from retrieval.index.search import DEFAULT_NPROBE, NO_EXPANSION, load_index
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.runtimes.device import plan_worker
from retrieval.shards import descriptor_shards
from retrieval.summary import format_accounting, write_summary

log = logging.getLogger(__name__)


def extract(source: str, output: str, config: RunConfig) -> dict[str, Any]:
    """List ``source``, describe every image not yet in a committed shard, summarize."""
    start = time.perf_counter()
    info = model_info(config.gem)
    plan = plan_extraction(source, output, info, shard_size=config.shard_size)
    storage.makedirs(output)
    run_start = time.perf_counter()
    if config.runner == "local" or not plan.pending:
        _extract_local(plan, config)
    elif config.runner == "spark":
        _extract_spark(plan, config, info)
    else:
        from pipelines.beam.extract import run_extraction
        from pipelines.beam.options import is_local, pipeline_options

        options = pipeline_options(config.workers, config.beam_args)
        # Local cores are shared by --workers processes; remote workers size their own pools.
        local = is_local(options)
        if local:
            prepare_runtime(config.gem)
        worker = plan_worker(
            config.device,
            workers=config.workers if local else 1,
            threads=config.threads if local else config.threads_per_worker,
            image_side=config.gem.max_side,
        )
        with ShardProgress(
            output, len(plan.shards), "extract", already=len(plan.shards) - len(plan.pending)
        ):
            run_extraction(
                plan.pending_ids,
                output,
                config=config.gem,
                model_info=info,
                limits=config.limits,
                options=options,
                worker=worker,
            )
    timings = {"extract_s": time.perf_counter() - run_start, "total_s": time.perf_counter() - start}
    summary = summarize_extraction(plan, info, timings)
    log.info(format_accounting(summary))
    return summary


def _extract_local(plan: ExtractionPlan, config: RunConfig) -> None:
    if not plan.pending:
        return
    from retrieval.descriptors.gem import GeMExtractor, configure_tf_threads

    worker = plan_worker(
        config.device, workers=1, threads=config.threads, image_side=config.gem.max_side
    )
    if config.gem.runtime == "tensorflow":
        configure_tf_threads(worker.inference_threads)
    extractor = GeMExtractor(
        config.gem,
        threads=worker.inference_threads,
        device=worker.device,
        batch_bytes=worker.batch_bytes,
    )
    shard_ids = tqdm(plan.pending_ids, desc="extract", unit="shard")
    run_local(
        shard_ids,
        plan.output,
        extractor,
        config.limits,
        batch_size=worker.max_batch_images,
        decode_threads=worker.decode_threads,
    )


def spark_session(config: RunConfig):
    """The SparkSession for ``config`` (started once per process, then shared by stages)."""
    from pipelines.spark.session import SparkSettings, get_session

    settings = SparkSettings(
        workers=config.workers,
        master=config.master,
        conf=dict(config.spark_conf),
        verbose=config.verbose,
    )
    return settings, get_session(settings)


def _extract_spark(plan: ExtractionPlan, config: RunConfig, info: dict[str, Any]) -> None:
    from pipelines.spark.extract import run_extraction
    from pipelines.spark.session import parallelism, task_threads

    settings, session = spark_session(config)
    # Local cores are shared by --workers tasks; on a cluster, spark.task.cpus says how many
    # cores each task (one model) may use.
    threads = config.threads if settings.is_local else task_threads(session, config)
    if settings.is_local:
        prepare_runtime(config.gem)  # convert once here, so local tasks find a warm cache
    with ShardProgress(
        plan.output, len(plan.shards), "extract", already=len(plan.shards) - len(plan.pending)
    ):
        run_extraction(
            session,
            plan.pending_ids,
            plan.output,
            config=config.gem,
            model_info=info,
            limits=config.limits,
            threads_per_worker=threads,
            parallelism=parallelism(session),
        )


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
    if config.runner == "local" or len(todo) <= 1:
        for task in tqdm(todo, desc="index", unit="group"):
            group_index.build_group_index(task, output)
    elif config.runner == "spark":
        from pipelines.spark.index import run_index_groups as spark_index_groups

        with ShardProgress(output, len(tasks), "index", already=len(tasks) - len(todo)):
            spark_index_groups(spark_session(config)[1], todo, output)
    else:
        from pipelines.beam.index import run_index_groups
        from pipelines.beam.options import pipeline_options

        with ShardProgress(output, len(tasks), "index", already=len(tasks) - len(todo)):
            run_index_groups(
                todo, output, options=pipeline_options(config.workers, config.beam_args)
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
    if config.runner == "local" or sum(len(r) for r in rounds) <= 1:
        for tasks in tqdm(rounds, desc="merge", unit="round"):
            for task in tasks:
                run_merge_task(task)
    elif config.runner == "spark":
        from pipelines.spark.index import run_merge_rounds as spark_merge_rounds

        spark_merge_rounds(spark_session(config)[1], rounds)
    else:
        from pipelines.beam.index import run_merge_rounds
        from pipelines.beam.options import pipeline_options

        run_merge_rounds(rounds, options=pipeline_options(config.workers, config.beam_args))
    return finish_merge(shards, output, rounds, {"merge_s": time.perf_counter() - start})


def search(
    index_dir: str,
    queries: str,
    output: str,
    *,
    k: int = 100,
    nprobe: int | None = None,
    expansion: QueryExpansion = NO_EXPANSION,
) -> dict[str, Any]:
    """Top-``k`` results for every descriptor under ``queries`` -> ``output``/results.parquet."""
    start = time.perf_counter()
    index_dir = versions.resolve_index(index_dir)  # a versioned root: follow CURRENT
    index = load_index(index_dir, nprobe=nprobe or DEFAULT_NPROBE)
    index.check_query_model(descriptor_shards.list_shards(queries))
    query_ids, _, vectors = descriptor_shards.read_all(queries)
    table = index.results_table(query_ids, vectors, k, expansion)
    results = storage.join(output, "results.parquet")
    storage.write_parquet(results, table)
    answered = len(set(table.column("query_id").to_pylist()))
    return write_summary(
        output,
        "search",
        inputs=len(query_ids),
        indexed=answered,
        failed=len(query_ids) - answered,
        timings={"search_s": time.perf_counter() - start},
        k=min(k, index.ntotal),
        query_expansion={"n": expansion.n, "alpha": expansion.alpha},
        results=results,
        index=index_dir,
    )
