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

Images are read again from the corpus's own run plans (the descriptor folder's, and for a
re-index version the batch folders its shards come from). An input whose URL carried a secret
was sealed with the key of the run that listed it: a later run cannot open it, and its error row
says so (``unavailable``) instead of retrying it forever. An image that failed for good (corrupt,
unavailable) is not asked for again; one whose read failed for a transient reason is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from retrieval import plan, storage
from retrieval.corpus import iter_shards
from retrieval.image_refs import ImageRef
from retrieval.plan import PlanError
from retrieval.redaction import SealError, unseal
from retrieval.shards import descriptor_shards, local_feature_shards

log = logging.getLogger(__name__)

LAYER_PREFIX = "first-use-"
UNAVAILABLE = (
    "unavailable: the image's URL carries a secret that only the run which listed it could "
    "open, so its local features cannot be computed later; index with --local-at extract to "
    "compute them with the global descriptors"
)


def finished_layers(root: str) -> list[tuple[str, list[dict]]]:
    """(folder, its shard manifests) of each finished layer under ``root`` (every planned shard
    committed), in name order. A layer still being written is left out: the request that made
    it finishes it."""
    found = []
    for folder in storage.list_folders(root):
        if not folder.rstrip("/").rsplit("/", 1)[-1].startswith(LAYER_PREFIX):
            continue
        try:
            found.append((folder, local_feature_shards.list_shards(folder)))
        except (PlanError, FileNotFoundError):
            continue
    return found


def layers(root: str) -> list[str]:
    """The finished layers' folders under ``root``, in name order."""
    return [folder for folder, _ in finished_layers(root)]


def folders(uri: str) -> list[str]:
    """The local-feature folders ``uri`` names: itself when it holds shards of its own (an
    extract run's), else the first-use layers under it (a job's ``local_features/``)."""
    if storage.exists(plan.plan_uri(uri)):
        return [uri]
    return layers(uri)


def known_ids(manifests: Iterable[dict]) -> tuple[set[str], set[str]]:
    """(ids with features, ids that failed for good) over local-feature shard manifests."""
    have: set[str] = set()
    failed: set[str] = set()
    for manifest in manifests:
        have.update(manifest["ids"])
        failed.update(set(manifest.get("error_ids", ())) - set(manifest.get("retry_ids", ())))
    return have, failed - have


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


def plan_request(root: str, descriptors: str, ids: Iterable[str]) -> Request:
    """Which of ``ids`` need their features computed, and the layer that will hold them."""
    wanted = sorted(set(ids))
    have, failed = known_ids(m for _, listed in finished_layers(root) for m in listed)
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
