"""The extraction stage as plain functions over one image, one shard and one corpus.

Runners compose these: the in-process runner loops over shards; the Beam runner spreads images
over workers (``pipelines/beam/extract.py``). Whatever goes wrong with one image becomes an
:class:`ErrorRow` with the stage and a stable kind, so every input is accounted for.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval import plan, storage
from retrieval.corpus import ImageRef, ShardSpec, list_corpus, plan_shards
from retrieval.images import DecodedImage, DecodeLimits, ImageError, decode_image
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow
from retrieval.summary import write_summary

if TYPE_CHECKING:  # the extractor brings TensorFlow; planning and summaries must not
    from retrieval.descriptors.gem import GeMExtractor

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class LoadedImage:
    """An input that was read and decoded, ready for the model."""

    ref: ImageRef
    sha256: str
    image: DecodedImage


def load_image(ref: ImageRef, *, max_side: int, limits: DecodeLimits) -> LoadedImage | ErrorRow:
    """Read and decode one input, or say why not."""
    if ref.problem:
        kind, _, message = ref.problem.partition(": ")
        return ErrorRow(ref.id, ref.uri, "list", kind, message)
    try:
        data = storage.read_bytes(ref.uri, max_bytes=limits.max_bytes)
    except FileNotFoundError:
        return ErrorRow(ref.id, ref.uri, "read", "missing", "the object does not exist")
    except storage.FileTooLargeError as exc:
        return ErrorRow(ref.id, ref.uri, "read", "too_large", str(exc))
    except Exception as exc:  # after retries: permissions, network, ...
        return ErrorRow(ref.id, ref.uri, "read", "read_failed", f"{type(exc).__name__}: {exc}")
    try:
        image = decode_image(data, max_side=max_side, limits=limits)
    except ImageError as exc:
        return ErrorRow(ref.id, ref.uri, "decode", exc.kind, exc.message)
    except Exception as exc:  # a decoder bug must cost one image, not the job
        return ErrorRow(ref.id, ref.uri, "decode", "decoder_error", f"{type(exc).__name__}: {exc}")
    return LoadedImage(ref, storage.sha256_bytes(data), image)


def descriptor_row(loaded: LoadedImage, descriptor: np.ndarray) -> DescriptorRow:
    ref = loaded.ref
    return DescriptorRow(
        ref.id, ref.uri, loaded.sha256, loaded.image.width, loaded.image.height, descriptor
    )


def model_error(loaded: LoadedImage, exc: BaseException) -> ErrorRow:
    return ErrorRow(
        loaded.ref.id, loaded.ref.uri, "extract", "model_error", f"{type(exc).__name__}: {exc}"
    )


def extract_shard(
    spec: ShardSpec, extractor: GeMExtractor, limits: DecodeLimits
) -> tuple[list[DescriptorRow], list[ErrorRow]]:
    """Describe every input of a shard in this process (the plain loop, no runner)."""
    rows: list[DescriptorRow] = []
    errors: list[ErrorRow] = []
    for ref in spec.refs:
        loaded = load_image(ref, max_side=extractor.config.max_side, limits=limits)
        if isinstance(loaded, ErrorRow):
            errors.append(loaded)
            continue
        try:
            rows.append(descriptor_row(loaded, extractor.describe(loaded.image)))
        except Exception as exc:
            errors.append(model_error(loaded, exc))
    return rows, errors


@dataclass
class ExtractionPlan:
    """The run plan of an extraction (written to ``output``), and which shards still need work.

    ``retried`` are committed shards extracted again because they hold transient errors
    (``read_failed``, ``model_error``): waiting may have fixed those.
    """

    input: str
    output: str
    run_plan: plan.RunPlan
    pending: list[plan.PlannedShard] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)

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
    source: str, output: str, model_info: dict[str, Any], *, shard_size: int = DEFAULT_SHARD_SIZE
) -> ExtractionPlan:
    """List the corpus, cut it into shards, write the run plan to ``output``, and find the
    shards not yet committed there (or committed with transient errors, to retry)."""
    specs = plan_shards(list_corpus(source), shard_size)
    run_plan = plan.write_extraction_plan(output, specs, source=source, shard_size=shard_size)
    del specs  # from here on, shard references are read from the plan in storage
    pending, retried = [], []
    for shard in run_plan.shards:
        manifest = descriptor_shards.committed_manifest(output, shard, model_info)
        if manifest is None:
            pending.append(shard)
        elif manifest.get("transient_errors"):
            pending.append(shard)
            retried.append(shard.shard_id)
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
        source,
        run_plan.inputs,
        len(run_plan.shards),
        len(pending),
    )
    return ExtractionPlan(source, output, run_plan, pending, retried)


def summarize_extraction(
    extraction: ExtractionPlan, model_info: dict[str, Any], timings: dict[str, float]
) -> dict[str, Any]:
    """Check every planned shard is committed and write ``summary.json`` for the stage."""
    rows = failed = 0
    kinds: Counter[str] = Counter()
    missing = []
    for shard in extraction.shards:
        manifest = descriptor_shards.committed_manifest(extraction.output, shard, model_info)
        if manifest is None:
            missing.append(shard.shard_id)
            continue
        rows += manifest["rows"]
        failed += manifest["errors"]
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
        stale_shards_ignored=len(extraction.run_plan.stale_shard_ids()),
        failures_by_kind=dict(kinds),
        model=model_info,
        input=extraction.input,
    )


def run_local(
    shard_ids: Iterable[str], output: str, extractor: GeMExtractor, limits: DecodeLimits
) -> None:
    """Extract the planned shards ``shard_ids`` of ``output`` one after another (no runner)."""
    info = extractor.info()
    for shard_id in shard_ids:
        spec = plan.read_shard_spec(output, shard_id)
        rows, errors = extract_shard(spec, extractor, limits)
        descriptor_shards.write_shard(output, spec, rows, errors, info)


def failures(output: str) -> Sequence[ErrorRow]:
    """All error rows of the committed shards under ``output``."""
    return [
        e
        for m in descriptor_shards.list_shards(output)
        if m["errors"]
        for e in descriptor_shards.read_errors(output, m)
    ]
