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
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines import settings

# The template's own parameters; its run settings come from the declarations
# (pipelines/settings.py, ``template=True``), so metadata.json is generated, never edited.
LOCATIONS = [
    {
        "name": "input",
        "label": "Images",
        "helpText": "gs:// prefix listed recursively for .jpg/.jpeg/.png/.webp/.bmp/.tif/.gif "
        "files, or a .csv/.parquet manifest with a uri column (and an optional id column). "
        "Example: gs://my-bucket/photos/",
        "isOptional": False,
        "regexes": ["^gs://[^\\n\\r]+$"],
    },
    {
        "name": "output",
        "label": "Descriptor folder",
        "helpText": "gs:// folder for part-XXXXX.parquet shards, their manifests and the run "
        "plan. Example: gs://my-bucket/run1/descriptors",
        "isOptional": False,
        "regexes": ["^gs://[^\\n\\r]+$"],
    },
    {
        "name": "local_output",
        "label": "Local-feature folder",
        "helpText": "gs:// folder for the local features of the same images, extracted in the "
        "same pass (what the default job's learning and spatial verification read). "
        "Example: gs://my-bucket/run1/local_features",
        "isOptional": True,
        "regexes": ["^gs://[^\\n\\r]+$"],
    },
]
PARAMETERS = [p["name"] for p in LOCATIONS] + [s.name for s in settings.template_settings()]
METADATA_FILE = Path(__file__).resolve().parents[2] / "deploy" / "dataflow" / "metadata.json"


def metadata() -> dict[str, Any]:
    """The template's metadata.json, from the declarations."""
    from pipelines.config import RunConfig

    defaults = RunConfig()
    return {
        "name": "cbir-extract",
        "description": "Describe every image under a gs:// prefix (or in a CSV/Parquet "
        "manifest) with GeM global descriptors, and local features with local_output, and write "
        "committed Parquet shards, skipping shards a previous run committed (cbir-retrieval: "
        "the default job's extract stage).",
        "streaming": False,
        "parameters": LOCATIONS
        + [settings.template_parameter(s, defaults) for s in settings.template_settings()],
    }


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The template's parameters, and everything else (Dataflow's pipeline options)."""
    parser = argparse.ArgumentParser(prog="flex_template.py")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--local_output")
    for setting in settings.template_settings():
        kind = {"int": int, "float": float, "floats": settings.parse_floats}.get(setting.kind, str)
        parser.add_argument(f"--{setting.name}", type=kind, choices=setting.choices)
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
    from retrieval.local_features.extractor import local_info_for
    from retrieval.redaction import mask_option_values, redact_handlers, sealing_key
    from retrieval.runtimes.device import plan_worker

    logging.basicConfig(level=logging.INFO)
    redact_handlers()
    args, pipeline_args = parse(sys.argv[1:] if argv is None else argv)
    mask_option_values(pipeline_args)
    config = build_config({s.name: getattr(args, s.name) for s in settings.template_settings()})
    info = model_info(config.gem)
    local = config.local if args.local_output and config.local.enabled else None
    local_info = local_info_for(local) if local else None
    local_output = args.local_output if local else None
    storage.makedirs(args.output)
    plan = plan_extraction(
        args.input,
        args.output,
        info,
        shard_size=config.shard_size,
        local_output=local_output,
        local_info=local_info,
    )
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
                args.output,
                config=config.gem,
                model_info=info,
                limits=config.limits,
                worker=worker,
                local=local,
                local_output=local_output,
                local_info=local_info,
                # Travels in the job's graph to the workers (the plan's sealed URIs).
                sealing_key=sealing_key(),
            )
        ),
        plan.pending_ids,
    )
    pipeline.run()  # a Flex Template's program must not wait for the job
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-metadata"]:  # after changing a template setting
        METADATA_FILE.write_text(json.dumps(metadata(), indent=2, ensure_ascii=False) + "\n")
        sys.exit(0)
    sys.exit(main())
