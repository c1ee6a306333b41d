"""Local features computed on first use (``--local-at first-use``) and kept for every later use.

A job built this way extracts only the global descriptors of its corpus. The local features of
a corpus image are computed when something first needs them, the learn stage's mined pairs or a
search's shortlists, and kept under the job's ``local_features/`` folder as *layers*, each a
small extraction run of its own::

    local_features/first-use-<digest>/   plan.json + plan.refs.parquet (the images it computes,
                                         cut into shards), part-*.arrow, errors, manifests

A layer is named by the digest of the image ids it computes, so a request interrupted and made
again resumes its own layer (committed shards are kept), and two runs asking for overlapping
images at once write different layers: an image's features are a deterministic function of its
bytes and the model, so whichever copy a store reads is the same. A corpus image that is never
mined nor shortlisted never pays for local features (at a million images, the default mining
sample and its neighbours are ~5% of the corpus: README, "Cost of the default job").

A re-index version does not start from nothing: it *inherits* the layers the live version could
read (its own and those it inherited), each less the images whose bytes changed, went away or
came back since (:func:`carry_over`), listed in the version's ``local_features_inherited.parquet``
(:class:`FirstUse`). Its own layers go under ``ROOT/data/<version>/local_features``, where the
versions that inherit them keep them from pruning (``version.json``'s ``uses``). A layer no live
image reads any more is not inherited; past :data:`MAX_INHERITED_LAYERS` a version copies them
into one layer of its own (:func:`compact`).

Images are read again from the corpus's own run plans (the descriptor folder's, and for a
re-index version the batch folders its shards come from). An input whose URL carried a secret
was sealed with the key of the run that listed it: a later run cannot open it, and its error row
says so (``unavailable``) instead of retrying it forever. An image that failed for good (corrupt,
unavailable) is not asked for again; one whose read failed for a transient reason is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from retrieval import plan, storage
from retrieval.corpus import iter_shards
from retrieval.image_refs import ImageRef
from retrieval.plan import PlanError
from retrieval.redaction import SealError, unseal
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.shards.descriptor_shards import ErrorRow
from retrieval.shards.local_feature_shards import LocalFeatureStore

log = logging.getLogger(__name__)

LAYER_PREFIX = "first-use-"
LIST_THREADS = 16  # layers whose manifests are read at once
UNAVAILABLE = (
    "unavailable: the image's URL carries a secret that only the run which listed it could "
    "open, so its local features cannot be computed later; index with --local-at extract to "
    "compute them with the global descriptors"
)


def finished_layers(root: str, *, skip: Collection[str] = ()) -> list[tuple[str, list[dict]]]:
    """(folder, its shard manifests) of each finished layer under ``root`` (every planned shard
    committed), in name order, but those in ``skip`` (known finished: their manifests are not
    read again). A layer still being written is left out: the request that made it finishes
    it. Layers are listed :data:`LIST_THREADS` at a time (a root holds one per request)."""
    candidates = [
        folder
        for folder in storage.list_folders(root)
        if folder.rstrip("/").rsplit("/", 1)[-1].startswith(LAYER_PREFIX) and folder not in skip
    ]
    found = zip(candidates, _listed(candidates), strict=True)
    return [(folder, listed) for folder, listed in found if isinstance(listed, list) and listed]


def _listed(
    folders: Sequence[str], catch: tuple[type[Exception], ...] = (PlanError, FileNotFoundError)
) -> list[list[dict] | Exception]:
    """Each folder's committed shard manifests, or the exception of ``catch`` that says why
    there are none (not finished, no layer at all)."""

    def listed(folder: str) -> list[dict] | Exception:
        try:
            return local_feature_shards.list_shards(folder)
        except catch as exc:
            return exc

    if len(folders) < 2:
        return [listed(folder) for folder in folders]
    with ThreadPoolExecutor(min(LIST_THREADS, len(folders)), "list-layers") as pool:
        return list(pool.map(listed, folders))


def layers(root: str, *, skip: Collection[str] = ()) -> list[str]:
    """The finished layers' folders under ``root``, in name order (less ``skip``)."""
    return [folder for folder, _ in finished_layers(root, skip=skip)]


