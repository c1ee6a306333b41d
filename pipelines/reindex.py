"""``retrieval reindex``: bring a versioned index up to date with its corpus, extracting only
what changed, and ``retrieval rollback``.

    list corpus + content keys ─► diff with the live version's state ─► new / changed / deleted
         │
         ├─► extract new + changed only (the usual extract stage, on a manifest of them)
         ├─► descriptors of the new version = unchanged rows of the live version + extracted rows
         ├─► codebook: the live one, unless drift (``retrieval/index/drift.py``) or a corpus size
         │   that calls for another index type makes it stale: then retrain
         ├─► index groups + tree merge (encoding is cheap next to extraction)
         └─► versions/vNNNNNN/ complete ─► CURRENT moved atomically ─► keep the last N

Each version folder is self-contained (state, descriptors, codebook, index), so pruning old
versions never breaks a newer one, and ``retrieval rollback`` only moves ``CURRENT``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import stages
from pipelines.config import RunConfig
from retrieval import corpus_state, plan, storage, versions
from retrieval.corpus import ImageRef, iter_corpus, plan_shards
from retrieval.descriptors.gem import model_info
from retrieval.index import factory as factories
from retrieval.index.codebook import (
    CODEBOOK_FILE,
    CODEBOOK_MANIFEST,
    SAMPLE_FILE,
    load_codebook,
    read_codebook_manifest,
)
from retrieval.index.drift import DRIFT_THRESHOLD, drift_ratio, quantization_error
from retrieval.manifests import read_manifest, write_manifest
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow
from retrieval.summary import write_summary

log = logging.getLogger(__name__)

VERSION_MANIFEST = "version.json"
VERSION_KIND = "index_version"
DEFAULT_KEEP = 3


def _descriptor_rows(directory: str, drop: set[str] | None = None) -> list[DescriptorRow]:
    """Rows of a descriptor folder's plan (less the ids in ``drop``), in plan order."""
    rows = []
    for manifest in descriptor_shards.list_shards(directory):
        table = storage.read_parquet(
            descriptor_shards.data_uri(directory, manifest["shard"]),
            schema="descriptors",
            expect_sha256=manifest["files"]["data"]["sha256"],
        )
        if drop:
            gone = pc.is_in(table.column("id"), pa.array(sorted(drop), pa.string()))
            table = table.filter(pc.invert(gone))
        dim = table.schema.field("descriptor").type.list_size
        vectors = table.column("descriptor").combine_chunks().values.to_numpy().reshape(-1, dim)
        for i, row in enumerate(table.drop(["descriptor"]).to_pylist()):
            rows.append(
                DescriptorRow(
                    row["id"],
                    row["uri"],
                    row["sha256"],
                    row["width"],
                    row["height"],
                    vectors[i],
                    row.get("notes"),  # absent from version-1 shards
                )
            )
    return rows


def _write_descriptors(
    directory: str, rows: list[DescriptorRow], info: dict[str, Any], shard_size: int
) -> None:
    """``rows`` as a complete descriptor folder (shards, manifests, plan), sorted by id."""
    rows = sorted(rows, key=lambda r: r.id)
    by_id = {r.id: r for r in rows}
    specs = plan_shards([ImageRef(r.id, r.uri) for r in rows], shard_size)
    for spec in specs:
        descriptor_shards.write_shard(
            directory, spec, [by_id[ref.id] for ref in spec.refs], [], info
        )
    plan.write_extraction_plan(directory, specs, source="reindex", shard_size=shard_size)


def _needs_training(
    codebook: dict[str, Any] | None,
    new_vectors: np.ndarray,
    n: int,
    d: int,
    config: RunConfig,
    threshold: float,
    previous: str | None,
) -> tuple[bool, str, float | None]:
    """(retrain?, why, drift ratio) for the live codebook against the new vectors."""
    if codebook is None:
        return True, "no codebook yet", None
    wanted = (
        factories.choose_factory(
            n, d, max_index_memory=config.max_index_memory, pretransform=config.pretransform
        )
        if config.index_factory == "auto"
        else config.index_factory
    )
    from retrieval.index.codebook import with_id_map

    if with_id_map(wanted) != codebook["factory"]:
        return True, f"index type for {n} vectors is {with_id_map(wanted)}", None
    index, _ = load_codebook(previous)
    ratio = drift_ratio(
        quantization_error(index, new_vectors), codebook.get("training_quantization_error", 0.0)
    )
    if ratio > threshold:
        return True, f"drift: quantization error {ratio:.2f}x the training sample's", ratio
    return False, "codebook still fits", ratio


def _copy_codebook(source: str, target: str) -> None:
    for name in (CODEBOOK_FILE, CODEBOOK_MANIFEST, SAMPLE_FILE):
        storage.write_bytes(
            storage.join(target, name), storage.read_bytes(storage.join(source, name))
        )


