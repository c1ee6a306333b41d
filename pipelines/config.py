"""Run configuration: defaults, a config file for repeatable runs, command-line overrides.

A config file is TOML (or JSON) with the same names as the command-line flags, e.g.::

    runner = "beam"
    workers = 2
    [extract]
    backbone = "efficientnet-lite0"
    image_size = 362
    scales = [1.0]
    gem_p = 3.0
    shard_size = 256
    [index]
    factory = "auto"
    seed = 0
    nprobe = 32
    group_vectors = 50000
    fan_in = 8
    pieces = 1
    on_disk = false
    qe = 3
    qe_alpha = 3.0

Precedence: command-line flag > config file > built-in default.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import DEFAULT_SHARD_SIZE
from retrieval.images import DecodeLimits
from retrieval.index.group_index import DEFAULT_GROUP_VECTORS
from retrieval.index.merge import DEFAULT_FAN_IN
from retrieval.index.search import DEFAULT_NPROBE
from retrieval.rerank.query_expansion import QueryExpansion


@dataclass(frozen=True)
class RunConfig:
    runner: str = "beam"  # "beam" (FnApiRunner locally, or any runner via beam_args) or "local"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads_per_worker: int | None = None  # TensorFlow threads; default: cores / workers
    beam_args: tuple[str, ...] = ()
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
    qe: int = 3  # αQE neighbours at search time (0: off)
    qe_alpha: float = 3.0

    @property
    def expansion(self) -> QueryExpansion:
        return QueryExpansion(n=self.qe, alpha=self.qe_alpha)

    def __post_init__(self) -> None:
        if self.runner not in ("beam", "local"):
            raise ValueError(f"runner must be 'beam' or 'local', not {self.runner!r}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")

    @property
    def threads(self) -> int:
        if self.threads_per_worker:
            return self.threads_per_worker
        workers = self.workers if self.runner == "beam" else 1
        return max(1, (os.cpu_count() or 1) // workers)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gem"] = self.gem.as_dict()
        d["beam_args"] = list(self.beam_args)
        return d


# Flat names (as on the command line) -> where they live in RunConfig.
_GEM_KEYS = {"backbone": "backbone", "image_size": "image_size", "scales": "scales", "gem_p": "p"}
_LIMIT_KEYS = {f.name for f in fields(DecodeLimits)}
_TOP_KEYS = {
    "runner",
    "workers",
    "threads_per_worker",
    "beam_args",
    "shard_size",
    "index_factory",
    "sample_size",
    "max_index_memory",
    "pretransform",
    "seed",
    "nprobe",
    "group_vectors",
    "fan_in",
    "pieces",
    "on_disk",
    "qe",
    "qe_alpha",
}


def read_config_file(path: str) -> dict[str, Any]:
    """Flatten a TOML/JSON config file's sections into command-line names."""
    with open(path, "rb") as f:
        raw = json.load(f) if path.endswith(".json") else tomllib.load(f)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    aliases = {"factory": "index_factory"}
    flat = {aliases.get(k, k): v for k, v in flat.items()}
    unknown = set(flat) - set(_GEM_KEYS) - _LIMIT_KEYS - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return flat


def build_config(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from flat ``values`` (None means "not given") over ``base``."""
    config = base or RunConfig()
    given = {k: v for k, v in values.items() if v is not None}
    gem = {_GEM_KEYS[k]: v for k, v in given.items() if k in _GEM_KEYS}
    if "scales" in gem:
        gem["scales"] = tuple(float(s) for s in gem["scales"])
    limits = {k: v for k, v in given.items() if k in _LIMIT_KEYS}
    top = {k: v for k, v in given.items() if k in _TOP_KEYS}
    if isinstance(top.get("max_index_memory"), str):
        from retrieval.index.factory import parse_bytes

        top["max_index_memory"] = parse_bytes(top["max_index_memory"])
    if "beam_args" in top and isinstance(top["beam_args"], str):
        import shlex

        top["beam_args"] = tuple(shlex.split(top["beam_args"]))
    elif "beam_args" in top:
        top["beam_args"] = tuple(top["beam_args"])
    return replace(
        config, gem=replace(config.gem, **gem), limits=replace(config.limits, **limits), **top
    )
