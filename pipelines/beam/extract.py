"""Descriptor extraction on Apache Beam: a thin adapter over ``retrieval.extraction``.

    shard ids ─► (shard, image) pairs ─► Reshuffle ─► read + decode ─┬─► RunInference (GeM) ─┐
                                                                       └─► error rows ─────────┤
                          write shard + manifest ◄─ group by shard ◄──────────────────────────┘

Reshuffle spreads single images (not whole shards) over the workers, so a few large shards never
leave workers idle; RunInference loads one model per worker and batches; grouping by shard id
brings each shard's rows back together so it is written data-first and committed by one worker.

The graph carries only shard ids: the launcher writes the run plan (listing cut into shards) to
the output folder, and workers read each shard's references from it (``retrieval.plan``), so
neither the graph nor the launcher's memory grows with the corpus.

Why not Beam's file I/O here: the corpus is listed and cut into shards by the launcher before the
pipeline starts (to skip committed shards, and so that every runner plans identically), and each
shard must be written under its own deterministic name and then committed by a manifest, which
``parquetio.WriteToParquet``'s own output sharding cannot express.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions

from retrieval import plan
from retrieval.descriptors.gem import GeMConfig, GeMExtractor, configure_tf_threads
from retrieval.extraction import LoadedImage, descriptor_row, load_image, model_error
from retrieval.images import DecodeLimits
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import ErrorRow


class GeMModelHandler(ModelHandler[LoadedImage, Any, GeMExtractor]):
    """RunInference handler for GeM: one extractor per worker, per-image failures kept as rows."""

    def __init__(self, config: GeMConfig, threads: int | None = None, max_batch_size: int = 8):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self._config = config
        self._threads = threads

    def load_model(self) -> GeMExtractor:
        configure_tf_threads(self._threads)
        return GeMExtractor(self._config)

    def run_inference(
        self,
        batch: Sequence[LoadedImage],
        model: GeMExtractor,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        for loaded in batch:
            try:
                yield PredictionResult(loaded, descriptor_row(loaded, model.describe(loaded.image)))
            except Exception as exc:  # one bad image must not fail its batch
                yield PredictionResult(loaded, model_error(loaded, exc))

    def get_num_bytes(self, batch: Sequence[LoadedImage]) -> int:
        return sum(loaded.image.pixels.nbytes for loaded in batch)

    def get_metrics_namespace(self) -> str:
        return "retrieval.gem"


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, model_info: dict[str, Any]):
        self._output = output
        self._model_info = model_info

    def process(self, element: tuple[str, Iterable[Any]]):
        shard_id, results = element
        rows, errors = [], []
        for result in results:
            (errors if isinstance(result, ErrorRow) else rows).append(result)
        spec = plan.read_shard_spec(self._output, shard_id)
        manifest = descriptor_shards.write_shard(self._output, spec, rows, errors, self._model_info)
        yield shard_id, manifest["rows"], manifest["errors"]


def _failed_batch_rows(failure: tuple[Sequence[tuple[str, LoadedImage]], BaseException]):
    batch, exc = failure
    for shard_id, loaded in batch:
        yield shard_id, model_error(loaded, exc)


def build_extraction(
    pipeline: beam.Pipeline,
    shard_ids: Sequence[str],
    output: str,
    *,
    config: GeMConfig,
    model_info: dict[str, Any],
    limits: DecodeLimits,
    threads_per_worker: int | None,
) -> beam.PCollection:
    """Add the extraction of the planned shards ``shard_ids`` of ``output`` to ``pipeline``;
    returns (shard, rows, errors) per shard."""
    loaded = (
        pipeline
        | "Shards" >> beam.Create(list(shard_ids))
        | "Images"
        >> beam.FlatMap(lambda sid: [(sid, ref) for ref in plan.read_shard_spec(output, sid).refs])
        | "Spread" >> beam.Reshuffle()
        | "ReadDecode"
        >> beam.MapTuple(
            lambda shard, ref: (shard, load_image(ref, max_side=config.max_side, limits=limits))
        )
    )
    decoded = loaded | "Decoded" >> beam.Filter(lambda kv: isinstance(kv[1], LoadedImage))
    undecodable = loaded | "Undecodable" >> beam.Filter(lambda kv: isinstance(kv[1], ErrorRow))
    handler = KeyedModelHandler(GeMModelHandler(config, threads_per_worker))
    described, dead_letters = decoded | "GeM" >> RunInference(handler).with_exception_handling()
    rows = described | "Rows" >> beam.MapTuple(lambda shard, result: (shard, result.inference))
    failed = dead_letters.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
    return (
        (rows, undecodable, failed)
        | "All" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(_WriteShard(output, model_info))
    )


def run_extraction(
    shard_ids: Sequence[str],
    output: str,
    *,
    config: GeMConfig,
    model_info: dict[str, Any],
    limits: DecodeLimits,
    options: PipelineOptions,
    threads_per_worker: int | None = None,
) -> None:
    """Run the extraction of the planned shards ``shard_ids`` of ``output`` to completion."""
    if not shard_ids:
        return
    with beam.Pipeline(options=options) as pipeline:
        build_extraction(
            pipeline,
            shard_ids,
            output,
            config=config,
            model_info=model_info,
            limits=limits,
            threads_per_worker=threads_per_worker,
        )