def reindex(
    corpus: str,
    root: str,
    config: RunConfig,
    *,
    keep: int = DEFAULT_KEEP,
    drift_threshold: float = DRIFT_THRESHOLD,
) -> dict[str, Any]:
    """Re-index ``corpus`` into a new version under ``root``; returns its summary."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    live = versions.current(root)
    live_dir = versions.version_dir(root, live) if live else None
    info = model_info(config.gem)
    compare_previous = live_dir is not None
    if live_dir:
        live_manifest = read_manifest(storage.join(live_dir, VERSION_MANIFEST), kind=VERSION_KIND)
        if live_manifest["model"]["config_hash"] != info["config_hash"] or (
            live_manifest["model"]["weights_sha256"] != info["weights_sha256"]
        ):
            log.warning("the model changed since %s: every image is extracted again", live)
            compare_previous = False

    # A merge join of two id-sorted streams (the corpus listing, the last indexed state): the
    # corpus is never held as Python objects, only the changes are.
    scratch_dir = tempfile.TemporaryDirectory(prefix="retrieval-reindex-")
    scratch = scratch_dir.name
    now_state = corpus_state.StateWriter(os.path.join(scratch, "state-now.parquet"))
    previous = corpus_state.iter_state(live_dir, scratch) if compare_previous else iter(())
    now = (
        (r.id, r.uri, corpus_state.content_key(r.uri))
        for r in iter_corpus(corpus, scratch=scratch)
        if not r.problem
    )
    try:
        changes = corpus_state.compare(previous, now, now_state)
    finally:
        now_state.close()
    timings["list_s"] = time.perf_counter() - start

    name = versions.next_name(root)
    vdir = versions.version_dir(root, name)
    extracted_dir = storage.join(vdir, "extracted")
    extracted_rows: list[DescriptorRow] = []
    failures = 0
    extract_summary = None
    if changes.to_extract:
        manifest_uri = storage.join(vdir, "to_extract.parquet")
        wanted = set(changes.to_extract)
        storage.write_parquet(
            manifest_uri,
            pa.table(
                {
                    "uri": [changes.uris[i] for i in sorted(wanted)],
                    "id": sorted(wanted),
                }
            ),
        )
        t = time.perf_counter()
        extract_summary = stages.extract(manifest_uri, extracted_dir, config)
        timings["extract_s"] = time.perf_counter() - t
        extracted_rows = _descriptor_rows(extracted_dir)
        failures = extract_summary["failed"]

    t = time.perf_counter()
    carried = (
        _descriptor_rows(
            storage.join(live_dir, "descriptors"), drop=set(changes.changed + changes.deleted)
        )
        if live_dir and changes.unchanged
        else []
    )
    rows = carried + extracted_rows
    if not rows:
        raise ValueError(f"{corpus}: nothing to index (no images, or every one failed)")
    descriptors = storage.join(vdir, "descriptors")
    _write_descriptors(descriptors, rows, info, config.shard_size)
    timings["compose_s"] = time.perf_counter() - t

    codebook_dir = storage.join(vdir, "codebook")
    live_codebook = storage.join(live_dir, "codebook") if live_dir else None
    live_cb_manifest = read_codebook_manifest(live_codebook) if live_codebook else None
    new_vectors = (
        np.stack([r.descriptor for r in extracted_rows]).astype(np.float32)
        if extracted_rows
        else np.zeros((0, int(info["dim"])), np.float32)
    )
    retrain, why, ratio = _needs_training(
        live_cb_manifest,
        new_vectors,
        len(rows),
        int(info["dim"]),
        config,
        drift_threshold,
        live_codebook,
    )
    t = time.perf_counter()
    if retrain:
        log.info("training a new codebook: %s", why)
        stages.train(descriptors, codebook_dir, config)
    else:
        _copy_codebook(live_codebook, codebook_dir)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stages.index(descriptors, codebook_dir, storage.join(vdir, "index_groups"), config)
    stages.merge(storage.join(vdir, "index_groups"), storage.join(vdir, versions.INDEX_DIR), config)
    timings["index_s"] = time.perf_counter() - t

    extracted_ids = {r.id for r in extracted_rows}
    failed_ids = {i for i in changes.to_extract if i not in extracted_ids}
    state_rows = corpus_state.write_state(vdir, now_state.path, leave_out=failed_ids)
    scratch_dir.cleanup()
    if state_rows != len(rows):
        raise RuntimeError(f"{vdir}: state of {state_rows} images, index of {len(rows)}")
    timings["total_s"] = time.perf_counter() - start
    counts = {
        "new": len(changes.new),
        "changed": len(changes.changed),
        "deleted": len(changes.deleted),
        "unchanged": changes.unchanged,
        "failed": failures,
    }
    # inputs (the corpus now) = indexed + failed
    summary = write_summary(
        vdir,
        "reindex",
        inputs=now_state.rows,
        indexed=len(rows),
        failed=failures,
        timings=timings,
        **{k: v for k, v in counts.items() if k != "failed"},
        extracted=len(changes.to_extract),
        version=name,
        previous_version=live,
        retrained=retrain,
        retrain_reason=why,
        drift_ratio=ratio,
        drift_threshold=drift_threshold,
        corpus=corpus,
    )
    write_manifest(
        storage.join(vdir, VERSION_MANIFEST),
        VERSION_KIND,
        {"version": name, "previous": live, "model": info, **counts, "indexed": len(rows)},
    )
    versions.set_current(root, name)
    summary["pruned"] = versions.prune(root, keep)
    return summary
