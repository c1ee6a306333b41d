"""The extraction stage as plain functions over one image, one shard and one corpus.

Runners compose these: the in-process runner loops over shards; the Beam and Spark runners
spread shards over their workers, each running :func:`extract_and_commit_shard`
(``pipelines/runners/``). Whatever goes wrong with one
image becomes an :class:`ErrorRow` with the stage and a stable kind, so every input is accounted
for.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval import plan, storage
from retrieval.corpus import ShardSpec, iter_corpus, iter_shards
from retrieval.image_refs import ImageRef
from retrieval.images import DecodedImage, DecodeLimits, ImageError, decode_image
from retrieval.redaction import SealError, accept_sealing_key, redact
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow
from retrieval.shards.local_feature_shards import LocalFeatureRow
from retrieval.summary import write_summary

if TYPE_CHECKING:  # the extractor brings TensorFlow; planning and summaries must not
    from retrieval.descriptors.gem import GeMConfig, GeMExtractor
    from retrieval.local_features.features import LocalFeatureConfig, LocalFeatureExtractor
    from retrieval.runtimes.device import WorkerPlan

# Error rows of these stages happened before either model ran: both shard kinds record them.
SHARED_ERROR_STAGES = frozenset({"list", "read", "decode"})
LOCAL_FEATURES_STAGE = "local_features"

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class LoadedImage:
    """An input that was read and decoded, ready for the model."""

    ref: ImageRef
    sha256: str
    image: DecodedImage


def load_image(
    ref: ImageRef, *, max_side: int, limits: DecodeLimits, also_sides: Sequence[int] = ()
) -> LoadedImage | ErrorRow:
    """Read and decode one input (at ``max_side``, with copies at ``also_sides``: see
    :func:`retrieval.images.decode_image`), or say why not."""
    if ref.problem:
        kind, _, message = ref.problem.partition(": ")
        return error_row(ref, "list", kind, message)
    try:
        # The real URI (a signed URL's, unsealed) exists only here, for this one read; every
        # row records ref.uri, masked.
        data = storage.read_bytes(ref.location, max_bytes=limits.max_bytes)
    except SealError as exc:  # a plan from another run: its next run lists the input anew
        return error_row(ref, "read", "read_failed", str(exc))
    except Exception as exc:
        return read_error(ref, exc)
    try:
        image = decode_image(data, max_side=max_side, limits=limits, also_sides=also_sides)
    except ImageError as exc:
        return error_row(ref, "decode", exc.kind, exc.message)
    except Exception as exc:  # a decoder bug must cost one image, not the job
        return error_row(ref, "decode", "decoder_error", f"{type(exc).__name__}: {exc}")
    return LoadedImage(ref, storage.sha256_bytes(data), image)


def read_error(ref: ImageRef, exc: Exception) -> ErrorRow:
    """The error row of an input that could not be read (after the storage layer's retries).

    Whatever may pass (a refused connection, a 503, a reset: fsspec's HTTP filesystem reports
    those as "not found") is ``read_failed``, which the next run extracts again; what will not
    pass has its own kind, kept by re-runs.
    """
    if isinstance(exc, storage.FileTooLargeError):
        return error_row(ref, "read", "too_large", str(exc))
    if storage.is_transient(exc):
        cause = exc.__cause__ if isinstance(exc, FileNotFoundError) and exc.__cause__ else exc
        message = f"still failing after the retries: {type(cause).__name__}: {cause}"
        return error_row(ref, "read", "read_failed", message)
    if isinstance(exc, FileNotFoundError):
        return error_row(ref, "read", "missing", "the object does not exist")
    if isinstance(exc, storage.NotARegularFileError):
        return error_row(ref, "read", "not_a_file", str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return error_row(ref, "read", "symlink_loop", "a symbolic link loop (ELOOP)")
    # Permission denied and the rest: read_failed, which a re-run tries again (once fixed).
    return error_row(ref, "read", "read_failed", f"{type(exc).__name__}: {exc}")


def error_row(ref: ImageRef, stage: str, kind: str, message: str) -> ErrorRow:
    """An error row, with credentials and signatures masked in its URI and message."""
    return ErrorRow(ref.id, redact(ref.uri), stage, kind, redact(message))


def descriptor_row(loaded: LoadedImage, descriptor: np.ndarray) -> DescriptorRow:
    ref = loaded.ref
    image = loaded.image
    notes = redact("; ".join(image.notes)) if image.notes else None
    return DescriptorRow(
        ref.id, redact(ref.uri), loaded.sha256, image.width, image.height, descriptor, notes
    )


def model_error(loaded: LoadedImage, exc: BaseException) -> ErrorRow:
    return error_row(loaded.ref, "extract", "model_error", f"{type(exc).__name__}: {exc}")


def load_images(
    refs: Iterable[ImageRef],
    *,
    max_side: int,
    limits: DecodeLimits,
    threads: int = 1,
    prefetch: int = 4,
    also_sides: Sequence[int] = (),
) -> Iterator[LoadedImage | ErrorRow]:
    """:func:`load_image` over ``refs`` on ``threads`` threads, results in input order.

    Decode fan-in: up to ``prefetch`` images are read and decoded ahead of the consumer, so
    reading (network latency) and decoding overlap with inference; Pillow and the runtimes
    release the GIL, so threads do use more cores. ``threads=0`` decodes inline.
    """
    if threads <= 0:
        for ref in refs:
            yield load_image(ref, max_side=max_side, limits=limits, also_sides=also_sides)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending: deque[Future[LoadedImage | ErrorRow]] = deque()
        for ref in refs:
            pending.append(
                pool.submit(
                    load_image, ref, max_side=max_side, limits=limits, also_sides=also_sides
                )
            )
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def worker_extractor(config: GeMConfig, worker: WorkerPlan) -> GeMExtractor:
    """The GeM extractor of one worker process, sized by its plan: every runner builds it here,
    so a worker's runtime gets exactly ``worker.inference_threads`` threads (its share of the
    cores), whichever runner started it.

    Only the ``tensorflow`` runtime imports TensorFlow (about 4 s of a worker's start): pinning
    its thread pools for another runtime would import it for nothing.
    """
    from retrieval.descriptors.gem import GeMExtractor, configure_tf_threads
    from retrieval.runtimes import parse_runtime

    if parse_runtime(config.runtime).engine == "tensorflow":
        configure_tf_threads(worker.inference_threads)
    return GeMExtractor(
        config,
        threads=worker.inference_threads,
        device=worker.device,
        batch_bytes=worker.batch_bytes,
    )


def describe_loaded(
    extractor: GeMExtractor, batch: Sequence[LoadedImage]
) -> list[DescriptorRow | ErrorRow]:
    """Describe a batch in one call; if that fails, image by image so that one bad image costs
    only its own row (a ``model_error``), never its batch-mates'."""
    try:
        descriptors = extractor.describe_batch([loaded.image for loaded in batch])
        return [descriptor_row(loaded, d) for loaded, d in zip(batch, descriptors, strict=True)]
    except Exception as exc:
        if len(batch) == 1:
            return [model_error(batch[0], exc)]
    out: list[DescriptorRow | ErrorRow] = []
    for loaded in batch:
        try:
            out.append(descriptor_row(loaded, extractor.describe(loaded.image)))
        except Exception as exc:
            out.append(model_error(loaded, exc))
    return out


def local_feature_row(
    loaded: LoadedImage, extractor: LocalFeatureExtractor
) -> LocalFeatureRow | ErrorRow:
    """The local features of a decoded image, or an error row that only the local-feature shard
    records (the global descriptor of the same image may well exist)."""
    start = time.perf_counter()
    try:
        features = extractor.extract(loaded.image)
    except Exception as exc:  # one image, not the job
        message = f"{type(exc).__name__}: {exc}"
        return error_row(loaded.ref, LOCAL_FEATURES_STAGE, "model_error", message)
    ref = loaded.ref
    return LocalFeatureRow(ref.id, redact(ref.uri), features, time.perf_counter() - start)


def decode_sides(gem: GeMConfig, local_image_size: int | None) -> tuple[int, tuple[int, ...]]:
    """(the side one decode serves both models at: the larger of their sizes, the smaller sides
    GeM's scales want their own copy at): each model's input is resized once from the decode."""
    side = max(gem.max_side, local_image_size or 0)
    gem_sides = {round(gem.image_size * scale) for scale in gem.scales}
    return side, tuple(sorted(s for s in gem_sides if s < side))


def extract_shard(
    spec: ShardSpec,
    extractor: GeMExtractor,
    limits: DecodeLimits,
    *,
    batch_size: int = 8,
    decode_threads: int = 1,
) -> tuple[list[DescriptorRow], list[ErrorRow]]:
    """Describe every input of a shard in this process (no runner): decoding runs ahead on
    ``decode_threads`` threads while the model describes batches of ``batch_size``."""
    rows, errors, _ = extract_shard_with_local(
        spec, extractor, limits, None, batch_size=batch_size, decode_threads=decode_threads
    )
    return rows, errors


def extract_shard_with_local(
    spec: ShardSpec,
    extractor: GeMExtractor,
    limits: DecodeLimits,
    local: LocalFeatureExtractor | None,
    *,
    batch_size: int = 8,
    decode_threads: int = 1,
) -> tuple[list[DescriptorRow], list[ErrorRow], list[LocalFeatureRow]]:
    """Global descriptors and (with ``local``) local features of every input of a shard, each
    image read and decoded once. Errors of either model are in the one error list (their
    ``stage`` says which shard records them, see :func:`split_errors`)."""
    rows: list[DescriptorRow] = []
    errors: list[ErrorRow] = []
    local_rows: list[LocalFeatureRow] = []
    batch: list[LoadedImage] = []

    def flush() -> None:
        for result in describe_loaded(extractor, batch):
            (errors if isinstance(result, ErrorRow) else rows).append(result)
        batch.clear()

    side, gem_sides = decode_sides(extractor.config, local.config.image_size if local else None)
    loaded_images = load_images(
        spec.refs,
        max_side=side,
        also_sides=gem_sides,
        limits=limits,
        threads=decode_threads,
        prefetch=max(batch_size, 4 * decode_threads),
    )
    for loaded in loaded_images:
        if isinstance(loaded, ErrorRow):
            errors.append(loaded)
            continue
        if local is not None:
            result = local_feature_row(loaded, local)
            (errors if isinstance(result, ErrorRow) else local_rows).append(result)
        batch.append(loaded)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return rows, errors, local_rows


def split_errors(errors: Sequence[ErrorRow]) -> tuple[list[ErrorRow], list[ErrorRow]]:
    """(descriptor-shard errors, local-feature-shard errors): read and decode failures go to
    both, each model's own failures only to its shard."""
    shared = [e for e in errors if e.stage in SHARED_ERROR_STAGES]
    global_only = [e for e in errors if e.stage not in SHARED_ERROR_STAGES | {LOCAL_FEATURES_STAGE}]
    local_only = [e for e in errors if e.stage == LOCAL_FEATURES_STAGE]
    return shared + global_only, shared + local_only


def write_shards(
    output: str,
    spec: ShardSpec,
    rows: Sequence[DescriptorRow],
    errors: Sequence[ErrorRow],
    model_info: dict[str, Any],
    *,
    local_output: str | None = None,
    local_rows: Sequence[LocalFeatureRow] = (),
    local_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a shard's local features (when asked), then its descriptors; returns the
    descriptor manifest."""
    global_errors, local_errors = split_errors(errors)
    if local_output is not None and local_info is not None:
        local_feature_shards.write_shard(local_output, spec, local_rows, local_errors, local_info)
    return descriptor_shards.write_shard(output, spec, rows, global_errors, model_info)


@dataclass
class ExtractionPlan:
    """The run plan of an extraction (written to ``output``), and which shards still need work.

    ``retried`` are committed shards extracted again because they hold transient errors
    (``read_failed``, ``model_error``): waiting may have fixed those. ``repaired`` are committed
    shards extracted again because their files no longer match their manifests (size or
    SHA-256, descriptor or local-feature shard): a re-run never skips a damaged shard.
    """

    input: str
    output: str
    run_plan: plan.RunPlan
    pending: list[plan.PlannedShard] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def shards(self) -> tuple[plan.PlannedShard, ...]:
        return self.run_plan.shards

    @property
    def inputs(self) -> int:
        return self.run_plan.inputs

    @property
    def pending_ids(self) -> list[str]:
        return [s.shard_id for s in self.pending]


def plan_extraction(
    source: str,
    output: str,
    model_info: dict[str, Any],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> ExtractionPlan:
    """List the corpus, cut it into shards, write the run plan to ``output`` (and the same plan
    to ``local_output``), and find the shards not yet committed there (or committed with
    transient errors, to retry)."""
    # Streamed: listing -> external sort -> shards -> plan.refs.parquet row group by row group;
    # the launcher never holds the listing (memory does not grow with the corpus).
    run_plan = plan.write_extraction_plan(
        output,
        iter_shards(iter_corpus(source), shard_size),
        source=source,
        shard_size=shard_size,
        also_to=[local_output] if local_output is not None else [],
    )
    todo, retried, skipped = set(), [], []
    with_local = local_output is not None and local_info is not None
    for shard in run_plan.shards:
        manifest = descriptor_shards.committed_manifest(output, shard, model_info)
        local_manifest = (
            local_feature_shards.committed_manifest(local_output, shard, local_info)
            if local_output is not None and local_info is not None
            else None
        )
        if manifest is None or (with_local and local_manifest is None):
            todo.add(shard.shard_id)
        elif manifest.get("transient_errors"):
            todo.add(shard.shard_id)
            retried.append(shard.shard_id)
        else:
            skipped.append((shard.shard_id, manifest, local_manifest))
    damaged = _damaged_shards(output, local_output, skipped)
    todo.update(damaged)
    pending = [s for s in run_plan.shards if s.shard_id in todo]
    repaired = [shard_id for shard_id, _, _ in skipped if shard_id in damaged]
    if repaired:
        log.warning(
            "%d committed shard(s) whose files no longer match their manifests are extracted "
            "again: %s",
            len(repaired),
            "; ".join(f"{i}: {', '.join(damaged[i])}" for i in repaired[:5])
            + ("; ..." if len(repaired) > 5 else ""),
        )
    if retried:
        log.warning(
            "%d committed shard(s) hold transient errors (read_failed, model_error) and are "
            "extracted again: %s",
            len(retried),
            ", ".join(retried[:5]) + (", ..." if len(retried) > 5 else ""),
        )
    stale = run_plan.stale_shard_ids()
    if stale:
        log.warning(
            "%s: %d shard(s) from an earlier run with another listing or shard size are not in "
            "this plan and will be ignored by every later stage: %s",
            output,
            len(stale),
            ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""),
        )
    log.info(
        "%s: %d images in %d shards, %d to do",
        redact(source),
        run_plan.inputs,
        len(run_plan.shards),
        len(pending),
    )
    return ExtractionPlan(source, output, run_plan, pending, retried, repaired)


VERIFY_THREADS = 8  # committed shards checked at once (object stores: latency, not bandwidth)


def _damaged_shards(
    output: str,
    local_output: str | None,
    committed: Sequence[tuple[str, dict[str, Any], dict[str, Any] | None]],
) -> dict[str, list[str]]:
    """{shard id: its damaged files} among committed shards a re-run would skip: each shard's
    files are checked against its manifest (size, then SHA-256), its local-feature shard's
    too. What a re-run skips must be intact, not only committed."""

    def check(item: tuple[str, dict[str, Any], dict[str, Any] | None]) -> list[str]:
        _, manifest, local_manifest = item
        problems = descriptor_shards.damaged(output, manifest)
        if local_manifest is not None and local_output is not None:
            damaged_local = local_feature_shards.damaged(local_output, local_manifest)
            problems += [f"local features {p}" for p in damaged_local]
        return problems

    with ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="verify") as pool:
        found = list(pool.map(check, committed))
    return {item[0]: problems for item, problems in zip(committed, found, strict=True) if problems}


def summarize_extraction(
    extraction: ExtractionPlan,
    model_info: dict[str, Any],
    timings: dict[str, float],
    *,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check every planned shard is committed and write ``summary.json`` for the stage."""
    local_summary = (
        {"local_features": summarize_local_features(local_output, local_info)}
        if local_output is not None and local_info is not None
        else {}
    )
    rows = failed = noted = 0
    kinds: Counter[str] = Counter()
    missing = []
    for shard in extraction.shards:
        manifest = descriptor_shards.committed_manifest(extraction.output, shard, model_info)
        if manifest is None:
            missing.append(shard.shard_id)
            continue
        rows += manifest["rows"]
        failed += manifest["errors"]
        noted += manifest.get("rows_with_notes", 0)  # absent from older manifests
        if manifest["errors"]:
            kinds.update(
                e.error_kind for e in descriptor_shards.read_errors(extraction.output, manifest)
            )
    if missing:
        raise RuntimeError(f"shards not committed after the run: {missing[:10]}")
    return write_summary(
        extraction.output,
        "extract",
        inputs=extraction.inputs,
        indexed=rows,
        failed=failed,
        timings=timings,
        shards=len(extraction.shards),
        shards_skipped=len(extraction.shards) - len(extraction.pending),
        shards_retried=len(extraction.retried),
        shards_repaired=len(extraction.repaired),
        stale_shards_ignored=len(extraction.run_plan.stale_shard_ids()),
        failures_by_kind=dict(kinds),
        # Described, but something was odd (a broken EXIF block): the `notes` column says what.
        images_with_notes=noted,
        model=model_info,
        input=extraction.input,
        **local_summary,
    )


def summarize_local_features(
    local_output: str | Sequence[str], local_info: dict[str, Any]
) -> dict[str, Any]:
    """Rows, errors, features and bytes per image of a committed local-feature folder (or of
    several: the layers of first-use features)."""
    folders = [local_output] if isinstance(local_output, str) else list(local_output)
    manifests = [m for f in folders for m in local_feature_shards.list_shards(f)]
    data_bytes, rows = local_feature_shards.shard_bytes(manifests)
    seconds = sum(m.get("extract_s", 0.0) for m in manifests)
    return {
        "output": local_output,
        "model": local_info,
        "rows": rows,
        "failed": sum(m["errors"] for m in manifests),
        "features_per_image": round(sum(m["features"] for m in manifests) / max(rows, 1), 1),
        "bytes": data_bytes,
        "bytes_per_image": round(data_bytes / max(rows, 1)),
        # Extractor time alone (decode excluded), summed over workers: per-core throughput.
        "images_per_s_per_core": round(rows / seconds, 2) if seconds else None,
    }


def extract_and_commit_shard(
    output: str,
    shard_id: str,
    extractor: GeMExtractor,
    limits: DecodeLimits,
    *,
    model_info: dict[str, Any],
    batch_size: int = 8,
    decode_threads: int = 1,
    local: LocalFeatureExtractor | None = None,
    local_output: str | None = None,
    local_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One planned shard of ``output`` from end to end in this process: its inputs read from the
    run plan, decoded ahead of the model, described in batches (and given local features with
    ``local``), written and committed (:func:`write_shards`). Every runner's unit of work: the
    rows of a shard never leave the process that describes them. Returns the descriptor
    manifest."""
    spec = plan.read_shard_spec(output, shard_id)
    rows, errors, local_rows = extract_shard_with_local(
        spec, extractor, limits, local, batch_size=batch_size, decode_threads=decode_threads
    )
    return write_shards(
        output,
        spec,
        rows,
        errors,
        model_info,
        local_output=local_output,
        local_rows=local_rows,
        local_info=local_info,
    )


def worker_models(
    config: GeMConfig, worker: WorkerPlan, local: LocalFeatureConfig | None = None
) -> tuple[GeMExtractor, LocalFeatureExtractor | None]:
    """One worker's models: the GeM extractor sized by its plan (:func:`worker_extractor`) and,
    with ``local``, the local-feature extractor."""
    if local is None:
        return worker_extractor(config, worker), None
    from retrieval.local_features.extractor import build_local_extractor

    return worker_extractor(config, worker), build_local_extractor(local, worker.inference_threads)


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to extract and commit any planned shard of one run: the settings a
    runner ships to its workers once (it pickles), so every runner takes this one object and
    runs it the same way."""

    output: str
    config: GeMConfig
    model_info: dict[str, Any]
    limits: DecodeLimits
    worker: WorkerPlan
    local: LocalFeatureConfig | None = None
    local_output: str | None = None
    local_info: dict[str, Any] | None = None
    # The launcher's key for the plan's sealed URIs (retrieval.redaction): it travels with the
    # task, in memory, and is never written by the project.
    sealing_key: bytes | None = field(default=None, repr=False)

    def build_models(self) -> tuple[GeMExtractor, LocalFeatureExtractor | None]:
        """This worker's GeM extractor (sized by its plan) and local-feature extractor."""
        return worker_models(self.config, self.worker, self.local)

    def run(
        self,
        shard_id: str,
        extractor: GeMExtractor,
        local: LocalFeatureExtractor | None = None,
    ) -> dict[str, Any]:
        """Extract and commit ``shard_id`` with this worker's models; returns its manifest."""
        if self.sealing_key is not None:
            accept_sealing_key(self.sealing_key)
        return extract_and_commit_shard(
            self.output,
            shard_id,
            extractor,
            self.limits,
            model_info=self.model_info,
            batch_size=self.worker.max_batch_images,
            decode_threads=self.worker.decode_threads,
            local=local,
            local_output=self.local_output,
            local_info=self.local_info,
        )


def failures(output: str) -> Sequence[ErrorRow]:
    """All error rows of the committed shards under ``output``."""
    return [
        e
        for m in descriptor_shards.list_shards(output)
        if m["errors"]
        for e in descriptor_shards.read_errors(output, m)
    ]


def extract_local_shard(
    spec: ShardSpec,
    extractor: LocalFeatureExtractor,
    limits: DecodeLimits,
    *,
    decode_side: int,
    decode_threads: int = 1,
) -> tuple[list[LocalFeatureRow], list[ErrorRow]]:
    """Local features alone for every input of a shard (first use: the global descriptors
    exist already). Each image is decoded at ``decode_side``, the side the extract stage
    decodes at when it makes both (:func:`decode_sides`), so the features are the ones that
    stage would have made."""
    rows: list[LocalFeatureRow] = []
    errors: list[ErrorRow] = []
    for loaded in load_images(
        spec.refs,
        max_side=decode_side,
        limits=limits,
        threads=decode_threads,
        prefetch=4 * max(decode_threads, 1),
    ):
        if isinstance(loaded, ErrorRow):
            errors.append(loaded)
            continue
        result = local_feature_row(loaded, extractor)
        (errors if isinstance(result, ErrorRow) else rows).append(result)
    return rows, errors


@dataclass(frozen=True)
class LocalShardJob:
    """What a worker needs to compute and commit the local features of any planned shard of a
    first-use layer (``retrieval/local_feature_cache.py``): the local-feature counterpart of
    :class:`ShardJob`, shipped to the workers once."""

    output: str
    local: LocalFeatureConfig
    local_info: dict[str, Any]
    limits: DecodeLimits
    worker: WorkerPlan
    decode_side: int
    sealing_key: bytes | None = field(default=None, repr=False)

    def build_model(self) -> LocalFeatureExtractor:
        from retrieval.local_features.extractor import build_local_extractor

        return build_local_extractor(self.local, self.worker.inference_threads)

    def run(self, shard_id: str, extractor: LocalFeatureExtractor) -> dict[str, Any]:
        """Compute and commit ``shard_id``'s local features; returns its manifest."""
        if self.sealing_key is not None:
            accept_sealing_key(self.sealing_key)
        spec = plan.read_shard_spec(self.output, shard_id)
        rows, errors = extract_local_shard(
            spec,
            extractor,
            self.limits,
            decode_side=self.decode_side,
            decode_threads=self.worker.decode_threads,
        )
        return local_feature_shards.write_shard(self.output, spec, rows, errors, self.local_info)
