"""What a re-index version holds, sharing its data with the versions before it.

    ROOT/data/vK/descriptors/       a batch: the shards run vK extracted (never changed again)
    ROOT/data/vK/local_features/    their local features (layers: a later batch shadows an id)
    ROOT/versions/vN/descriptors/   version vN's descriptors: a plan of references, one per
                                    batch shard it reads, each naming the ids it leaves out

A re-index extracts only new and changed images, into its own batch; the new version's
descriptor folder then refers to every batch shard that still holds a live image (its source
shard and data checksum, plus the ids of that shard which were changed, deleted, or extracted
again since), and to the shards of its own batch (:func:`compose_descriptors`). It writes one
small manifest per shard for the images it did not extract, never their descriptors; every
reader of descriptor shards reads a reference as the rows it keeps
(``retrieval/shards/descriptor_shards.py``). ``version.json``'s ``uses`` lists the batches a
version reads, so pruning deletes a batch only when no kept version uses it, and rollback
stays a move of ``CURRENT``.

What a version reuses it checks first (:func:`check_references`, :func:`damaged_local_ids`):
a shard whose files no longer match their manifest (size, SHA-256) is not trusted, and its
live images are extracted again into the new batch instead of failing a later stage.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from retrieval import checksums, plan, storage
from retrieval import shard_manifests as manifests
from retrieval.corpus import ImageRef, plan_shards
from retrieval.shards import descriptor_shards, local_feature_shards

log = logging.getLogger(__name__)

STAGE = "reindex"
CHECK_THREADS = 8  # shards checked at once (object stores: latency, not bandwidth)
# Descriptors of a version written before versions shared them, written once into the first
# re-index's batch (ROOT/data/vN/carried) and shared from there on.
CARRIED = "carried"


@dataclass(frozen=True)
class Reference:
    """A shard of the live version as checked: its manifest (a reference, or a shard of the
    version's own, from before versions shared data), the folder its data lives in, and the ids
    it keeps (read from the data, which was checked against the manifest on the way)."""

    manifest: dict[str, Any]
    folder: str
    ids: tuple[str, ...]

    @property
    def shared(self) -> bool:
        return descriptor_shards.is_reference(self.manifest)


def relative(from_folder: str, to_folder: str) -> str:
    """``to_folder`` as a path relative to ``from_folder`` (both on one store)."""
    if storage.is_local(from_folder) and not from_folder.startswith("file://"):
        return os.path.relpath(to_folder, from_folder).replace(os.sep, "/")
    a, b = from_folder.partition("://")[2], to_folder.partition("://")[2]
    return posixpath.relpath(b, a)


def check_references(directory: str) -> tuple[list[Reference], list[tuple[str, str, list[str]]]]:
    """The shards of a version's descriptor folder, each read and checked against its manifest:
    (intact ones with their ids, damaged ones as (source folder, source shard id, why))."""
    listed = descriptor_shards.list_shards(directory)

    def check(manifest: dict[str, Any]) -> Reference | tuple[str, str, list[str]]:
        folder, shard_id = descriptor_shards.source_of(directory, manifest)
        try:
            table = descriptor_shards.read_table(directory, manifest)
        except (checksums.ChecksumMismatchError, FileNotFoundError) as exc:
            return folder, shard_id, [str(exc)]
        ids = tuple(table.column("id").to_pylist())
        return Reference(manifest, folder, ids)

    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="check") as pool:
        results = list(pool.map(check, listed))
    intact = [r for r in results if isinstance(r, Reference)]
    damaged = [r for r in results if not isinstance(r, Reference)]
    return intact, damaged


def ids_of_damaged(
    directory: str, damaged: Sequence[tuple[str, str, list[str]]]
) -> dict[str, list[str]]:
    """{source shard: the ids it was extracted for} of damaged shards, from the run plan of the
    batch that extracted it (the data itself cannot be read), less the ids the version had
    dropped already. Ids that failed then are in the plan too; the caller keeps live ids."""
    by_source = {
        descriptor_shards.source_of(directory, m): m
        for m in descriptor_shards.list_shards(directory)
    }
    found = {}
    for folder, shard_id, _ in damaged:
        manifest = by_source[(folder, shard_id)]
        dropped = set(manifest.get("drop") or [])
        spec = plan.read_shard_spec(folder, shard_id)
        found[f"{folder}/{shard_id}"] = [r.id for r in spec.refs if r.id not in dropped]
    return found


def damaged_local_ids(layers: Sequence[str]) -> dict[str, list[str]]:
    """{local-feature shard: the ids whose newest features it holds} of the shards of
    ``layers`` (oldest first) whose files no longer match their manifests."""
    newest: dict[str, tuple[str, str]] = {}
    listed = []
    for layer in layers:
        for manifest in local_feature_shards.list_shards(layer):
            listed.append((layer, manifest))
            newest.update(dict.fromkeys(manifest["ids"], (layer, manifest["shard"])))

    def check(item: tuple[str, dict[str, Any]]) -> list[str]:
        return local_feature_shards.damaged(*item)

    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="check") as pool:
        problems = list(pool.map(check, listed))
    found = {}
    for (layer, manifest), why in zip(listed, problems, strict=True):
        if why:
            key = (layer, manifest["shard"])
            found[f"{layer}/{manifest['shard']}"] = [i for i in manifest["ids"] if newest[i] == key]
    return found


def _as_source(manifest: dict[str, Any]) -> dict[str, Any]:
    """The source shard's manifest as a reference remembers it (enough to refer to it anew)."""
    drop = manifest.get("drop") or []
    return {
        "shard": manifest["source"]["shard"],
        "rows": manifest["rows"] + len(drop),
        "rows_with_notes": manifest.get("rows_with_notes", 0),
        "dim": manifest["dim"],
        "files": {"data": manifest["files"]["data"]},
        "model": manifest["model"],
    }


def _batch_name(folder: str) -> str:
    """``vK`` of ROOT/data/vK/<kind>: the batch a shard's folder belongs to."""
    return folder.rstrip("/").replace(os.sep, "/").split("/")[-2]


def _prefix(folder: str) -> str:
    """What a batch folder's shard ids are prefixed with in a version (unique per folder)."""
    parts = folder.rstrip("/").replace(os.sep, "/").split("/")
    return parts[-2] if parts[-1] == "descriptors" else f"{parts[-2]}-{parts[-1]}"


def compose_descriptors(
    directory: str,
    previous: Iterable[Reference],
    drop: set[str],
    batches: Sequence[str],
) -> tuple[int, list[str]]:
    """Write the descriptor folder ``directory`` of a new version: references to the shards
    ``previous`` (the live version's, checked) less the ids in ``drop``, then to every shard of
    the new batch folders ``batches`` (ROOT/data/vN/...). Manifests first, the plan last.
    Returns (rows, the batches it reads)."""
    planned: list[tuple[str, dict[str, Any]]] = []
    for ref in previous:
        if not ref.shared:
            raise ValueError(f"{ref.folder}/{ref.manifest['shard']} is not a shared shard")
        leaving = set(ref.ids) & drop
        if len(leaving) == len(ref.ids):
            continue  # nothing of it is live any more
        gone = sorted(set(ref.manifest.get("drop") or []) | leaving)
        body = descriptor_shards.reference(
            relative(directory, ref.folder),
            _as_source(ref.manifest),
            shard_id=ref.manifest["shard"],
            drop=gone,
        )
        planned.append((ref.manifest["shard"], body))
    for folder in batches:
        for manifest in descriptor_shards.list_shards(folder):
            if manifest["rows"] == 0:
                continue  # every image of it failed
            shard_id = f"{_prefix(folder)}-{manifest['shard']}"
            body = descriptor_shards.reference(
                relative(directory, folder), manifest, shard_id=shard_id
            )
            planned.append((shard_id, body))
    if not planned:
        return 0, []
    planned.sort(key=lambda item: item[0])  # batches in order, shards in plan order
    for shard_id, body in planned:
        manifests.commit(directory, shard_id, body)
    plan.write_plan(
        directory,
        [plan.PlannedShard(i, b["rows"], b["input_digest"]) for i, b in planned],
        stage=STAGE,
    )
    used = {_batch_name(descriptor_shards.source_of(directory, b)[0]) for _, b in planned}
    return sum(b["rows"] for _, b in planned), sorted(used)


def carry_legacy(
    references: Sequence[Reference], drop: set[str], batch: str, shard_size: int
) -> tuple[list[Reference], str | None]:
    """Shards of a version written before versions shared data (descriptors in the version's
    own folder, which pruning deletes) written once, less ``drop``, into ``batch``/carried as
    shards of their own, to be shared from then on like any batch's. Returns the shared
    references and that folder (None when there was nothing to carry)."""
    legacy = [r for r in references if not r.shared]
    shared = [r for r in references if r.shared]
    rows = []
    for ref in legacy:
        table = descriptor_shards.read_table(ref.folder, ref.manifest)
        shard = descriptor_shards.shard_of(ref.manifest, table)
        columns = {c: table.column(c).to_pylist() for c in ("sha256", "width", "height", "notes")}
        for i, image_id in enumerate(shard.ids):
            if image_id not in drop:
                rows.append(
                    descriptor_shards.DescriptorRow(
                        image_id,
                        shard.uris[i],
                        columns["sha256"][i],
                        columns["width"][i],
                        columns["height"][i],
                        shard.vectors[i],
                        columns["notes"][i],
                    )
                )
    if not rows:
        return shared, None
    rows.sort(key=lambda r: r.id)
    folder = storage.join(batch, CARRIED)
    by_id = {r.id: r for r in rows}
    specs = plan_shards([ImageRef(r.id, r.uri) for r in rows], shard_size)
    info = legacy[0].manifest["model"]
    for spec in specs:
        descriptor_shards.write_shard(folder, spec, [by_id[r.id] for r in spec.refs], [], info)
    plan.write_extraction_plan(folder, specs, source=STAGE, shard_size=shard_size)
    log.warning(
        "%d descriptors of a version from before versions shared data were written once into "
        "%s; later versions share them from there",
        len(rows),
        folder,
    )
    return shared, folder
