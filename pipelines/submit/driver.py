"""The whole default job in one process: what ``retrieval submit`` runs.

    index job (``pipelines.job.INDEX_STAGES``) on --input ─► bundle in --output
        [─► query job on --queries: describe with the bundle's model ─► search ─► results/]

``retrieval submit --runner dataflow`` calls :func:`run_job` on the submitting machine with the
Beam runner pointed at Dataflow (the workers' stages become Dataflow jobs); ``--runner spark``
hands :func:`main` (``deploy/spark/job.py``) to ``spark-submit`` / Dataproc, where it runs in the
Spark driver with the Spark runner. Both run the same stages as ``retrieval evaluate`` and
``retrieval reindex``: no stage list is restated here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pipelines import job
from pipelines.config import RunConfig, build_config, read_config_file


def announce(number: int, total: int, stage: job.Stage) -> None:
    print(f"[{number}/{total}] {stage.name} ({stage.where}): {stage.does}", flush=True)


def run_job(
    source: str,
    output: str,
    config: RunConfig,
    *,
    queries: str | None = None,
    k: int = 100,
) -> dict[str, Any]:
    """The index job into ``output``, then (with ``queries``) the query job over its bundle."""
    record = job.run_index_job(source, output, config, announce=announce)
    if queries:
        total = len(job.stages_for(config))
        for offset, stage in enumerate(job.QUERY_STAGES, start=1):
            print(f"[{total}+{offset}] {stage.name} ({stage.where}): {stage.does}", flush=True)
        record["search"] = job.run_query_job(output, queries, output, base=config, k=k)
    return record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="job.py",
        description="The whole default job in a Spark driver (what `retrieval submit --runner "
        "spark` runs on the cluster): extract, learn, whiten, train, index, merge -> bundle; "
        "with --queries, describe and search -> results/results.parquet.",
    )
    parser.add_argument("--input", required=True, help="image prefix or manifest")
    parser.add_argument("--output", required=True, help="job folder (the bundle)")
    parser.add_argument("--queries", help="query image prefix or manifest")
    parser.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    parser.add_argument("--config", help="config file (shipped with --files on clusters)")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Spark driver entry point: the whole job with the Spark runner, in the session
    ``spark-submit`` started."""
    import logging

    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    config = build_config(read_config_file(args.config) if args.config else {})
    config = replace(config, runner="spark", verbose=args.verbose)
    record = run_job(args.input, args.output, config, queries=args.queries, k=args.k)
    accounting = record["accounting"]
    print(
        f"{accounting['inputs']} inputs = {accounting['indexed']} indexed + "
        f"{accounting['failed']} failed -> {args.output}",
        flush=True,
    )
    return 0
