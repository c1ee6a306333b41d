"""The Dataflow Flex Template's program: extraction of a corpus as one Dataflow job.

``gcloud dataflow flex-template run`` starts this file in the template's container
(``deploy/dataflow/Dockerfile``, ``FLEX_TEMPLATE_PYTHON_PY_FILE``) with the template's parameters
(``deploy/dataflow/metadata.json``) and Dataflow's own pipeline options. It lists the corpus,
writes the run plan, builds the same Beam extraction as ``retrieval extract`` for the shards not
yet committed, and submits it. As Flex Templates require, it exits once the job is submitted
(no waiting): when the job is done, ``retrieval extract`` with the same --input/--output finds
every shard committed and writes summary.json in seconds (or ``retrieval train`` just goes on).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

# Template parameters (deploy/dataflow/metadata.json) -> run settings (pipelines/config.py).
PARAMETERS = {
    "input": "input",
    "output": "output",
    "backbone": "backbone",
    "image_size": "image_size",
    "scales": "scales",
    "gem_p": "gem_p",
    "shard_size": "shard_size",
}


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The template's parameters, and everything else (Dataflow's pipeline options)."""
    parser = argparse.ArgumentParser(prog="flex_template.py")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--backbone")
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--gem_p", type=float)
    parser.add_argument("--shard_size", type=int)
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.config import build_config
    from pipelines.runners.beam import build_map
    from pipelines.stages import ExtractShards
    from retrieval import storage
    from retrieval.descriptors.gem import model_info
    from retrieval.extraction import ShardJob, plan_extraction
    from retrieval.runtimes.device import plan_worker

    logging.basicConfig(level=logging.INFO)
    args, pipeline_args = parse(sys.argv[1:] if argv is None else argv)
    config = build_config({k: getattr(args, k) for k in PARAMETERS if k not in ("input", "output")})
    info = model_info(config.gem)
    storage.makedirs(args.output)
    plan = plan_extraction(args.input, args.output, info, shard_size=config.shard_size)
    if not plan.pending:
        logging.info("every shard of %s is committed: no job to run", args.output)
        return 0
    pipeline = beam.Pipeline(options=PipelineOptions(pipeline_args))
    # A Dataflow worker sizes its own pools: one model copy with the configured threads.
    worker = plan_worker(
        config.device, workers=1, threads=config.threads_per_worker, image_side=config.gem.max_side
    )
    build_map(
        pipeline,
        ExtractShards(
            ShardJob(
                args.output, config=config.gem, model_info=info, limits=config.limits, worker=worker
            )
        ),
        plan.pending_ids,
    )
    pipeline.run()  # a Flex Template's program must not wait for the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