def folders(uri: str) -> list[str]:
    """The local-feature folders ``uri`` names: itself when it holds shards of its own (an
    extract run's), else the first-use layers under it (a job's ``local_features/``)."""
    if storage.exists(plan.plan_uri(uri)):
        return [uri]
    return layers(uri)


def known_ids(
    manifests: Iterable[dict], excluded: frozenset[str] = frozenset()
) -> tuple[set[str], set[str]]:
    """(ids with features, ids that failed for good) over local-feature shard manifests, less
    ``excluded``."""
    have: set[str] = set()
    failed: set[str] = set()
    for manifest in manifests:
        have.update(manifest["ids"])
        failed.update(set(manifest.get("error_ids", ())) - set(manifest.get("retry_ids", ())))
    return have - excluded, failed - have - excluded


@dataclass(frozen=True)
class Inherited:
    """A layer an earlier version computed (or extracted), less the images that changed since."""

    folder: str
    excluded: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FirstUse:
    """Where a corpus's local features are read and made on first use: the layers inherited
    from earlier versions (a re-index), then those computed under ``root`` (later ones win)."""

    root: str
    inherited: tuple[Inherited, ...] = ()

    def folders(self) -> list[str]:
        return [layer.folder for layer in self.inherited] + layers(self.root)

    def store(self) -> LocalFeatureStore:
        """A store over every layer there is now (:meth:`refresh` adds later ones)."""
        excluded = {layer.folder: layer.excluded for layer in self.inherited if layer.excluded}
        return LocalFeatureStore(self.folders(), excluded=excluded)

    def refresh(self, store: LocalFeatureStore) -> LocalFeatureStore:
        """``store`` reading the layers finished under ``root`` since it was opened, too
        (only those new layers' manifests are read: a root holds one layer per request)."""
        store.add(layers(self.root, skip=set(store.directories)))
        return store

    def known(self) -> tuple[set[str], set[str]]:
        """(ids with features, ids that failed for good) over every layer."""
        have: set[str] = set()
        failed: set[str] = set()
        inherited = list(
            zip(self.inherited, _listed([i.folder for i in self.inherited]), strict=True)
        )
        parts: list[tuple[list[dict], frozenset[str]]] = []
        for layer, listed in inherited:
            if not isinstance(listed, list):  # a store would fail to open it: say so now
                raise FileNotFoundError(f"{layer.folder}: inherited layer unreadable: {listed}")
            parts.append((listed, layer.excluded))
        parts += [(listed, frozenset()) for _, listed in finished_layers(self.root)]
        for manifests, excluded in parts:
            more_have, more_failed = known_ids(manifests, excluded)
            have |= more_have
            failed |= more_failed
        return have, failed - have


INHERITED_COLUMNS = pa.schema([("layer", pa.string()), ("excluded", pa.list_(pa.string()))])


def write_inherited(uri: str, inherited: Sequence[Inherited]) -> None:
    """The inherited layers and what each is read without, as one small Parquet file."""
    storage.write_parquet(
        uri,
        pa.table(
            {
                "layer": [layer.folder for layer in inherited],
                "excluded": [sorted(layer.excluded) for layer in inherited],
            },
            schema=INHERITED_COLUMNS,
        ),
    )


def read_inherited(uri: str) -> tuple[Inherited, ...]:
    table = storage.read_parquet(uri)
    return tuple(
        Inherited(folder, frozenset(excluded))
        for folder, excluded in zip(
            table.column("layer").to_pylist(), table.column("excluded").to_pylist(), strict=True
        )
    )


def carry_over(
    visible: Sequence[Inherited], stale: set[str], live: set[str], *, shared_under: str
) -> list[Inherited]:
    """The layers a new version inherits from what the live one reads (``visible``, in layer
    order): each less the ``stale`` ids (whose bytes changed, went away or came back), kept
    only if a ``live`` image still reads it. Only layers under ``shared_under`` (the root's
    data folder, which pruning keeps while a version uses it) can be inherited; an unreadable
    one is left out, and its images get their features again on first use."""
    prefix = shared_under.rstrip("/") + "/"
    shared = []
    for layer in visible:
        if layer.folder.startswith(prefix):
            shared.append(layer)
        else:
            log.warning("%s: not under %s, so not inherited", layer.folder, shared_under)
    kept: list[Inherited] = []
    found = _listed([layer.folder for layer in shared], (PlanError, FileNotFoundError, ValueError))
    for layer, manifests in zip(shared, found, strict=True):
        if not isinstance(manifests, list):
            log.warning("%s: not inherited (%s)", layer.folder, manifests)
            continue
        ids = {i for m in manifests for i in (*m["ids"], *m.get("error_ids", ()))}
        excluded = frozenset((layer.excluded | stale) & ids)
        if (ids - excluded) & live:
            kept.append(Inherited(layer.folder, excluded))
    return kept


