"""``retrieval reindex``: bring a versioned index up to date with its corpus by running the
default job (``pipelines.job``) incrementally, and ``retrieval rollback``.

    take ROOT's lease (one writer per root), remove versions interrupted runs left
         │
    check what the live version reuses (its shards' files against their manifests)
         │
    list corpus + content keys ─► diff with the live version's state ─► new / changed / deleted
         │                                         (images of damaged shards count as new)
         │
         ├─► claim a version name (created exclusively), extract new + changed only, global
         │   (and with --local-at extract local) features (the job's extract stage) into
         │   ROOT/data/vNNNNNN/: this run's batch
         ├─► descriptors of the new version = references to the batch shards it shares with the
         │   live version (less the ids changed, deleted or extracted again) + to the batch's
         │   (``retrieval/version_data.py``: manifests only, no descriptor is copied); local
         │   features = the live version's layers + the batch's (a later layer's row for an
         │   image shadows an earlier one's, deleted images are never asked); on first use, the
         │   layers the live version reads, less every image not unchanged since, and the
         │   version's own under ROOT/data/vNNNNNN/local_features (``local_feature_cache``)
         ├─► learn: the live whitening is kept unless the rule below says to learn again
         ├─► whiten, train (the live codebook is kept unless drift, ``retrieval/index/drift.py``,
         │   a corpus size that calls for another index type, or a new whitening makes it
         │   stale), index, merge: the job's own stages
         └─► versions/vNNNNNN/ complete (bundle.json, version.json) ─► CURRENT moved atomically
             (forward only, and only while the lease is still this run's) ─► keep the last N
             versions, and the batches a kept version still reads

The whitening rule: it is learned again when there is none yet (or it was skipped for too few
verified pairs), when the model or the learning settings changed, or when the images added,
changed and deleted since it was learned exceed ``--relearn-fraction`` (default 0.25) of the
corpus it was learned on; otherwise it is kept, and every version records which whitening it
uses (its SHA-256 and the version that learned it).

Each version is a bundle: ``retrieval search --index ROOT --query-images ...`` answers from the
live one with the job's default pipeline; ``retrieval rollback`` only moves ``CURRENT``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import stages
from pipelines.config import RunConfig
from pipelines.job import (
    FOLDERS,
    Bundle,
    JobLayout,
    PreparedCorpus,
    first_use,
    is_bundle,
    learns,
    run_index_job,
)
from retrieval import corpus_state, leases, local_feature_cache, storage, version_data, versions
from retrieval.corpus import SEALED_COLUMN, iter_corpus
from retrieval.descriptors.gem import model_info
from retrieval.index import factory as factories
from retrieval.index.codebook import load_codebook, read_codebook_manifest
from retrieval.index.drift import DRIFT_THRESHOLD, drift_ratio, quantization_error
from retrieval.local_features.extractor import local_info_for
from retrieval.manifests import read_manifest, write_manifest
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.summary import write_summary

log = logging.getLogger(__name__)

VERSION_MANIFEST = "version.json"
VERSION_KIND = "index_version"
DEFAULT_KEEP = 3
DATA_DIR = versions.DATA_DIR
# Learn the whitening again once this fraction of the corpus it was learned on has been added,
# changed or deleted (the codebook's drift rule, for the whitening: see the module doc).
RELEARN_FRACTION = 0.25


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
    if len(new_vectors) == 0:
        return False, "codebook still fits (nothing new to encode)", None
    index, _ = load_codebook(previous)
    ratio = drift_ratio(
        quantization_error(index, new_vectors), codebook.get("training_quantization_error", 0.0)
    )
    if ratio > threshold:
        return True, f"drift: quantization error {ratio:.2f}x the training sample's", ratio
    return False, "codebook still fits", ratio


def _whitening_decision(
    live: dict[str, Any] | None,
    live_dir: str | None,
    config: RunConfig,
    changes: corpus_state.CorpusChanges,
    compare_previous: bool,
    relearn_fraction: float,
) -> tuple[str | None, str, dict[str, Any]]:
    """(whitening folder to keep or None to learn, why, the record carried to the new version)."""
    changed = len(changes.new) + len(changes.changed) + len(changes.deleted)
    record = (live or {}).get("whitening") or {}
    settings = {"dim": config.whitening_dim, "shrinkage": config.whitening_shrinkage}
    if live_dir is None or not compare_previous:
        return None, "no live version with this model" if live_dir is None else "model changed", {}
    if not record.get("sha256"):
        return None, "no whitening yet", {}
    if record.get("settings") != settings:
        return None, "learning settings changed", {}
    since = record.get("changed_since_learned", 0) + changed
    limit = relearn_fraction * max(record.get("learned_on_images", 0), 1)
    if since > limit:
        return (
            None,
            f"{since} images added, changed or deleted since it was learned, more than "
            f"{relearn_fraction:.0%} of the {record.get('learned_on_images')} it was learned on",
            {},
        )
    kept = {**record, "changed_since_learned": since}
    return storage.join(live_dir, FOLDERS["whitening"]), "whitening still fits", kept


def reindex(
    corpus: str,
    root: str,
    config: RunConfig,
    *,
    keep: int = DEFAULT_KEEP,
    drift_threshold: float = DRIFT_THRESHOLD,
    relearn_fraction: float = RELEARN_FRACTION,
) -> dict[str, Any]:
    """Re-index ``corpus`` into a new version under ``root``; returns its summary. Holds the
    root's lease throughout (``retrieval/leases.py``): a second run on the same root waits up
    to ``config.lease_wait`` seconds, then stops with one line naming this one."""
    with leases.hold(root, what="retrieval reindex", wait_s=config.lease_wait) as lease:
        return _reindex(corpus, root, config, lease, keep, drift_threshold, relearn_fraction)


def _reindex(
    corpus: str,
    root: str,
    config: RunConfig,
    lease: leases.Lease,
    keep: int,
    drift_threshold: float,
    relearn_fraction: float,
) -> dict[str, Any]:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    removed = versions.remove_incomplete(root, lease)  # interrupted runs: no live lease holds them
    if removed:
        log.warning("removed incomplete versions (interrupted runs): %s", ", ".join(removed))
    live = versions.current(root)
    live_dir = versions.version_dir(root, live) if live else None
    info = model_info(config.gem)
    local_info = local_info_for(config.local) if config.local.enabled else None
    # Local features extracted with the descriptors, layered over the versions; on first use
    # each version computes those it needs under its own batch folder, and inherits what the
    # live version could read, less what changed (retrieval/local_feature_cache.py).
    upfront_local = local_info is not None and not first_use(config)
    compare_previous = live_dir is not None
    live_manifest = None
    if live_dir:
        live_manifest = read_manifest(storage.join(live_dir, VERSION_MANIFEST), kind=VERSION_KIND)
        same_model = (
            live_manifest["model"]["config_hash"] == info["config_hash"]
            and live_manifest["model"]["weights_sha256"] == info["weights_sha256"]
            and (live_manifest.get("local_model") or {}).get("config_hash")
            == (local_info or {}).get("config_hash")
        )
        if not same_model:
            log.warning("the model changed since %s: every image is extracted again", live)
            compare_previous = False
        elif not is_bundle(live_dir):  # a version from before the job's bundle: no local features
            log.warning("%s predates bundles: every image is extracted again", live)
            compare_previous = False
        elif upfront_local and Bundle.read(live_dir).first_use_root is not None:
            log.warning(
                "%s computed local features on first use and this run extracts them with the "
                "descriptors (--local-at extract): every image is extracted again",
                live,
            )
            compare_previous = False

    # What this version reuses is checked first: the images of a shard whose files no longer
    # match (descriptors or local features) are extracted again, as if they were new.
    reused: list[version_data.Reference] = []
    live_layers: list[str] = []
    suspects: set[str] = set()
    if live_dir and compare_previous:
        t = time.perf_counter()
        live_descriptors = storage.join(live_dir, FOLDERS["descriptors"])
        reused, damaged = version_data.check_references(live_descriptors)
        damaged_ids = version_data.ids_of_damaged(live_descriptors, damaged)
        if upfront_local:
            live_layers = Bundle.read(live_dir).extracted_local_features
            damaged_ids.update(version_data.damaged_local_ids(live_layers))
        for where, ids in damaged_ids.items():
            log.warning(
                "%s: its files no longer match their manifest: its %d images are extracted again",
                where,
                len(ids),
            )
            suspects.update(ids)
        timings["check_s"] = time.perf_counter() - t

    # A merge join of two id-sorted streams (the corpus listing, the last indexed state): the
    # corpus is never held as Python objects, only the changes are.
    scratch_dir = tempfile.TemporaryDirectory(prefix="retrieval-reindex-")
    scratch = scratch_dir.name
    now_state = corpus_state.StateWriter(os.path.join(scratch, "state-now.parquet"))
    previous = corpus_state.iter_state(live_dir, scratch) if compare_previous else iter(())
    if suspects:  # not indexed as far as the comparison knows: new if still in the corpus
        previous = (row for row in previous if row[0] not in suspects)
    now = (
        (r.id, r.uri, corpus_state.content_key_or_reason(r.location), r.sealed)
        for r in iter_corpus(corpus, scratch=scratch)
        if not r.problem
    )
    try:
        changes = corpus_state.compare(previous, now, now_state)
    finally:
        now_state.close()
    timings["list_s"] = time.perf_counter() - start
    if changes.kept_unreadable:
        log.warning(
            "%d indexed images could not be read to tell whether they changed (e.g. %s): kept "
            "as indexed; the next run looks again",
            len(changes.kept_unreadable),
            changes.kept_unreadable[0],
        )

    name = versions.claim(root, lease.owner)  # a name no other run can take
    vdir = versions.version_dir(root, name)
    batch = storage.join(root, DATA_DIR, name)  # this run's extraction, shared by later versions
    batch_descriptors = storage.join(batch, FOLDERS["descriptors"])
    batch_local = storage.join(batch, FOLDERS["local_features"]) if upfront_local else None
    extracted_ids: set[str] = set()
    failures = 0
    extract_summary = None
    if changes.to_extract:
        manifest_uri = storage.join(batch, "to_extract.parquet")
        wanted = set(changes.to_extract)
        storage.write_parquet(
            manifest_uri,
            pa.table(
                {
                    "uri": [changes.uris[i] for i in sorted(wanted)],
                    "id": sorted(wanted),
                    # A signed URL's real URI travels sealed, never in clear (redaction).
                    SEALED_COLUMN: pa.array(
                        [changes.sealed.get(i) for i in sorted(wanted)], pa.string()
                    ),
                }
            ),
        )
        t = time.perf_counter()
        extract_summary = stages.extract(
            manifest_uri, batch_descriptors, config, local_output=batch_local
        )
        timings["extract_s"] = time.perf_counter() - t
        extracted_ids = _ids_in(batch_descriptors)
        failures = extract_summary["failed"]

    # The new version refers to the shards it shares with the live one (less what changed,
    # went away or is extracted again) and to this run's batch: it copies no descriptor.
    t = time.perf_counter()
    drop = set(changes.changed) | set(changes.deleted) | suspects
    reused, carried = version_data.carry_legacy(reused, drop, batch, config.shard_size)
    batches = [f for f in (carried, batch_descriptors if extracted_ids else None) if f]
    layout = JobLayout(vdir)
    indexed, used = version_data.compose_descriptors(layout.descriptors, reused, drop, batches)
    if not indexed:
        raise ValueError(f"{corpus}: nothing to index (no images, or every one failed)")
    live_ids = {i for ref in reused for i in ref.ids if i not in drop} | extracted_ids
    if carried:
        live_ids |= _ids_in(carried)
    if len(live_ids) != indexed:
        raise RuntimeError(f"{vdir}: {indexed} descriptors for {len(live_ids)} images")
    layers: list[str] = []
    if upfront_local:
        layers = list(live_layers)
        if batch_local and extracted_ids:
            layers.append(batch_local)
        layers = _layers_in_use(layers, live_ids)
    computed_on_first_use = None
    compacted: dict[str, Any] | None = None
    if local_info is not None and not upfront_local:
        inherited: list[local_feature_cache.Inherited] = []
        if live_dir and compare_previous:
            # Every image whose bytes are not the ones the live version described (changed,
            # deleted, new or back again, extracted again) is read from no inherited layer.
            stale = set(changes.to_extract) | set(changes.deleted) | suspects
            shared = storage.join(root, DATA_DIR)
            readable = _readable_layers(live_dir)
            inherited = local_feature_cache.carry_over(
                readable, stale, live_ids, shared_under=shared
            )
        computed_on_first_use = local_feature_cache.FirstUse(
            storage.join(batch, FOLDERS["local_features"]), tuple(inherited)
        )
        if len(inherited) > local_feature_cache.MAX_INHERITED_LAYERS:
            # A layer per search request, version after version: copied into one of this
            # version's own, so a store opens one folder instead of hundreds.
            t_compact = time.perf_counter()
            computed_on_first_use, compacted = local_feature_cache.compact(
                computed_on_first_use, local_info, config.shard_size
            )
            timings["compact_s"] = time.perf_counter() - t_compact
        layers = [layer.folder for layer in computed_on_first_use.inherited]
    timings["compose_s"] = time.perf_counter() - t
    composed = {
        "model": info,
        "inputs": now_state.rows,
        "indexed": indexed,
        "failed": failures,
        "local_features": {"model": local_info} if local_info else None,
    }

    live_record = live_manifest if compare_previous else None
    keep_dir, whitening_why, kept_record = _whitening_decision(
        live_record, live_dir, config, changes, compare_previous, relearn_fraction
    )
    live_codebook = storage.join(live_dir, FOLDERS["codebook"]) if live_dir else None
    decision: dict[str, Any] = {}

    live_whitened = bool((live_record or {}).get("whitening"))

    def keep_codebook(index_input: str) -> str | None:
        whitened_now = index_input == JobLayout(vdir).whitened_descriptors
        stale = None
        if live_codebook is None:
            stale = "no codebook yet"
        elif not compare_previous:
            stale = "the model changed"
        elif whitened_now != live_whitened or (whitened_now and keep_dir is None):
            stale = "the whitening changed"
        if stale:
            decision.update(retrain=True, why=stale, ratio=None)
            return None
        new_vectors = _vectors_of(index_input, extracted_ids, int(info["dim"]))
        n, d = indexed, _dim_of(index_input)
        retrain, why, ratio = _needs_training(
            read_codebook_manifest(live_codebook),
            new_vectors,
            n,
            d,
            config,
            drift_threshold,
            live_codebook,
        )
        decision.update(retrain=retrain, why=why, ratio=ratio)
        return None if retrain else live_codebook

    t = time.perf_counter()
    built = run_index_job(
        corpus,
        vdir,
        config,
        prepared=PreparedCorpus(
            composed, tuple(layers) if upfront_local else (), computed_on_first_use
        ),
        keep_whitening=lambda: keep_dir,
        keep_codebook=keep_codebook,
    )
    timings["job_s"] = time.perf_counter() - t
    learning = built["learning"]
    whitening_record = {}
    if learning.get("sha256"):
        whitening_record = kept_record or {
            "sha256": learning["sha256"],
            "learned_in": name,
            "learned_on_images": indexed,
            "changed_since_learned": 0,
            "settings": {"dim": config.whitening_dim, "shrinkage": config.whitening_shrinkage},
        }

    failed_ids = {i for i in changes.to_extract if i not in extracted_ids}
    state_rows = corpus_state.write_state(vdir, now_state.path, leave_out=failed_ids)
    scratch_dir.cleanup()
    if state_rows != indexed:
        raise RuntimeError(f"{vdir}: state of {state_rows} images, index of {indexed}")
    timings["total_s"] = time.perf_counter() - start
    repaired = len(set(changes.new) & suspects)  # indexed before, extracted again
    counts = {
        "new": len(changes.new) - repaired,
        "changed": len(changes.changed),
        "deleted": len(changes.deleted),
        "unchanged": changes.unchanged,
        # of the unchanged: could not be read to tell (an outage), kept as indexed
        "kept_unreadable": len(changes.kept_unreadable),
        "repaired": repaired,
        "failed": failures,
    }
    # inputs (the corpus now) = indexed + failed
    summary = write_summary(
        vdir,
        "reindex",
        inputs=now_state.rows,
        indexed=indexed,
        failed=failures,
        timings=timings,
        **{k: v for k, v in counts.items() if k != "failed"},
        extracted=len(changes.to_extract),
        version=name,
        previous_version=live,
        retrained=decision.get("retrain", True),
        retrain_reason=decision.get("why", "no codebook yet"),
        drift_ratio=decision.get("ratio"),
        drift_threshold=drift_threshold,
        whitening=whitening_record or None,
        whitening_reason=whitening_why if learns(config) else "learning is off",
        local_feature_layers=layers,
        local_features_compacted=compacted,
        corpus=corpus,
    )
    write_manifest(
        storage.join(vdir, VERSION_MANIFEST),
        VERSION_KIND,
        {
            "version": name,
            "previous": live,
            "model": info,
            "local_model": local_info,
            "whitening": whitening_record or None,
            # Shared data this version reads outside its own folder (pruning keeps it): its
            # descriptors' batches, its local features' (on first use, where it computes them).
            "uses": sorted(
                set(used)
                | {_batch_of(root, layer) for layer in layers}
                | ({name} if computed_on_first_use is not None else set())
            ),
            **counts,
            "indexed": indexed,
        },
    )
    lease.check()  # a run whose lease was taken over never moves CURRENT
    versions.set_current(root, name)
    summary["pruned"] = versions.prune(root, keep)
    return summary


def _ids_in(directory: str) -> set[str]:
    """The ids of the descriptors of a committed folder (this run's batch: O(changes))."""
    return {
        i
        for m in descriptor_shards.list_shards(directory)
        for i in descriptor_shards.read_table(directory, m).column("id").to_pylist()
    }


def _layers_in_use(layers: list[str], live_ids: set[str]) -> list[str]:
    """The layers that still hold the newest features of a live image (oldest first)."""
    kept, covered = [], set()
    for layer in reversed(layers):
        ids = {i for m in local_feature_shards.list_shards(layer) for i in m["ids"]}
        fresh = (ids & live_ids) - covered
        if fresh:
            kept.append(layer)
            covered |= fresh
    return list(reversed(kept))


def _readable_layers(version_dir: str) -> list[local_feature_cache.Inherited]:
    """The local-feature layers a version reads, in order, each with what it is read without."""
    bundle = Bundle.read(version_dir)
    visible = [local_feature_cache.Inherited(f) for f in bundle.extracted_local_features]
    where = bundle.first_use
    if where is not None:
        own = local_feature_cache.layers(where.root)
        visible += [*where.inherited, *(local_feature_cache.Inherited(f) for f in own)]
    return visible


def _batch_of(root: str, layer: str) -> str:
    """The batch folder (ROOT/data/vNNNNNN) a local-feature layer belongs to."""
    prefix = storage.join(root, DATA_DIR).rstrip("/") + "/"
    if not layer.startswith(prefix):
        return layer
    return layer[len(prefix) :].split("/", 1)[0]


def _vectors_of(directory: str, ids: set[str], dim: int) -> np.ndarray:
    """The vectors of ``ids`` in a descriptor folder (the newly extracted images, as indexed)."""
    if not ids:
        return np.zeros((0, dim), np.float32)
    all_ids, _, vectors = descriptor_shards.read_all(directory)
    mask = np.fromiter((i in ids for i in all_ids), bool, len(all_ids))
    return vectors[mask].astype(np.float32)


def _dim_of(directory: str) -> int:
    return int(descriptor_shards.list_shards(directory)[0]["dim"])
