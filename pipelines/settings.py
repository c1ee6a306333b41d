"""Every run setting, declared once: its name, type, where it lives in the run configuration,
help, and which stages read it. The defaults are the run configuration's own
(``pipelines.config.RunConfig``), read from it, not restated.

From this table come the command-line flags (``add_flags``), the config-file keys and their type
checks (``check_file_value``), the Flex Template's parameters and ``metadata.json``
(``pipelines.submit.flex_template``), and what ``retrieval submit --dry-run`` prints for each
stage (``stage_settings``). Adding a setting is one entry here (and its field in the dataclass
that uses it).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from retrieval.local_features.features import AUTO, DESCRIPTOR_DTYPES
from retrieval.runtimes import DEFAULT_RUNTIME, RUNTIMES

SIZE = re.compile(r"\s*\d+(\.\d+)?\s*[KMGT]?i?B?\s*", re.IGNORECASE)


# The runners (``--runner``): name -> where its class lives (imported only when chosen). A new
# runner is a module in pipelines/runners/ and one entry here.
RUNNERS: dict[str, str] = {
    "beam": "pipelines.runners.beam:BeamRunner",
    "spark": "pipelines.runners.spark:SparkRunner",
    "local": "pipelines.runners.local:LocalRunner",
}


# When a corpus image's local features are made (``--local-at``; RunConfig checks it too).
LOCAL_AT = ("first-use", "extract")


class SettingError(ValueError):
    """A setting with a value of the wrong type or out of its choices (one line, exit 2)."""


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"comma-separated numbers expected, not {text!r}"
        ) from None


KINDS: dict[str, str] = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "floats": "a list of numbers",
    "size": "a size in bytes (an integer, or e.g. '512M', '2G')",
    "strings": "a list of strings (or one string of space-separated words)",
    "table": "a table of KEY = VALUE",
}


@dataclass(frozen=True)
class Setting:
    """One setting. ``path``: where it lives in ``RunConfig`` (``gem.image_size``; a top-level
    field by its own name); ``stages``: the job's stages that read it ("run": every stage's
    runner); ``section``: its table in a config file (keys may also be given at the top)."""

    name: str
    kind: str
    path: str
    help: str
    stages: tuple[str, ...]
    section: str
    group: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the flag, if not --name-with-dashes
    template: bool = False  # a parameter of the Dataflow Flex Template (extraction)
    show_default: bool = True

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _s(name, kind, path, stages, section, group, help, **more) -> Setting:
    return Setting(name, kind, path, help, tuple(stages), section, group, **more)


EXTRACT = ("extract", "describe")
SEARCH = ("search",)
SETTINGS: tuple[Setting, ...] = (
    # runner
    _s("runner", "str", "runner", ["run"], "", "runner",
       "beam: Apache Beam, locally on the FnApiRunner with --workers processes, or on Dataflow "
       "via --beam-args; spark: PySpark, locally local[--workers], or a cluster via --master / "
       "--spark-conf; local: one process, no runner (debugging, baselines)",
       choices=tuple(RUNNERS)),
    _s("workers", "int", "workers", ["run"], "", "runner",
       "parallel workers of a local run: Beam worker processes, or Spark's local[N] "
       "(default: CPU cores)", metavar="N", show_default=False),
    _s("threads_per_worker", "int", "threads_per_worker", ["run"], "", "runner",
       "TensorFlow threads per worker (default: cores / workers)", metavar="N",
       show_default=False),
    _s("beam_args", "strings", "beam_args", ["run"], "", "runner",
       'extra Beam pipeline options, quoted, e.g. "--runner=DataflowRunner --project=P '
       '--region=R --temp_location=gs://B/tmp"', metavar="ARGS", show_default=False),
    _s("master", "str", "master", ["run"], "", "runner",
       "Spark master: spark://HOST:7077, yarn, k8s://https://HOST (default: local[--workers], "
       "started in this process)", metavar="URL", show_default=False),
    _s("spark_conf", "table", "spark_conf", ["run"], "spark_conf", "runner",
       "a Spark setting, repeatable, e.g. --spark-conf spark.executor.memory=8g (over "
       "[spark_conf] in --config)", metavar="KEY=VALUE", show_default=False),
    _s("lease_wait", "float", "lease_wait", ["run"], "", "lease",
       "seconds to wait for another run writing the same output folder or re-index root (its "
       "lease) before stopping with one line naming it", metavar="SECONDS"),
    # descriptor
    _s("backbone", "str", "gem.backbone", EXTRACT, "extract", "descriptor",
       "efficientnet-lite0 (offline ImageNet weights), keras:<Application>[@weights], "
       "hub:<handle>, savedmodel:<path>", metavar="SPEC", template=True),
    _s("image_size", "int", "gem.image_size", EXTRACT, "extract", "descriptor",
       "longer image side at scale 1 (chosen on oxford-dev)", metavar="PX", template=True),
    _s("scales", "floats", "gem.scales", EXTRACT, "extract", "descriptor",
       "multi-scale factors, e.g. 0.707,1,1.414", metavar="S1,S2", template=True),
    _s("gem_p", "float", "gem.p", EXTRACT, "extract", "descriptor",
       "GeM pooling exponent", metavar="P", template=True),
    _s("runtime", "str", "gem.runtime", EXTRACT, "extract", "descriptor",
       f"what runs the backbone (default {DEFAULT_RUNTIME}, the fastest measured within 0.5 mAP "
       "of tensorflow; see the README's runtime table). Converted models are cached in "
       "$RETRIEVAL_MODEL_CACHE (default ~/.cache/cbir-retrieval/models)",
       choices=tuple(RUNTIMES), show_default=False, template=True),
    _s("calibration", "str", "gem.calibration", EXTRACT, "extract", "descriptor",
       "folder, prefix or manifest of representative images that the int8 runtimes "
       "(tflite-int8, onnx-int8) calibrate on (32 drawn with seed 0). Default: the built-in "
       "sample, scikit-image's public-domain/CC0 photos", metavar="URI", show_default=False),
    _s("device", "str", "device", EXTRACT, "extract", "descriptor",
       "cpu: one worker per core; gpu: one worker per GPU with batches sized to its memory, "
       "decoding spread over the CPU cores", choices=("cpu", "gpu")),
    _s("shard_size", "int", "shard_size", EXTRACT, "extract", "descriptor",
       "images per shard, the unit of work and of re-runs", metavar="N", template=True),
    _s("local_features", "str", "local.method", ("extract", "describe", "learn", "search"),
       "local", "descriptor",
       "local features for spatial verification and mining: rootsift (OpenCV, offline), "
       "delf:<TF-Hub handle | SavedModel folder | gs:// or s3:// copy>, or none (turns off "
       "learn, whiten and verification everywhere)", metavar="METHOD", template=True),
    _s("local_at", "str", "local_at", ("learn", "search"), "local", "job",
       "when a corpus image's local features are computed: first-use (when mining or a "
       "search's shortlist first needs them, then kept: an image never mined nor shortlisted "
       "never pays for them) or extract (every image, with its global descriptor: for corpora "
       "whose images cannot be read again later, e.g. signed URLs)",
       choices=LOCAL_AT),
    _s("local_image_size", "int", "local.image_size", EXTRACT, "local", "descriptor",
       "longer image side for local features (measured cost and gain)", metavar="PX",
       template=True),
    _s("local_max_features", "int", "local.max_features", EXTRACT, "local", "descriptor",
       "at most N local features per image, strongest first", metavar="N", template=True),
    _s("local_pca_dim", "int", "local.pca_dim", EXTRACT, "local", "descriptor",
       "project RootSIFT onto its first N principal components (learned on scikit-image's "
       "public-domain photos; 0: not projected; default: 56 for RootSIFT, 0 with "
       "--local-dtype q15 and for DELF)",
       metavar="N", show_default=False),
    _s("local_dtype", "str", "local.dtype", EXTRACT, "local", "descriptor",
       "how local descriptors are stored: auto (int8 when projected, else float16), float16 "
       "(half of float32's bytes, the same matches), float32, int8 (codes of 1/127 steps) or "
       "q15 (codes of 1/15 steps, unprojected RootSIFT only); see the README, \"Compact local "
       "features\"",
       choices=(AUTO, *DESCRIPTOR_DTYPES)),
    _s("max_pixels", "int", "limits.max_pixels", EXTRACT, "extract", "descriptor",
       "reject images whose declared width x height exceeds N", metavar="N"),
    _s("max_bytes", "int", "limits.max_bytes", EXTRACT, "extract", "descriptor",
       "reject files larger than N bytes", metavar="N"),
    _s("min_side", "int", "limits.min_side", EXTRACT, "extract", "descriptor",
       "reject images whose shorter side is below N pixels", metavar="N"),
    _s("max_decoded_bytes", "int", "limits.max_decoded_bytes", EXTRACT, "extract", "descriptor",
       "reject images whose decoded pixels would take more than N bytes", metavar="N"),
    _s("max_jpeg_buffer_bytes", "int", "limits.max_jpeg_buffer_bytes", EXTRACT, "extract",
       "descriptor", "reject progressive JPEGs whose full-size coefficient buffer (2 bytes per "
       "pixel and component, whatever the decode scale) would take more than N bytes",
       metavar="N"),
    # index
    _s("index_factory", "str", "index_factory", ("train",), "index", "index",
       "faiss index_factory string, or 'auto': IDMap2,Flat up to 20k vectors, OPQ-IVF-PQ "
       "beyond (see retrieval/index/factory.py)", metavar="STR"),
    _s("sample_size", "int", "sample_size", ("train",), "index", "index",
       "training sample size (default: chosen from the factory)", metavar="N",
       show_default=False),
    _s("max_index_memory", "size", "max_index_memory", ("train",), "index", "index",
       "memory budget of the index (e.g. 512M, 2G): with 'auto', the largest code that fits "
       "(exact up to 20k vectors, else IVF-PQ with 128/96/64/32/16/8/4-byte codes; without a "
       "budget 64)", metavar="SIZE", show_default=False),
    _s("pretransform", "str", "pretransform", ("train",), "index", "index",
       "rotation before IVF-PQ with 'auto': opq (started from the sample's principal axes), "
       "pca, none", choices=("opq", "pca", "none")),
    _s("seed", "int", "seed", ("train", "learn"), "index", "index",
       "seed of the uniform training sample and of the mining sample"),
    _s("nprobe", "int", "nprobe", SEARCH, "index", "expansion", "IVF lists visited per query"),
    _s("group_vectors", "int", "group_vectors", ("index",), "index", "groups",
       "vectors per index task; also the smallest piece of the merge", metavar="N",
       flag="--group-size"),
    _s("fan_in", "int", "fan_in", ("merge",), "index", "merge", "inputs per merge task",
       metavar="F"),
    _s("pieces", "int", "pieces", ("merge",), "index", "merge", "index pieces to write",
       metavar="N"),
    _s("on_disk", "bool", "on_disk", ("merge",), "index", "merge",
       "on-disk inverted lists (IVF index types only)"),
    # search: expansion and re-ranking
    _s("qe", "int", "qe", SEARCH, "index", "expansion",
       "α-query expansion: re-search with each query plus its top N neighbours (0: off; it "
       "pulls strangers into queries with 1-2 true matches; --verified-qe cannot)",
       metavar="N"),
    _s("qe_alpha", "float", "qe_alpha", SEARCH, "index", "expansion",
       "αQE weight exponent: neighbour similarity ** A", metavar="A"),
    _s("shortlist", "int", "verification.shortlist", SEARCH, "rerank", "rerank",
       "spatially verify the top K global results by local-feature matching + RANSAC (MAGSAC) "
       "and move verified images first, by inliers (0: off)", metavar="K"),
    _s("min_inliers", "int", "verification.min_inliers", ("search", "learn"), "rerank",
       "rerank", "inliers that make an image verified", metavar="N"),
    _s("verified_qe", "int", "verified_qe", SEARCH, "rerank", "rerank",
       "average the query with its best N verified results and search again (0: off). Unlike "
       "--qe it cannot pull in unverified strangers", metavar="N"),
    _s("verify_workers", "int", "verification.workers", ("search", "learn"), "rerank",
       "rerank", "threads verifying pairs", metavar="N"),
    # learning
    _s("learn", "bool", "learn", ("learn", "whiten"), "learn", "job",
       "mine verified pairs and learn a whitening (--no-learn: index the raw descriptors)",
       flag="--no-learn"),
    _s("mine_neighbours", "int", "mining.neighbours", ("learn",), "learn", "learn",
       "global nearest neighbours proposed per sampled image", metavar="N"),
    _s("mine_min_inliers", "int", "mining.min_inliers", ("learn",), "learn", "learn",
       "inliers that make a proposed pair a match", metavar="N"),
    _s("mine_sample_size", "int", "mining.sample_size", ("learn",), "learn", "learn",
       "images that propose pairs: a seeded (--seed) sample bounds the cost on large corpora",
       metavar="N"),
    _s("mine_min_pairs", "int", "mining.min_pairs", ("learn",), "learn", "learn",
       "fewest verified pairs worth learning from (below it `learn` fails and the job indexes "
       "the raw descriptors, saying so in the bundle)", metavar="N"),
    _s("whitening_dim", "int", "whitening_dim", ("learn",), "learn", "learn",
       "PCA dimensions kept before whitening", metavar="D"),
    _s("whitening_shrinkage", "float", "whitening_shrinkage", ("learn",), "learn", "learn",
       "shrinkage of the pair-difference covariance towards the identity, 0-1", metavar="S"),
    _s("verbose", "bool", "verbose", ["run"], "", "top",
       "the runners' own logs", show_default=False),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
# Names a config file may also use.
ALIASES = {"factory": "index_factory"}


def get(name: str) -> Setting:
    return BY_NAME[name]


def read_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def default_of(setting: Setting, defaults: Any) -> Any:
    """The setting's default: its value in ``defaults`` (a ``RunConfig()``: the defaults live
    in the dataclasses, not here)."""
    return read_path(defaults, setting.path)


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# What a Flex Template parameter of each kind must look like (metadata.json "regexes").
TEMPLATE_PATTERNS = {
    "int": "^[0-9]+$",
    "float": "^[0-9.]+$",
    "floats": "^[0-9.]+(,[0-9.]+)*$",
}


def template_parameter(setting: Setting, defaults: Any) -> dict[str, Any]:
    """The setting as a Dataflow Flex Template parameter (metadata.json)."""
    help_text = help_of(setting, defaults)
    if setting.choices:
        help_text += f". One of: {', '.join(setting.choices)}"
    parameter: dict[str, Any] = {
        "name": setting.name,
        "label": setting.name.replace("_", " ").capitalize(),
        "helpText": help_text[0].upper() + help_text[1:],
        "isOptional": True,
    }
    if setting.kind in TEMPLATE_PATTERNS:
        parameter["regexes"] = [TEMPLATE_PATTERNS[setting.kind]]
    elif setting.choices:
        parameter["regexes"] = ["^(" + "|".join(re.escape(c) for c in setting.choices) + ")$"]
    return parameter


def help_of(setting: Setting, defaults: Any) -> str:
    if not setting.show_default:
        return setting.help
    return f"{setting.help} (default {_show(default_of(setting, defaults))})"


# Flag parsers by kind (argparse's type=); a bool is a switch.
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "floats": parse_floats,
    "size": str,
    "strings": str,
}


def add_flags(
    parser: argparse._ActionsContainer, groups: Iterable[str], defaults: Any, title: str = ""
) -> None:
    """The flags of the settings in ``groups`` (default None: a flag not given lets a config
    file's value, then the built-in default, show through); ``defaults``: a ``RunConfig()``,
    whose values the help gives."""
    groups = list(groups)
    container = parser.add_argument_group(title) if title else parser
    for setting in SETTINGS:
        if setting.group not in groups:
            continue
        kwargs: dict[str, Any] = {"dest": setting.name, "help": help_of(setting, defaults)}
        if setting.kind == "bool":
            negated = setting.option.startswith("--no-")
            kwargs.update(action="store_false" if negated else "store_true", default=None)
        elif setting.kind == "table":
            kwargs.update(action="append", metavar=setting.metavar)
        else:
            kwargs["type"] = _FLAG_TYPES[setting.kind]
            if setting.choices:
                kwargs["choices"] = setting.choices
            elif setting.metavar:
                kwargs["metavar"] = setting.metavar
        container.add_argument(setting.option, **kwargs)


def check_file_value(setting: Setting, value: Any, where: str) -> Any:
    """A config file's value, checked against the setting's kind (no silent rounding: 8.5 is
    not an integer, "eight" is not a number); raises :class:`SettingError`."""
    kind = setting.kind
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "floats": isinstance(value, list | tuple)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value),
        "size": (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, str) and bool(SIZE.fullmatch(value))),
        "strings": isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "table": isinstance(value, dict),
    }[kind]
    if setting.name in ("calibration", "master", "sample_size", "threads_per_worker"):
        ok = ok or value is None
    if not ok:
        raise SettingError(f"{where}: {setting.name} = {value!r}: expected {KINDS[kind]}")
    if setting.choices and value not in setting.choices:
        raise SettingError(
            f"{where}: {setting.name} = {value!r}: one of {', '.join(setting.choices)}"
        )
    return value


def stage_settings(stage: str) -> list[Setting]:
    """The settings a stage of the job reads (what a dry run prints under it)."""
    return [s for s in SETTINGS if stage in s.stages]


def describe_values(stage: str, flat: dict[str, Any]) -> str:
    """``name=value`` for each setting ``stage`` reads (the run's values), runner aside."""
    parts = []
    for setting in stage_settings(stage):
        value = flat.get(setting.name)
        parts.append(f"{setting.name}={_show(value) if value not in (None, []) else '-'}")
    return " ".join(parts)


def template_settings() -> Sequence[Setting]:
    return [s for s in SETTINGS if s.template]