# Inherited layers a re-index version reads as they are; beyond, it compacts them (compact()).
MAX_INHERITED_LAYERS = 64
COMPACT_THREADS = 16  # images read at once while compacting


def compact(first_use: FirstUse, local_info: dict, shard_size: int) -> tuple[FirstUse, dict]:
    """``first_use`` with its inherited layers copied into one layer under its own root, so a
    store opens one folder where it opened many (a layer per search request, inherited version
    after version). Each image's stored bytes are copied as they are (checked against their
    layer's manifest as they are read, never computed again); what a layer excludes is left
    out, a later layer's copy of an image wins, and the images that failed for good keep their
    error rows (so they are not asked for again). Returns the new view and what was copied.
    Resumable: a compaction interrupted and run again keeps the shards it committed."""
    where: dict[str, tuple[str, dict, int]] = {}  # id -> (layer, manifest, position)
    failed: dict[str, tuple[str, dict]] = {}  # id -> (layer, manifest) of its error row
    inherited, kept = [], []
    listed = _listed([layer.folder for layer in first_use.inherited])
    for layer, manifests in zip(first_use.inherited, listed, strict=True):
        if not isinstance(manifests, list):
            raise FileNotFoundError(f"{layer.folder}: inherited layer unreadable: {manifests}")
        if any(m.get("format") != local_feature_shards.BATCH_PER_IMAGE for m in manifests):
            kept.append(layer)  # shards of the older layout, read whole: inherited as they are
            continue
        inherited.append(layer)
        for manifest in manifests:
            for position, image_id in enumerate(manifest["ids"]):
                if image_id not in layer.excluded:
                    where[image_id] = (layer.folder, manifest, position)
                    failed.pop(image_id, None)
            for_good = set(manifest.get("error_ids", ())) - set(manifest.get("retry_ids", ()))
            for image_id in for_good - layer.excluded - where.keys():
                failed[image_id] = (layer.folder, manifest)
    ids = sorted(where.keys() | failed.keys())
    record = {"layers": len(inherited), "images": len(where), "failed": len(failed), "bytes": 0}
    if not ids:
        return FirstUse(first_use.root, tuple(kept)), record
    by_layer: dict[str, set[str]] = {}
    for image_id in ids:
        folder = where[image_id][0] if image_id in where else failed[image_id][0]
        by_layer.setdefault(folder, set()).add(image_id)
    refs: dict[str, ImageRef] = {}
    for folder, wanted in by_layer.items():  # a layer's own plan names its images (as listed)
        refs.update((ref.id, ref) for ref in plan.read_refs(folder, wanted))
    missing = [i for i in ids if i not in refs]
    if missing:
        raise PlanError(
            f"{len(missing)} image(s) to compact are in no layer's plan (e.g. {missing[0]})"
        )
    digest = hashlib.sha256(("compact\n" + "\n".join(ids)).encode()).hexdigest()[:16]
    target = storage.join(first_use.root, LAYER_PREFIX + digest)
    run_plan = plan.write_extraction_plan(
        target,
        iter_shards([refs[i] for i in ids], shard_size),
        source=f"compaction of {len(inherited)} inherited local-feature layers",
        shard_size=shard_size,
    )
    errors_of: dict[tuple[str, str], dict[str, ErrorRow]] = {}

    def error_row(image_id: str) -> ErrorRow:
        folder, manifest = failed[image_id]
        key = (folder, manifest["shard"])
        if key not in errors_of:
            rows = local_feature_shards.read_errors(folder, manifest)
            errors_of[key] = {row.id: row for row in rows}
        return errors_of[key][image_id]

    def stored(image_id: str) -> pa.RecordBatch:
        folder, manifest, position = where[image_id]
        return local_feature_shards.read_image_batch(folder, manifest, position)

    with ThreadPoolExecutor(COMPACT_THREADS, "compact") as pool:
        for shard in run_plan.shards:
            if local_feature_shards.committed_manifest(target, shard, local_info) is not None:
                continue
            spec = plan.read_shard_spec(target, shard.shard_id)
            have = [ref.id for ref in spec.refs if ref.id in where]
            batches = list(pool.map(stored, have))
            errors = [error_row(ref.id) for ref in spec.refs if ref.id not in where]
            schema = local_feature_shards.file_schema(where[have[0]][1]) if have else None
            table = (
                pa.Table.from_batches(batches, schema=schema)
                if schema is not None
                else local_feature_shards.empty_table(local_info)
            )
            manifest = local_feature_shards.write_table(target, spec, table, errors, local_info)
            record["bytes"] += manifest["files"]["data"]["bytes"]
    record["layer"] = target
    return FirstUse(first_use.root, tuple(kept)), record


