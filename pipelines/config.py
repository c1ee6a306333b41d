"""Run configuration: defaults, a config file for repeatable runs, command-line overrides.

A config file is TOML (or JSON) with the same names as the command-line flags, e.g.::

    runner = "beam"            # or "spark", "local"
    workers = 2
    master = "spark://host:7077"   # Spark only (default: local[workers])
    [spark_conf]                   # Spark only: any Spark setting
    "spark.executor.memory" = "8g"
    [extract]
    backbone = "efficientnet-lite0"
    image_size = 362
    scales = [1.0]
    gem_p = 3.0
    runtime = "tflite-int8"
    shard_size = 256
    [index]
    factory = "auto"
    seed = 0
    nprobe = 32
    group_vectors = 50000
    fan_in = 8
    pieces = 1
    on_disk = false
    qe = 0
    qe_alpha = 3.0
    [local]
    local_features = "rootsift"    # or "delf:<handle or path>", or "none"
    local_image_size = 448
    local_max_features = 1000
    local_pca_dim = 56             # RootSIFT's principal components kept (0: all 128)
    local_dtype = "auto"           # int8 when projected, else float16; or float32, q15
    local_at = "first-use"         # or "extract": every image's, with its global descriptor
    [rerank]
    shortlist = 100               # top-K verified by matching + RANSAC (0: no verification)
    min_inliers = 20
    verified_qe = 10              # verified neighbours averaged into the query (0: off)
    verify_workers = 2
    [learn]
    learn = true                  # evaluate: mine pairs and learn a whitening first
    mine_neighbours = 10
    mine_min_inliers = 20
    mine_sample_size = 5000
    mine_min_pairs = 20
    whitening_dim = 256
    whitening_shrinkage = 0.3

Precedence: command-line flag > config file > built-in default.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipelines import settings
from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import DEFAULT_SHARD_SIZE
from retrieval.images import DecodeLimits
from retrieval.index.group_index import DEFAULT_GROUP_VECTORS
from retrieval.index.merge import DEFAULT_FAN_IN
from retrieval.index.search import DEFAULT_NPROBE
from retrieval.learning.mining import MiningConfig
from retrieval.learning.whitening import DEFAULT_DIM, DEFAULT_SHRINKAGE
from retrieval.local_features.extractor import LocalFeatureConfig
from retrieval.redaction import MASK, is_secret_name, redact, redact_args
from retrieval.rerank.query_expansion import QueryExpansion
from retrieval.rerank.shortlist import DEFAULT_VERIFIED_QE, RerankConfig
from retrieval.rerank.spatial import VerificationConfig

RUNNERS = tuple(settings.RUNNERS)


@dataclass(frozen=True)
class RunConfig:
    # "beam" (FnApiRunner locally, or any runner via beam_args), "spark" (local[workers], or
    # any cluster via master / spark_conf) or "local" (one process, no runner)
    runner: str = "beam"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads_per_worker: int | None = None  # TensorFlow threads; default: cores / workers
    beam_args: tuple[str, ...] = ()
    device: str = "cpu"  # "gpu": one worker per GPU, batches sized to its memory
    master: str | None = None  # Spark master URL; None: local[workers]
    spark_conf: tuple[tuple[str, str], ...] = ()  # extra Spark settings, (key, value) pairs
    verbose: bool = False  # runners' own logs (Spark's JVM log, Beam workers' notices)
    # Seconds a run waits for another run writing the same output folder or re-index root to
    # finish (its lease, retrieval/leases.py); 0: stop at once with one line naming it.
    lease_wait: float = 0.0
    gem: GeMConfig = field(default_factory=GeMConfig)
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    shard_size: int = DEFAULT_SHARD_SIZE
    index_factory: str = "auto"
    sample_size: int | None = None
    max_index_memory: int | None = None  # bytes; None: the default index for n and d
    pretransform: str = "opq"  # before IVF-PQ: opq, pca or none
    seed: int = 0
    nprobe: int = DEFAULT_NPROBE
    group_vectors: int = DEFAULT_GROUP_VECTORS  # vectors per index task
    fan_in: int = DEFAULT_FAN_IN  # inputs per merge task
    pieces: int = 1  # index pieces the merge writes
    on_disk: bool = False  # on-disk IVF inverted lists (faiss.contrib.ondisk)
    # αQE neighbours at search time (0: off). Off by default: on photos with 1-2 true matches
    # it pulls in strangers; verified_qe cannot.
    qe: int = 0
    qe_alpha: float = 3.0
    local: LocalFeatureConfig = field(default_factory=LocalFeatureConfig)
    # When a corpus image's local features are made: "first-use" (mining or a search's
    # shortlist asks for them; retrieval/local_feature_cache.py) or "extract" (every image).
    local_at: str = "first-use"
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    verify: bool = True  # spatial verification of the shortlist (needs local features)
    verified_qe: int = DEFAULT_VERIFIED_QE
    learn: bool = True  # `evaluate`: mine pairs and learn a whitening before indexing
    mining: MiningConfig = field(default_factory=MiningConfig)
    whitening_dim: int = DEFAULT_DIM
    whitening_shrinkage: float = DEFAULT_SHRINKAGE

    @property
    def rerank(self) -> RerankConfig:
        return RerankConfig(
            verification=self.verification if self.verify and self.local.enabled else None,
            verified_qe=self.verified_qe,
        )

    @property
    def expansion(self) -> QueryExpansion:
        return QueryExpansion(n=self.qe, alpha=self.qe_alpha)

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {self.runner!r}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.local_at not in settings.LOCAL_AT:
            raise ValueError(
                f"local_at must be one of {', '.join(settings.LOCAL_AT)}, not {self.local_at!r}"
            )
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', not {self.device!r}")

    @property
    def threads(self) -> int:
        if self.threads_per_worker:
            return self.threads_per_worker
        workers = self.workers if self.runner in ("beam", "spark") else 1
        return max(1, (os.cpu_count() or 1) // workers)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gem"] = self.gem.as_dict()
        d["local"] = self.local.as_dict()
        d["beam_args"] = redact_args(self.beam_args)  # recorded in reports: no secrets
        d["spark_conf"] = {
            key: MASK if is_secret_name(key) else redact(value) for key, value in self.spark_conf
        }
        return d


# What a bundle records (``pipelines/job.py``): the settings that describe a query as the corpus
# was described, and answer it as the job was built to (the extract and search stages').
QUERY_SETTINGS = tuple(
    s.name
    for s in settings.SETTINGS
    if ({"extract", "search"} & set(s.stages)) and s.name not in ("shard_size", "device")
)

# Sections read by `retrieval submit` only (how to reach a cluster), not run settings.
SUBMIT_SECTIONS = ("dataflow", "spark")


def flat_settings(config: RunConfig) -> dict[str, Any]:
    """``config`` in flat names (as on the command line and in config files)."""
    flat = {s.name: settings.read_path(config, s.path) for s in settings.SETTINGS}
    flat["scales"] = list(config.gem.scales)
    if not config.verify:
        flat["shortlist"] = 0
    flat["beam_args"] = list(config.beam_args)
    flat["spark_conf"] = dict(config.spark_conf)
    return flat


def bundle_settings(config: RunConfig) -> dict[str, Any]:
    flat = flat_settings(config)
    # What "auto" chose, not "auto": a query is described as the corpus was, whatever later
    # versions choose by default.
    flat["local_pca_dim"] = config.local.projection_dim
    flat["local_dtype"] = config.local.stored_dtype
    return {k: flat[k] for k in QUERY_SETTINGS}


def read_raw_config(path: str) -> dict[str, Any]:
    """A TOML/JSON config file as written (sections as dicts)."""
    try:
        with open(path, "rb") as f:
            return json.load(f) if path.endswith(".json") else tomllib.load(f)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        what = "JSON" if path.endswith(".json") else "TOML"
        raise ValueError(f"{path}: not valid {what}: {exc}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """A TOML/JSON config file's settings in flat names (sections are for people: a key means
    the same in any of them), each checked against its declaration (``pipelines/settings.py``):
    an unknown key or a value of the wrong type is refused with one line naming it."""
    raw = read_raw_config(path)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SUBMIT_SECTIONS:
            continue
        if key == "spark_conf":  # a table of Spark settings, not a section of flat names
            flat[key] = value
        elif isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    flat = {settings.ALIASES.get(k, k): v for k, v in flat.items()}
    unknown = sorted(set(flat) - set(settings.BY_NAME))
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}")
    for name, value in flat.items():
        settings.check_file_value(settings.BY_NAME[name], value, path)
    return flat


def _converted(setting: settings.Setting, value: Any, config: RunConfig) -> Any:
    kind = setting.kind
    if kind == "floats":
        return tuple(float(v) for v in value)
    if kind == "size" and isinstance(value, str):
        from retrieval.index.factory import parse_bytes

        return parse_bytes(value)
    if kind == "strings":
        return tuple(shlex.split(value)) if isinstance(value, str) else tuple(value)
    if kind == "table":
        return parse_spark_conf(value, dict(config.spark_conf))
    return value


def build_config(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from flat ``values`` (None means "not given"; names that are not settings,
    such as a command's --input, are ignored) over ``base``."""
    config = base or RunConfig()
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        name = settings.ALIASES.get(name, name)
        setting = settings.BY_NAME.get(name)
        if setting is None or value is None:
            continue
        value = _converted(setting, value, config)
        if name == "shortlist":  # --shortlist 0 turns verification off, K > 0 on
            top["verify"] = value != 0
            if value == 0:
                continue
        if name == "seed":  # one seed for the codebook's sample and the mining sample
            nested.setdefault("mining", {})["seed"] = value
        head, _, field_name = setting.path.rpartition(".")
        if head:
            nested.setdefault(head, {})[field_name] = value
        else:
            top[field_name] = value
    parts = {head: replace(getattr(config, head), **fields_) for head, fields_ in nested.items()}
    return replace(config, **parts, **top)


def parse_spark_conf(
    values: dict[str, Any] | list[str] | tuple[Any, ...], base: dict[str, str] | None = None
) -> tuple[tuple[str, str], ...]:
    """Spark settings from a config table or ``KEY=VALUE`` flags, over ``base`` (later wins)."""
    conf = dict(base or {})
    items = values.items() if isinstance(values, dict) else values
    for item in items:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--spark-conf wants KEY=VALUE, got {item!r}")
        else:
            key, value = item
        conf[key.strip()] = str(value).lower() if isinstance(value, bool) else str(value)
    return tuple(sorted(conf.items()))
