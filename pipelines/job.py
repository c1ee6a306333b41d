"""The default indexing job, declared once, and the bundle it leaves for search.

    corpus ─► extract (GeM) ─► learn (mine pairs, compute their images' local features on first
    use, keep the verified ones, learn a whitening; no labels) ─► whiten ─► train (codebook) ─►
    index (groups) ─► merge ─► bundle.json

    queries ─► describe (the bundle's own model: GeM + local features) ─► search (whiten, global
    shortlist, its images' local features on first use, spatial verification, verified query
    expansion) ─► results/results.parquet

With ``--local-at extract`` the extract stage makes every corpus image's local features in the
same pass (one decode) and nothing is computed later (:data:`FIRST_USE` lists what differs).

Everything lands under one output folder (:class:`JobLayout`). ``retrieval evaluate``, ``retrieval
submit`` (Dataflow and Spark), ``retrieval reindex`` and the demo all run :data:`INDEX_STAGES`
through :func:`run_index_job`, and search answers with :class:`BundleSearch`, so the number a
report gives is the number a user's job reproduces. A setting that turns a stage off
(``--local-features none``, ``--no-learn``) turns it off in every one of them, and
``--local-at`` moves local features in every one of them (:func:`stages_for`).
Every stage is idempotent: a re-run skips committed shards, groups, codebooks and whitenings,
whichever runner wrote them.

The bundle (``bundle.json``, written last: its presence commits the job) is self-describing:
where the index, the whitening and the corpus's local features are (relative to the bundle), the
model that described the corpus, and the search defaults; ``retrieval search --index BUNDLE
--query-images URI`` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import runners, stages
from pipelines.config import RunConfig, build_config, bundle_settings
from pipelines.runners import WorkerTask
from retrieval import leases, local_feature_cache, shard_manifests, storage, versions
from retrieval.index.search import INDEX_KIND, INDEX_MANIFEST, SearchableIndex, load_index
from retrieval.learning.whitening import (
    INFO_FILE,
    InsufficientPairsError,
    LearnedWhitening,
    load_whitening,
    whitened_model_info,
)
from retrieval.local_feature_cache import FirstUse
from retrieval.local_features.extractor import local_info_for
from retrieval.manifests import read_manifest, utc_now
from retrieval.plan import PlanError
from retrieval.rerank.shortlist import (
    RerankConfig,
    Reranked,
    rerank_search,
    reranked_table,
    shortlisted_ids,
)
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
# The first-use layers a re-index version inherits, less what changed (local_feature_cache).
INHERITED_FILE = "local_features_inherited.parquet"
BUNDLE_KIND = "retrieval_bundle"
BUNDLE_VERSION = 1


@dataclass(frozen=True)
class JobLayout:
    """Where each stage of a job writes, under one output folder."""

    root: str

    def __getattr__(self, name: str) -> str:
        if name in FOLDERS:
            return storage.join(self.root, FOLDERS[name])
        raise AttributeError(name)

    @property
    def bundle(self) -> str:
        return storage.join(self.root, BUNDLE_FILE)

    def folders(self) -> dict[str, str]:
        return {name: storage.join(self.root, folder) for name, folder in FOLDERS.items()}


# Output name -> folder under the job's output (reads/writes of the stages below name these).
FOLDERS = {
    "descriptors": "descriptors",
    "local_features": "local_features",
    "whitening": "whitening",
    "whitened_descriptors": "whitened_descriptors",
    "codebook": "codebook",
    "index_groups": "index_groups",
    "index": "index",
    "query_descriptors": "query_descriptors",
    "query_local_features": "query_local_features",
    "results": "results",
}


@dataclass(frozen=True)
class Stage:
    """One stage of the job: what it does, where it runs, what it reads and writes."""

    name: str
    does: str
    where: str  # "workers": mapped over work items by the runner; "driver": where the job runs
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    def describe(self, layout: JobLayout, source: str | None = None) -> str:
        paths = layout.folders()
        reads = [source if r == "input" else paths[r] for r in self.reads]
        writes = [paths[w] for w in self.writes]
        return (
            f"{self.name} ({self.where}): {self.does}\n"
            f"    reads {', '.join(str(r) for r in reads)}\n    writes {', '.join(writes)}"
        )


INDEX_STAGES: tuple[Stage, ...] = (
    Stage(
        "extract",
        "GeM descriptors and local features, one read and decode per image",
        "workers",
        ("input",),
        ("descriptors", "local_features"),
    ),
    Stage(
        "learn",
        "mine verified pairs (global kNN + spatial verification, no labels), learn a whitening",
        "driver",
        ("descriptors", "local_features"),
        ("whitening",),
    ),
    Stage(
        "whiten",
        "the whitened copy of every descriptor shard",
        "driver",
        ("descriptors", "whitening"),
        ("whitened_descriptors",),
    ),
    Stage(
        "train",
        "the codebook, on a seeded uniform sample",
        "driver",
        ("whitened_descriptors",),
        ("codebook",),
    ),
    Stage(
        "index",
        "codes of groups of descriptor shards",
        "workers",
        ("whitened_descriptors", "codebook"),
        ("index_groups",),
    ),
    Stage(
        "merge",
        "the index groups merged in rounds of bounded fan-in",
        "workers",
        ("index_groups",),
        ("index",),
    ),
)

QUERY_STAGES: tuple[Stage, ...] = (
    Stage(
        "describe",
        "the query images with the bundle's own model (GeM + local features)",
        "workers",
        ("input",),
        ("query_descriptors", "query_local_features"),
    ),
    Stage(
        "search",
        "whiten, global shortlist, spatial verification, verified query expansion",
        "driver",
        ("index", "query_descriptors", "query_local_features", "local_features"),
        ("results",),
    ),
)


def learns(config: RunConfig) -> bool:
    return bool(config.learn and config.local.enabled)


def stages_for(config: RunConfig, *, queries: bool = False) -> list[Stage]:
    """The job's stages under ``config``: without local features there is nothing to mine
    pairs with (no learn, no whiten) and nothing to verify; ``--no-learn`` drops learn/whiten.
    Where whiten is off, train and index read the raw descriptors."""
    chosen = []
    for stage in INDEX_STAGES:
        if stage.name in ("learn", "whiten") and not learns(config):
            continue
        if not learns(config) and "whitened_descriptors" in stage.reads:
            reads = tuple("descriptors" if r == "whitened_descriptors" else r for r in stage.reads)
            stage = replace(stage, reads=reads)
        if not config.local.enabled:
            stage = replace(
                stage,
                reads=tuple(r for r in stage.reads if r != "local_features"),
                writes=tuple(w for w in stage.writes if w != "local_features"),
            )
        elif first_use(config):
            stage = FIRST_USE.get(stage.name, stage)
        chosen.append(stage)
    if queries:
        for stage in QUERY_STAGES:
            if not config.local.enabled:
                drop = ("query_local_features", "local_features")
                stage = replace(
                    stage,
                    reads=tuple(r for r in stage.reads if r not in drop),
                    writes=tuple(w for w in stage.writes if w not in drop),
                )
            elif first_use(config):
                stage = FIRST_USE.get(stage.name, stage)
            chosen.append(stage)
    return chosen


def first_use(config: RunConfig) -> bool:
    """Whether corpus images get local features on first use (the default), not at extract."""
    return config.local.enabled and config.local_at == "first-use"


# The stages that differ when local features are computed on first use (``--local-at``).
FIRST_USE: dict[str, Stage] = {
    "extract": Stage(
        "extract",
        "GeM descriptors (local features come later, for the images that need them)",
        "workers",
        ("input",),
        ("descriptors",),
    ),
    "learn": Stage(
        "learn",
        "mine pairs by global kNN, compute the local features of their images on first use "
        "(workers), keep the spatially verified pairs (no labels), learn a whitening",
        "driver",
        ("descriptors", "local_features"),
        ("local_features", "whitening"),
    ),
    "search": Stage(
        "search",
        "whiten, global shortlist, local features of shortlisted images on first use "
        "(workers), spatial verification, verified query expansion",
        "driver",
        ("index", "query_descriptors", "query_local_features", "local_features"),
        ("local_features", "results"),
    ),
}


Announce = Callable[[int, int, Stage], None]


def _quiet(number: int, total: int, stage: Stage) -> None:
    log.info("[%d/%d] %s", number, total, stage.name)


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_fingerprint(directory: str, kind: str) -> list[str]:
    """The data checksums of a committed shard folder, in shard order (what a stage read)."""
    if kind == "descriptors":  # a reference's rows: its source's file less the ids it drops
        return [descriptor_shards.shard_digest(m) for m in descriptor_shards.list_shards(directory)]
    return [m["files"]["data"]["sha256"] for m in local_feature_shards.list_shards(directory)]


def learn_whitening_once(
    layout: JobLayout,
    config: RunConfig,
    timings: dict[str, float],
    local: Sequence[str],
    computed_on_first_use: FirstUse | None,
) -> dict[str, Any]:
    """The learn stage, skipped when ``whitening.json`` was learned from the same descriptors,
    local features and settings (its ``inputs`` fingerprint). Returns the learning record:
    the whitening's, or ``skipped`` with why (too few verified pairs: small or unrelated
    corpora), in which case the job indexes the raw descriptors."""
    # First use: the features are made from the images by the local model as mining asks,
    # and later searches add layers, so the model (not the layers) is what was learned from.
    local_inputs: Any = (
        local_info_for(config.local)["config_hash"]
        if first_use(config)
        else [_folder_fingerprint(folder, "local_features") for folder in local]
    )
    inputs = _fingerprint(
        _folder_fingerprint(layout.descriptors, "descriptors"),
        local_inputs,
        config.mining.as_dict(),
        config.verification.as_dict(),
        config.whitening_dim,
        config.whitening_shrinkage,
    )
    info_uri = storage.join(layout.whitening, INFO_FILE)
    if storage.exists(info_uri):
        record = storage.read_json(info_uri)
        if record.get("inputs") == inputs:
            log.info("%s: learned from the same inputs, kept", layout.whitening)
            return {"enabled": True, **record, "reused": True}
    start = time.perf_counter()
    try:
        record = stages.learn(
            layout.descriptors,
            list(local),
            layout.whitening,
            config,
            inputs=inputs,
            first_use=computed_on_first_use,
        )
    except InsufficientPairsError as exc:
        log.warning("learned whitening skipped: %s", exc)
        return {"enabled": True, "skipped": str(exc)}
    finally:
        timings["learn_s"] = round(time.perf_counter() - start, 3)
    return {"enabled": True, **record}


def whiten_once(layout: JobLayout, whitening_dir: str, timings: dict[str, float]) -> None:
    """The whiten stage, skipped when every shard is already committed with this whitening."""
    start = time.perf_counter()
    source = descriptor_shards.list_shards(layout.descriptors)
    try:
        done = descriptor_shards.list_shards(layout.whitened_descriptors)
    except PlanError:  # not whitened yet, or interrupted: whitened (again)
        done = []
    record = storage.read_json(storage.join(whitening_dir, INFO_FILE))
    if source and len(done) == len(source):
        wanted = whitened_model_info(source[0]["model"], record, whitening_dir)["config_hash"]
        same = all(
            w["model"]["config_hash"] == wanted
            and (w["shard"], w["rows"], w["errors"]) == (r["shard"], r["rows"], r["errors"])
            for w, r in zip(done, source, strict=True)
        )  # a shard extracted again since (a transient error retried) is whitened again
        if same:
            log.info("%s: whitened with the same whitening, kept", layout.whitened_descriptors)
            timings["whiten_s"] = round(time.perf_counter() - start, 3)
            return
    stages.whiten(layout.descriptors, whitening_dir, layout.whitened_descriptors)
    timings["whiten_s"] = round(time.perf_counter() - start, 3)


@dataclass(frozen=True)
class PreparedCorpus:
    """The extract stage's output when a caller made it itself (a re-index: only new and
    changed images extracted, the rest carried over): the descriptor folder the job reads, and
    the local-feature folders (layers, later ones shadowing earlier ones) of every image, or
    on first use the layers it inherits and where it computes more."""

    extract_summary: dict[str, Any]
    local_features: tuple[str, ...] = ()
    # On first use: where this version computes local features, and the layers it inherits.
    first_use: FirstUse | None = None


def run_index_job(
    source: str,
    output: str,
    config: RunConfig,
    *,
    announce: Announce = _quiet,
    prepared: PreparedCorpus | None = None,
    keep_whitening: Callable[[], str | None] | None = None,
    keep_codebook: Callable[[str], str | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the default indexing job (:func:`stages_for`) on ``source`` into ``output`` and
    write its bundle; returns the bundle record (with the stages' summaries and timings).

    A re-index runs the same stages incrementally: ``prepared`` is its extract stage's output
    (written to ``output``/descriptors by the caller); ``keep_whitening()`` names a whitening
    folder to keep instead of learning one (None: learn); ``keep_codebook(index_input)`` names
    a codebook to keep for the vectors the index is built on (None: train).

    Holds ``output``'s lease (``retrieval/leases.py``): two jobs into one folder would build
    one index from each other's shards. A re-index holds its root's lease instead.
    """
    if prepared is not None:
        return _run_index_job(
            source, output, config, announce, prepared, keep_whitening, keep_codebook, extra
        )
    with leases.hold(output, what="retrieval job", wait_s=config.lease_wait):
        return _run_index_job(
            source, output, config, announce, prepared, keep_whitening, keep_codebook, extra
        )