def corpus_refs(descriptors: str, ids: Iterable[str]) -> dict[str, ImageRef]:
    """{id: reference} for ``ids`` from the extraction plans the corpus's descriptors come
    from: ``descriptors``' own, and the folders its shards refer to (a re-index version)."""
    wanted = set(ids)
    folders = {descriptors}
    for manifest in descriptor_shards.list_shards(descriptors):
        if descriptor_shards.is_reference(manifest):
            folders.add(descriptor_shards.source_of(descriptors, manifest)[0])
    found: dict[str, ImageRef] = {}
    for folder in sorted(folders):
        if not wanted - found.keys():
            break
        try:
            refs = plan.read_refs(folder, wanted - found.keys())
        except PlanError:  # a folder without a listing of its own (composed references)
            continue
        for ref in refs:
            found.setdefault(ref.id, ref)
    return found


def openable(ref: ImageRef) -> ImageRef:
    """``ref``, or an error reference when its sealed URI cannot be opened by this run."""
    if ref.sealed is None or ref.problem:
        return ref
    try:
        unseal(ref.sealed)
    except SealError:
        return ImageRef(ref.id, ref.uri, UNAVAILABLE)
    return ref


@dataclass(frozen=True)
class Request:
    """What a request for the features of some images comes to: which were there already,
    which failed before, which are not in the corpus, and the layer that computes the rest."""

    requested: int
    cached: int
    failed_before: int
    unknown: tuple[str, ...]
    layer: str | None = None
    refs: tuple[ImageRef, ...] = field(default=(), repr=False)

    @property
    def to_compute(self) -> int:
        return len(self.refs)


def plan_request(first_use: FirstUse, descriptors: str, ids: Iterable[str]) -> Request:
    """Which of ``ids`` need their features computed, and the layer under ``first_use.root``
    that will hold them."""
    root = first_use.root
    wanted = sorted(set(ids))
    have, failed = first_use.known()
    todo = [i for i in wanted if i not in have and i not in failed]
    refs = corpus_refs(descriptors, todo) if todo else {}
    unknown = tuple(i for i in todo if i not in refs)
    if unknown:
        log.warning(
            "%d image id(s) asked for local features are not in the corpus's plans (e.g. %s)",
            len(unknown),
            unknown[0],
        )
    chosen = tuple(openable(refs[i]) for i in sorted(refs))
    layer = None
    if chosen:
        digest = hashlib.sha256("\n".join(r.id for r in chosen).encode()).hexdigest()[:16]
        layer = storage.join(root, LAYER_PREFIX + digest)
    return Request(
        len(wanted),
        sum(i in have for i in wanted),
        sum(i in failed for i in wanted),
        unknown,
        layer,
        chosen,
    )


def write_layer_plan(
    request: Request, descriptors: str, shard_size: int, local_info: dict
) -> list[str]:
    """Write the request's layer plan (kept if the same one is there) and return the ids of its
    shards not yet committed for ``local_info``'s model."""
    if request.layer is None:
        return []
    run_plan = plan.write_extraction_plan(
        request.layer,
        iter_shards(request.refs, shard_size),
        source=f"first use of local features: {descriptors}",
        shard_size=shard_size,
    )
    return [
        shard.shard_id
        for shard in run_plan.shards
        if local_feature_shards.committed_manifest(request.layer, shard, local_info) is None
    ]
