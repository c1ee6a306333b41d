"""Descriptor extraction on Apache Beam: a thin adapter over ``retrieval.extraction``.

    shard ids ─► (shard, image) pairs ─► Reshuffle ─► read + decode ─┬─► RunInference (GeM) ─┐
                                                                       └─► error rows ─────────┤
                          write shard + manifest ◄─ group by shard ◄──────────────────────────┘

Reshuffle spreads single images (not whole shards) over the workers, so a few large shards never
leave workers idle; read + decode runs ahead of the model on a thread pool (decode fan-in, as
``retrieval.extraction.load_images`` does locally); RunInference loads one model per worker and
hands it batches bounded by an activation-memory budget, which ``GeMExtractor.describe_batch``
runs as same-shape tensors (``retrieval/runtimes/device.py`` sizes both for a CPU or a GPU);
grouping by shard id brings each shard's rows back together so it is written data-first and
committed by one worker.

The graph carries only shard ids: the launcher writes the run plan (listing cut into shards) to
the output folder, and workers read each shard's references from it (``retrieval.plan``), so
neither the graph nor the launcher's memory grows with the corpus.

Why not Beam's file I/O here: the corpus is listed and cut into shards by the launcher before the
pipeline starts (to skip committed shards, and so that every runner plans identically), and each
shard must be written under its own deterministic name and then committed by a manifest, which
``parquetio.WriteToParquet``'s own output sharding cannot express.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.windowed_value import WindowedValue

from retrieval import plan
from retrieval.descriptors.batching import ACTIVATION_BYTES_PER_PIXEL
from retrieval.descriptors.gem import GeMConfig, GeMExtractor
from retrieval.extraction import (
    LoadedImage,
    describe_loaded,
    load_image,
    local_feature_row,
    model_error,
    worker_extractor,
    write_shards,
)
from retrieval.images import DecodeLimits
from retrieval.local_features.extractor import LocalFeatureConfig, build_local_extractor
from retrieval.runtimes.device import WorkerPlan
from retrieval.shards.descriptor_shards import ErrorRow
from retrieval.shards.local_feature_shards import LocalFeatureRow


class GeMModelHandler(ModelHandler[LoadedImage, Any, GeMExtractor]):
    """RunInference handler for GeM: one extractor per worker, real batches, per-image failures
    kept as rows (``retrieval.extraction.describe_loaded``).

    Batches are capped by the worker plan's activation budget: each image counts for its pixel
    count (BatchElements measures batch size with ``element_size_fn``), so a batch of large
    images holds fewer of them than a batch of small ones.
    """

    def __init__(self, config: GeMConfig, worker: WorkerPlan):
        super().__init__(
            min_batch_size=1,
            max_batch_size=max(1, worker.batch_bytes // ACTIVATION_BYTES_PER_PIXEL),
            element_size_fn=_pixels,
        )
        self._config = config
        self._worker = worker

    def load_model(self) -> GeMExtractor:
        return worker_extractor(self._config, self._worker)

    def run_inference(
        self,
        batch: Sequence[LoadedImage],
        model: GeMExtractor,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        results = describe_loaded(model, batch)
        return [PredictionResult(x, y) for x, y in zip(batch, results, strict=True)]

    def get_num_bytes(self, batch: Sequence[LoadedImage]) -> int:
        return sum(loaded.image.pixels.nbytes for loaded in batch)

    def get_metrics_namespace(self) -> str:
        return "retrieval.gem"


class _LocalFeatures(beam.DoFn):
    """Local features of decoded images: one extractor per worker, built in ``setup``."""

    def __init__(self, config: LocalFeatureConfig):
        self._config = config

    def setup(self) -> None:
        self._extractor = build_local_extractor(self._config)

    def process(self, element: tuple[str, LoadedImage]):
        shard_id, loaded = element
        yield shard_id, local_feature_row(loaded, self._extractor)


def _pixels(element: Any) -> int:
    """Batch weight of one element, keyed ``(shard, LoadedImage)`` or not: its pixel count."""
    loaded = element[1] if isinstance(element, tuple) else element
    height, width = loaded.image.pixels.shape[:2]
    return height * width


class _ReadDecode(beam.DoFn):
    """``(shard, ref) -> (shard, LoadedImage | ErrorRow)`` with reading and decoding run ahead of
    the model on ``threads`` threads (decode fan-in), results in input order within a bundle."""

    def __init__(self, max_side: int, limits: DecodeLimits, threads: int, prefetch: int):
        self._max_side = max_side
        self._limits = limits
        self._threads = threads
        self._prefetch = prefetch

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self) -> None:
        self._pending: deque[tuple[str, Future, Any, Any]] = deque()

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        shard, ref = element
        future = self._pool.submit(load_image, ref, max_side=self._max_side, limits=self._limits)
        self._pending.append((shard, future, timestamp, window))
        while len(self._pending) > self._prefetch:
            yield self._ready()

    def finish_bundle(self):
        while self._pending:
            yield self._ready()

    def _ready(self) -> WindowedValue:
        shard, future, timestamp, window = self._pending.popleft()
        return WindowedValue((shard, future.result()), timestamp, [window])

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)


class _WriteShard(beam.DoFn):
    def __init__(
        self,
        output: str,
        model_info: dict[str, Any],
        local_output: str | None = None,
        local_info: dict[str, Any] | None = None,
    ):
        self._output = output
        self._model_info = model_info
        self._local_output = local_output
        self._local_info = local_info

    def process(self, element: tuple[str, Iterable[Any]]):
        shard_id, results = element
        rows, errors, local_rows = [], [], []
        for result in results:
            if isinstance(result, ErrorRow):
                errors.append(result)
            elif isinstance(result, LocalFeatureRow):
                local_rows.append(result)
            else:
                rows.append(result)
        spec = plan.read_shard_spec(self._output, shard_id)
        manifest = write_shards(
            self._output,
            spec,
            rows,
            errors,
            self._model_info,
            local_output=self._local_output,
            local_rows=local_rows,
            local_info=self._local_info,
        )
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
    worker: WorkerPlan,
    local: LocalFeatureConfig | None = None,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> beam.PCollection:
    """Add the extraction of the planned shards ``shard_ids`` of ``output`` to ``pipeline``;
    returns (shard, rows, errors) per shard. With ``local`` the same decoded images also get
    local features (one read and decode per image), committed to ``local_output``."""
    max_side = max(config.max_side, local.image_size if local else 0)
    loaded = (
        pipeline
        | "Shards" >> beam.Create(list(shard_ids))
        | "Images"
        >> beam.FlatMap(lambda sid: [(sid, ref) for ref in plan.read_shard_spec(output, sid).refs])
        | "Spread" >> beam.Reshuffle()
        | "ReadDecode"
        >> beam.ParDo(_ReadDecode(max_side, limits, worker.decode_threads, worker.prefetch))
    )
    decoded = loaded | "Decoded" >> beam.Filter(lambda kv: isinstance(kv[1], LoadedImage))
    undecodable = loaded | "Undecodable" >> beam.Filter(lambda kv: isinstance(kv[1], ErrorRow))
    handler = KeyedModelHandler(GeMModelHandler(config, worker))
    described, dead_letters = decoded | "GeM" >> RunInference(handler).with_exception_handling()
    rows = described | "Rows" >> beam.MapTuple(lambda shard, result: (shard, result.inference))
    failed = dead_letters.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
    parts = [rows, undecodable, failed]
    if local is not None:
        parts.append(decoded | "LocalFeatures" >> beam.ParDo(_LocalFeatures(local)))
    return (
        tuple(parts)
        | "All" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "Write" >> beam.ParDo(_WriteShard(output, model_info, local_output, local_info))
    )


def run_extraction(
    shard_ids: Sequence[str],
    output: str,
    *,
    config: GeMConfig,
    model_info: dict[str, Any],
    limits: DecodeLimits,
    options: PipelineOptions,
    worker: WorkerPlan,
    local: LocalFeatureConfig | None = None,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
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
            worker=worker,
            local=local,
            local_output=local_output,
            local_info=local_info,
        )