def _run_index_job(
    source: str,
    output: str,
    config: RunConfig,
    announce: Announce,
    prepared: PreparedCorpus | None,
    keep_whitening: Callable[[], str | None] | None,
    keep_codebook: Callable[[str], str | None] | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    layout = JobLayout(output)
    chosen = stages_for(config)
    timings: dict[str, float] = {}
    summaries: dict[str, Any] = {}
    learning: dict[str, Any] = {"enabled": learns(config)}
    index_input = layout.descriptors
    local = layout.local_features if config.local.enabled and not first_use(config) else None
    local_layers: tuple[str, ...] = (local,) if local else ()
    computed_on_first_use = None
    if first_use(config):
        computed_on_first_use = (prepared and prepared.first_use) or FirstUse(layout.local_features)
    for number, stage in enumerate(chosen, start=1):
        announce(number, len(chosen), stage)
        start = time.perf_counter()
        if stage.name == "extract":
            if prepared is None:
                summaries["extract"] = stages.extract(
                    source, layout.descriptors, config, local_output=local
                )
            else:
                summaries["extract"] = prepared.extract_summary
                local_layers = prepared.local_features if local else ()
        elif stage.name == "learn":
            kept = keep_whitening() if keep_whitening is not None else None
            if kept is not None:
                learning = {"enabled": True, **copy_whitening(kept, layout.whitening)}
            else:
                learning = learn_whitening_once(
                    layout, config, timings, local_layers, computed_on_first_use
                )
        elif stage.name == "whiten":
            if "skipped" in learning:
                continue
            whiten_once(layout, layout.whitening, timings)
            index_input = layout.whitened_descriptors
        elif stage.name == "train":
            kept_codebook = keep_codebook(index_input) if keep_codebook is not None else None
            if kept_codebook is not None:
                summaries["train"] = copy_codebook(kept_codebook, layout.codebook)
            else:
                summaries["train"] = stages.train(index_input, layout.codebook, config)
        elif stage.name == "index":
            summaries["index"] = stages.index(
                index_input, layout.codebook, layout.index_groups, config
            )
        elif stage.name == "merge":
            summaries["merge"] = stages.merge(layout.index_groups, layout.index, config)
        timings.setdefault(f"{stage.name}_s", round(time.perf_counter() - start, 3))
    return write_bundle(
        output,
        config,
        extract_summary=summaries["extract"],
        learning=learning,
        whitened="skipped" not in learning and learns(config),
        timings=timings,
        summaries=summaries,
        local_features=local_layers,
        computed_on_first_use=computed_on_first_use,
        extra=extra,
    )


def copy_codebook(source: str, target: str) -> dict[str, Any]:
    """Keep a trained codebook (a re-index whose vectors it still fits)."""
    from retrieval.index.codebook import CODEBOOK_FILE, CODEBOOK_MANIFEST, SAMPLE_FILE

    for name in (CODEBOOK_FILE, SAMPLE_FILE, CODEBOOK_MANIFEST):  # the manifest last: a commit
        uri = storage.join(source, name)
        if storage.exists(uri):
            storage.write_bytes(storage.join(target, name), storage.read_bytes(uri))
    return {**storage.read_json(storage.join(target, CODEBOOK_MANIFEST)), "kept_from": source}


def copy_whitening(source: str, target: str) -> dict[str, Any]:
    """Copy a whitening folder (kept by a re-index), checking its checksum on the way."""
    load_whitening(source)  # refuses a corrupt or foreign folder
    for name in (INFO_FILE, "whitening.npz"):
        if source != target:
            storage.write_bytes(
                storage.join(target, name), storage.read_bytes(storage.join(source, name))
            )
    record = storage.read_json(storage.join(target, INFO_FILE))
    return {**record, "kept_from": source}


def write_bundle(
    output: str,
    config: RunConfig,
    *,
    extract_summary: dict[str, Any],
    learning: dict[str, Any],
    whitened: bool,
    timings: dict[str, float],
    summaries: dict[str, Any] | None = None,
    local_features: Sequence[str] = (),
    computed_on_first_use: FirstUse | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit the job: ``bundle.json``, what search needs to answer like the job was built to
    (paths relative to the bundle's folder, or absolute URIs for data it shares with other
    versions). ``computed_on_first_use``: where corpus images' local features are computed on
    first use (``retrieval/local_feature_cache.py``), when they are, and the layers it
    inherits."""
    layout = JobLayout(output)
    layers = [_relative(output, folder) for folder in local_features]
    local_model = (extract_summary.get("local_features") or {}).get("model")
    where = computed_on_first_use
    first_use_root = where.root if where is not None else None
    inherited = None
    if where is not None:
        local_model = local_info_for(config.local)
        if where.inherited:
            inherited = INHERITED_FILE
            local_feature_cache.write_inherited(
                storage.join(output, INHERITED_FILE), where.inherited
            )
    record = {
        "kind": BUNDLE_KIND,
        "version": BUNDLE_VERSION,
        "index": FOLDERS["index"],
        "whitening": FOLDERS["whitening"] if whitened else None,
        "local_features": layers or None,
        "local_features_first_use": (
            _relative(output, first_use_root) if first_use_root is not None else None
        ),
        "local_features_inherited": inherited,
        "descriptors": FOLDERS["descriptors"],
        "model": extract_summary["model"],
        "local_model": local_model,
        # The settings that describe a query as the corpus was described, and answer it as the
        # job was built to (flat names, as on the command line and in config files).
        "settings": bundle_settings(config),
        "learning": {k: v for k, v in learning.items() if k != "reused"},
        "accounting": {k: extract_summary[k] for k in ("inputs", "indexed", "failed")},
        "timings": timings,
        "created": utc_now(),
        **(extra or {}),
    }
    storage.write_json(layout.bundle, record)
    record["summaries"] = summaries or {}
    return record


def _relative(root: str, uri: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def is_bundle(uri: str) -> bool:
    return storage.exists(storage.join(uri, BUNDLE_FILE))


def resolve_bundle(uri: str) -> str | None:
    """The bundle folder ``uri`` names: itself, or a versioned root's live version; None when
    it is neither (a bare merged index folder)."""
    if is_bundle(uri):
        return uri
    name = versions.current(uri)
    if name is not None and is_bundle(versions.version_dir(uri, name)):
        return versions.version_dir(uri, name)
    return None


@dataclass(frozen=True)
class Bundle:
    """A job's output as search reads it."""

    root: str
    record: dict[str, Any]

    @classmethod
    def read(cls, uri: str) -> Bundle:
        record = storage.read_json(storage.join(uri, BUNDLE_FILE))
        if record.get("kind") != BUNDLE_KIND or record.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"{uri}: not a retrieval bundle of version {BUNDLE_VERSION} "
                f"(kind {record.get('kind')!r}, version {record.get('version')!r})"
            )
        return cls(uri, record)

    def _resolve(self, value: str) -> str:
        return value if "://" in value or value.startswith("/") else storage.join(self.root, value)

    def path(self, key: str) -> str | None:
        value = self.record.get(key)
        return None if value is None else self._resolve(value)

    @property
    def index(self) -> str:
        return self.path("index") or ""

    @property
    def first_use_root(self) -> str | None:
        """Where corpus images' local features are computed on first use (None: they were
        all extracted up front, or there are none)."""
        return self.path("local_features_first_use")

    @cached_property
    def first_use(self) -> FirstUse | None:
        """Where corpus images' local features are computed on first use, with the layers
        this version inherits from earlier ones (a re-index; read once: a version's
        inheritance never changes, the layers under its root are listed when asked)."""
        root = self.first_use_root
        if root is None:
            return None
        inherited = self.path("local_features_inherited")
        layers = local_feature_cache.read_inherited(inherited) if inherited else ()
        return FirstUse(root, layers)

    def local_feature_store(self) -> LocalFeatureStore:
        """The corpus's local features as search reads them (the layers there are now)."""
        where = self.first_use
        if where is None:
            return LocalFeatureStore(self.extracted_local_features)
        return where.store()

    @property
    def verifies(self) -> bool:
        """Whether the bundle has (or makes on first use) local features for verification."""
        return bool(self.record.get("local_features")) or self.first_use_root is not None

    @property
    def extracted_local_features(self) -> list[str]:
        """The local-feature folders extracted with the descriptors (none on first use)."""
        return [self._resolve(layer) for layer in self.record.get("local_features") or []]

    @property
    def local_features(self) -> list[str] | None:
        """The corpus's local-feature folders (layers: a later one's row for an id wins); for
        first use, the layers there are so far (possibly none), inherited ones first. Read
        them through :meth:`local_feature_store`: an inherited layer is read less the images
        that changed since."""
        where = self.first_use
        if where is not None:
            return where.folders()
        return self.extracted_local_features or None

    @property
    def descriptors(self) -> str:
        return self.path("descriptors") or ""

    @property
    def whitening(self) -> str | None:
        return self.path("whitening")

    def config(self, base: RunConfig | None = None, **overrides: Any) -> RunConfig:
        """The run configuration that describes queries as the corpus was described and
        answers them as the job was built to: the bundle's settings over ``base`` (runner and
        cluster settings), then ``overrides`` (flat names; None: not given)."""
        settings = dict(self.record["settings"])
        # A bundle made before projections existed records no local_pca_dim: its features
        # were unprojected (its local model's config says how they were made).
        made = (self.record.get("local_model") or {}).get("config") or {}
        if made and "local_pca_dim" not in settings:
            settings["local_pca_dim"] = made.get("pca_dim", 0)
        config = build_config(settings, base or RunConfig())
        return build_config(overrides, config) if overrides else config


def check_query_models(bundle: Bundle, query_models: Sequence[dict[str, Any]]) -> None:
    """Refuse query descriptors of another model than the bundle's."""
    wanted = bundle.record["model"]["config_hash"]
    others = {m["config_hash"] for m in query_models} - {wanted}
    if others:
        raise ValueError(
            f"query descriptors of another model ({sorted(others)}) than the bundle's "
            f"({bundle.record['model']['id']}, {wanted}): describe the queries with "
            "`retrieval search --query-images`, which uses the bundle's model"
        )


class BundleSearch:
    """Search over a bundle with its defaults: raw query descriptors of the bundle's model are
    whitened with the bundle's whitening, the global shortlist is verified against the bundle's
    local features and expanded with verified neighbours. ``retrieval search`` and the
    default row of ``retrieval evaluate`` both answer through :meth:`rank`."""

    def __init__(self, bundle: Bundle, config: RunConfig):
        self.bundle = bundle
        self.config = config
        self.index: SearchableIndex = load_index(bundle.index, nprobe=config.nprobe)
        self.whitening: LearnedWhitening | None = None
        if bundle.whitening is not None:
            self.whitening = load_whitening(bundle.whitening)
            spec = self.index.manifest["model"].get("whitening") or {}
            if spec.get("sha256") != self.whitening.info["sha256"]:
                raise ValueError(
                    f"{bundle.root}: the index was not built with the bundle's whitening"
                )
        self.rerank: RerankConfig | None = config.rerank if bundle.verifies else None
        self.store = (
            bundle.local_feature_store()
            if self.rerank is not None and self.rerank.enabled
            else None
        )

    def shortlisted(self, query_ids: Sequence[str], vectors: np.ndarray, k: int) -> set[str]:
        """The corpus images :meth:`rank` would verify for these (raw) queries at ``k``."""
        if self.store is None or self.rerank is None or self.rerank.verification is None:
            return set()
        if self.whitening is not None:
            vectors = self.whitening.apply(vectors)
        return shortlisted_ids(self.index, query_ids, vectors, k, self.rerank.verification)

    def complete(self, ids: Iterable[str], *, label: str = "local features") -> dict[str, Any]:
        """First use: compute the local features of ``ids`` the bundle has none of yet, then
        read them from this searcher's store. Nothing to do for a bundle that made all of
        them up front."""
        where = self.bundle.first_use
        if where is None or self.store is None:
            return {}
        record = stages.complete_local_features(
            where, self.bundle.descriptors, ids, self.config, label=label
        )
        # Also layers another run finished since this store was opened: what the request
        # counted as there must be readable here.
        where.refresh(self.store)
        return record

    def check_queries(self, query_models: Sequence[dict[str, Any]]) -> None:
        """Refuse query descriptors of another model than the bundle's."""
        check_query_models(self.bundle, query_models)

    def rank(
        self,
        query_ids: Sequence[str],
        vectors: np.ndarray,
        k: int,
        query_features: Callable[[str], Any] | None,
        inlier_cache: dict[tuple[str, str], int] | None = None,
    ) -> Reranked:
        """The top ``k`` per query in final order, with scores and inliers (-1: not verified;
        ``stats`` is empty when nothing was verified)."""
        if self.whitening is not None:
            vectors = self.whitening.apply(vectors)
        if self.store is not None and query_features is not None and self.rerank is not None:
            return rerank_search(
                self.index,
                list(query_ids),
                vectors,
                k,
                self.rerank,
                query_features,
                self.store,
                inlier_cache,
            )
        scores, found = self.index.search_expanded(
            vectors, k, self.config.expansion, list(query_ids)
        )
        keep = [row >= 0 for row in found]
        return Reranked(
            [row[m] for row, m in zip(found, keep, strict=True)],
            [row[m] for row, m in zip(scores, keep, strict=True)],
            [np.full(int(m.sum()), -1, np.int64) for m in keep],
            {},
        )


def describe_queries(
    bundle: Bundle, source: str, output: str, config: RunConfig
) -> tuple[str, str | None, dict[str, Any]]:
    """The describe stage: the query images under ``source`` described with the bundle's model
    (and local features when the bundle verifies) into ``output``; returns the two folders and
    the extraction summary."""
    layout = JobLayout(output)
    local = layout.query_local_features if bundle.verifies else None
    summary = stages.extract(source, layout.query_descriptors, config, local_output=local)
    return layout.query_descriptors, local, summary


def run_query_job(
    bundle_uri: str,
    source: str,
    output: str,
    *,
    base: RunConfig | None = None,
    k: int = 100,
    overrides: dict[str, Any] | None = None,
    results: str | None = None,
) -> dict[str, Any]:
    """describe ``source`` with the bundle's model into ``output``, then search: ``results``
    (default ``output``/results)/results.parquet (query_id, rank, id, uri, score, inliers)."""
    bundle = Bundle.read(bundle_uri)
    config = bundle.config(base, **(overrides or {}))
    descriptors, local, _ = describe_queries(bundle, source, output, config)
    return search_bundle(
        bundle,
        descriptors,
        results or JobLayout(output).results,
        config,
        k=k,
        query_local=local,
    )


RESULT_PARTS = "parts"  # under a search's output: one committed results part per query shard
RESULTS_PART_KIND = "search_results"


class SearchQueryShards(WorkerTask):
    """Search on a runner's workers: each item a committed shard of query descriptors, answered
    with the bundle's defaults (:meth:`BundleSearch.rank`: whitening, global shortlist, spatial
    verification reading only that shard's shortlists' local features, verified QE) and
    committed as its own results part. The bundle's index, whitening and stores are opened
    once per worker."""

    def __init__(
        self,
        bundle_root: str,
        queries: str,
        query_local: str | None,
        parts: str,
        config: RunConfig,
        k: int,
        digests: dict[str, str],
    ):
        self.bundle_root = bundle_root
        self.queries = queries
        self.query_local = query_local
        self.parts = parts
        self.config = config
        self.k = k
        self.digests = digests

    def setup(self) -> tuple[BundleSearch, LocalFeatureStore | None]:
        searcher = BundleSearch(Bundle.read(self.bundle_root), self.config)
        query_store = None
        if searcher.store is not None:
            query_store = (
                searcher.store if self.query_local is None else LocalFeatureStore(self.query_local)
            )
        return searcher, query_store

    def setup_key(self) -> Hashable:
        return ("search", self.bundle_root, self.query_local, self.config)

    def run(self, state: tuple[BundleSearch, LocalFeatureStore | None], item: str) -> None:
        searcher, query_store = state
        manifest = shard_manifests.read(self.queries, item)
        if manifest is None:
            raise FileNotFoundError(f"{self.queries}: query shard {item} is not committed")
        shard = descriptor_shards.read_shard(self.queries, manifest)
        k = min(self.k, searcher.index.ntotal)
        ranked = searcher.rank(shard.ids, shard.vectors, k, query_store)
        table = reranked_table(searcher.index, shard.ids, ranked)
        uri = storage.join(self.parts, f"{item}.parquet")
        data = storage.write_parquet(uri, table)
        shard_manifests.commit(
            self.parts,
            item,
            {
                "kind": RESULTS_PART_KIND,
                "input_digest": self.digests[item],
                "queries": len(shard.ids),
                "stats": ranked.stats,
                "files": {"data": shard_manifests.file_entry(uri, data, table.num_rows)},
            },
        )


def _part_digest(query_manifest: dict[str, Any], bundle: Bundle, config: RunConfig, k: int) -> str:
    """What a results part answers: the query shard's bytes, the bundle (its record names the
    index, whitening and local features) and the search settings. A part committed for the same
    digest is skipped by a re-run; any change answers the shard again."""
    what = {
        "queries": query_manifest["files"]["data"]["sha256"],
        "bundle": bundle.record,
        "k": k,
        "expansion": asdict(config.expansion),
        "rerank": config.rerank.as_dict(),
        "nprobe": config.nprobe,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def combine_rerank_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One query set's re-ranking statistics from its parts' (sums, and per-pair and per-query
    times weighted by pairs and queries)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    summed = ("queries", "pairs_in_shortlists", "pairs_verified", "queries_with_verified_results",
              "queries_expanded")  # fmt: skip
    combined: dict[str, Any] = {key: sum(p.get(key, 0) for p in parts) for key in summed}
    pairs = combined["pairs_verified"]
    queries = max(combined["queries"], 1)
    verify_ms = sum((p.get("verify_ms_per_pair") or 0) * p.get("pairs_verified", 0) for p in parts)
    combined["verify_ms_per_pair"] = round(verify_ms / pairs, 2) if pairs else None
    rerank_ms = sum(p.get("rerank_ms_per_query", 0) * p.get("queries", 0) for p in parts)
    combined["rerank_ms_per_query"] = round(rerank_ms / queries, 1)
    return combined


def complete_shortlists(
    bundle: Bundle,
    config: RunConfig,
    queries: str,
    shards: Sequence[str],
    k: int,
    *,
    queries_in_corpus: bool,
) -> dict[str, Any]:
    """First use, before a search: the local features of every corpus image the queries of
    ``shards`` will verify (their shortlists, by the same global search), and of the queries
    themselves when they are corpus images, computed once on the runner's workers. Each
    search worker then only reads, and no two workers compute one image."""
    searcher = BundleSearch(bundle, config)
    wanted: set[str] = set()
    for shard in shards:
        manifest = shard_manifests.read(queries, shard)
        if manifest is None:
            raise FileNotFoundError(f"{queries}: query shard {shard} is not committed")
        rows = descriptor_shards.read_shard(queries, manifest)
        wanted |= searcher.shortlisted(rows.ids, rows.vectors, min(k, searcher.index.ntotal))
        if queries_in_corpus:
            wanted.update(rows.ids)
    return searcher.complete(wanted, label="search: local features")


def search_bundle(
    bundle: Bundle,
    queries: str,
    output: str,
    config: RunConfig,
    *,
    k: int = 100,
    query_local: str | None = None,
) -> dict[str, Any]:
    """The search stage over a bundle: every descriptor under ``queries`` (raw, of the
    bundle's model) answered with the bundle's defaults -> ``output``/results.parquet.
    ``query_local``: the queries' local features (default: the bundle's own, for queries that
    are images of the corpus).

    Each shard of queries is answered on the run's runner (:class:`SearchQueryShards`) and
    committed as ``output``/parts/<shard>.parquet; the launcher then joins the parts in shard
    order. A worker reads only its own queries' shortlists' local features (by image, see
    ``LocalFeatureStore``), so verification spreads over the workers like extraction does.
    """
    start = time.perf_counter()
    query_manifests = descriptor_shards.list_shards(queries)
    check_query_models(bundle, [m["model"] for m in query_manifests])
    parts = storage.join(output, RESULT_PARTS)
    digests = {m["shard"]: _part_digest(m, bundle, config, k) for m in query_manifests}
    todo = [
        shard
        for shard, digest in digests.items()
        if shard_manifests.committed(
            parts, shard, expect={"kind": RESULTS_PART_KIND, "input_digest": digest}
        )
        is None
    ]
    first_use = None
    if todo and bundle.first_use_root is not None and config.rerank.enabled:
        first_use = complete_shortlists(
            bundle, config, queries, todo, k, queries_in_corpus=query_local is None
        )
    task = SearchQueryShards(bundle.root, queries, query_local, parts, config, k, digests)
    runners.runner_for(config, items=len(todo)).map(
        task, todo, label="search", progress_dir=parts, already=len(digests) - len(todo)
    )
    tables, stats, answered = [], [], 0
    for shard, digest in digests.items():
        manifest = shard_manifests.committed(
            parts, shard, expect={"kind": RESULTS_PART_KIND, "input_digest": digest}
        )
        if manifest is None:
            raise RuntimeError(f"{parts}: results of query shard {shard} not committed")
        tables.append(
            storage.read_parquet(
                storage.join(parts, f"{shard}.parquet"),
                expect_sha256=manifest["files"]["data"]["sha256"],
            )
        )
        stats.append(manifest["stats"])
        answered += manifest["queries"]
    table = pa.concat_tables(tables)
    index_manifest = read_manifest(storage.join(bundle.index, INDEX_MANIFEST), kind=INDEX_KIND)
    rerank_stats = combine_rerank_stats(stats)
    ntotal = index_manifest["ntotal"]
    return stages.write_results(
        output,
        table,
        answered,
        start,
        k=min(k, ntotal),
        bundle=bundle.root,
        index=bundle.index,
        whitening=index_manifest["model"].get("whitening"),
        query_expansion={"n": config.expansion.n, "alpha": config.expansion.alpha},
        rerank=config.rerank.as_dict() if rerank_stats else None,
        rerank_stats=rerank_stats,
        local_features_first_use=first_use,
    )
