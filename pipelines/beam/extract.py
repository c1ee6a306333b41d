"""Descriptor extraction on Apache Beam: a thin adapter over ``retrieval.extraction``.

    pending shard ids ─► Create (reshuffled: spread over the workers)
        ─► ExtractShard: the shard's inputs read from the run plan, read + decode on a thread pool
           ahead of the model, described in real batches, written and committed
        ─► (shard, rows, errors)

The shard is the Beam work unit. Each ``ExtractShard`` call runs
``retrieval.extraction.extract_and_commit_shard``, the function the local runner loops over, so
the rows of a shard never leave the worker process that describes them: it writes the data and
then the manifest (a re-run skips committed shards), and the shard writer checks what it writes
against the run plan (an input without a descriptor row or an error row fails the shard loudly).
The graph carries only shard ids, and the launcher writes the run plan to the output folder
before the job, so neither the graph nor the launcher's memory grows with the corpus.

Why not images as the work unit (the graph before this one: Reshuffle of (shard, image) pairs,
read + decode, ``RunInference``, then a GroupByKey by shard to bring each shard's rows together
for its commit). Beam's local FnApiRunner keeps every stage's output, and a GroupByKey's whole
table, in the launcher process until the next stage has run (``fn_api_runner/execution.py``:
``ListBuffer``, ``GroupingBuffer``; it cannot spill to disk), so every descriptor row and every
(shard, image) pair crossed the launcher and stayed there: measured with the load benchmark, the
launcher's resident memory grew in exactly the stages that carry per-image elements, +38 MB for
5,000 images and +117 MB for 20,000 (about 5 KB per image; `benchmarks/load.py`). On Dataflow
the same GroupByKey is a shuffle of every descriptor (about 5 KB each at 1,280 dimensions), paid
for once more for nothing: the shard writer needs only the rows its own worker made.

Options weighed:

* per-image spreading with workers writing per-bundle fragment files, and only fragment
  references grouped by shard: keeps image-level balance but writes and reads every descriptor
  twice, and needs fragment clean-up and a fragment-level commit protocol next to the shard's;
* a runner that spills: the FnApiRunner does not (Prism, which might, cannot be fetched offline);
* the shard as the work unit (this module): nothing per image crosses the launcher or a shuffle,
  the same code path as the local runner (so the runners' equal output is by construction), two
  fused stages per job instead of five. What it gives up is balance finer than a shard: with
  fewer shards than workers some idle, and a job ends with its slowest shard. Shards are
  deterministic slices of the listing (256 images by default, ``--shard-size``), so a large
  corpus has many of them (one million images: about 3,900) and the tail is one shard's time; a
  small job should use a smaller ``--shard-size``. The FnApiRunner hands each worker every
  other shard id (its grouping table is split round-robin), as it handed out images before.

Measured on oxford-dev (502 images, 2 shards, 2 workers; a shared 2-core machine at load 7, so
noisy): end to end 11.1-12.7 s with this graph against 11.2-12.5 s with the former one in
alternating runs: the same. Where a job's fixed time goes (launcher timestamps at each stage):
about 2.5 s for the first, tiny stage, which is the two SDK worker processes starting and
importing Beam (1.2-1.8 s of Beam import each; the project's code adds 0.1 s, the model 0.04 s
from the launcher's converted-model cache), 0.5-1 s of teardown after the last shard, and Beam's
import in the launcher itself. ``--direct_running_mode=multi_threading`` (workers as threads of
the launcher) removes the process start: 8.3-8.7 s on the 502 images, but on 2,008 images it was
10-20% slower than processes (GIL contention: 50.5 vs 56.1 and 34.4 vs 43.3 images/s), so
processes stay the local default, as the steady rate is what a large corpus pays for. Each
``ExtractShard`` instance builds its own model in ``setup``: a LiteRT interpreter must not be
called from two threads at once (with ``RunInference``, which shares one model across a
process's threads, the multi_threading run above turned 29-46 of 502 images into
``model_error`` rows).

Why not ``RunInference``: it is a transform over a PCollection of examples whose output is
another PCollection, so the rows it makes must be regrouped by shard before a shard can be
committed: the GroupByKey above. Its other services are kept here without it: one model per
worker (built in ``setup``, reused for every shard it runs), batches bounded by an
activation-memory budget (``retrieval/runtimes/device.py`` plans them, ``GeMExtractor``
runs same-shape tensors), and a failing batch retried image by image so that one bad image costs
only its own row (``describe_loaded``).

Why not Beam's file I/O: the corpus is listed and cut into shards by the launcher before the
pipeline starts (to skip committed shards, and so that every runner plans identically), and each
shard must be written under its own deterministic name and then committed by a manifest, which
``parquetio.WriteToParquet``'s own output sharding cannot express.
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from retrieval.extraction import ShardJob


class ExtractShard(beam.DoFn):
    """``shard id -> (shard id, rows, errors)``: one planned shard extracted and committed in
    this worker (``ShardJob.run``, i.e. ``retrieval.extraction.extract_and_commit_shard``), with
    this worker's models, built once in ``setup``."""

    def __init__(self, job: ShardJob):
        self._job = job

    def setup(self) -> None:
        self._extractor, self._local_extractor = self._job.build_models()

    def process(self, shard_id: str):
        manifest = self._job.run(shard_id, self._extractor, self._local_extractor)
        yield shard_id, manifest["rows"], manifest["errors"]


def build_extraction(
    pipeline: beam.Pipeline, shard_ids: Sequence[str], job: ShardJob
) -> beam.PCollection:
    """Add the extraction of the planned shards ``shard_ids`` of ``job.output`` to ``pipeline``;
    returns (shard, rows, errors) per shard. With ``job.local`` the same decoded images also get
    local features (one read and decode per image), committed to ``job.local_output``."""
    return (
        pipeline
        # reshuffle=True (Create's default, spelled out): the ids are spread over the workers
        # instead of staying fused with the one that read the list.
        | "Shards" >> beam.Create(list(shard_ids), reshuffle=True)
        | "ExtractShard" >> beam.ParDo(ExtractShard(job))
    )


def run_extraction(shard_ids: Sequence[str], job: ShardJob, options: PipelineOptions) -> None:
    """Run the extraction of the planned shards ``shard_ids`` of ``job.output`` to completion."""
    if not shard_ids:
        return
    with beam.Pipeline(options=options) as pipeline:
        build_extraction(pipeline, shard_ids, job)
