"""Flag groups that several commands share (runner, extraction, index, re-ranking, learning),
and how parsed flags become a run configuration. Every flag defaults to None so that
``--config FILE`` values show through where a flag is not given (``config_from_args``)."""

from __future__ import annotations

import argparse
from typing import Any

from retrieval.runtimes import DEFAULT_RUNTIME, RUNTIMES


def runner_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runner")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file of settings (flags given here override it)",
    )
    group.add_argument(
        "--runner",
        choices=["beam", "spark", "local"],
        help="beam: Apache Beam, locally on the FnApiRunner with --workers "
        "processes, or on Dataflow via --beam-args (default); spark: PySpark, "
        "locally local[--workers], or a cluster via --master / --spark-conf; "
        "local: one process, no runner (debugging, baselines)",
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="parallel workers of a local run: Beam worker processes, or "
        "Spark's local[N] (default: CPU cores)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="N",
        dest="threads_per_worker",
        help="TensorFlow threads per worker (default: cores / workers)",
    )
    group.add_argument(
        "--beam-args",
        metavar="ARGS",
        dest="beam_args",
        help='extra Beam pipeline options, quoted, e.g. "--runner=DataflowRunner '
        '--project=P --region=R --temp_location=gs://B/tmp"',
    )
    group.add_argument(
        "--master",
        metavar="URL",
        help="Spark master: spark://HOST:7077, yarn, k8s://https://HOST "
        "(default: local[--workers], started in this process)",
    )
    group.add_argument(
        "--spark-conf",
        action="append",
        dest="spark_conf",
        metavar="KEY=VALUE",
        help="a Spark setting, repeatable, e.g. --spark-conf "
        "spark.executor.memory=8g (over [spark_conf] in --config)",
    )


def extract_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("descriptor")
    group.add_argument(
        "--backbone",
        metavar="SPEC",
        help="efficientnet-lite0 (default, offline ImageNet weights), "
        "keras:<Application>[@weights], hub:<handle>, savedmodel:<path>",
    )
    group.add_argument(
        "--image-size",
        type=int,
        dest="image_size",
        metavar="PX",
        help="longer image side at scale 1 (default 362, chosen on oxford-dev)",
    )
    group.add_argument(
        "--scales",
        type=lambda s: [float(x) for x in s.split(",")],
        metavar="S1,S2",
        help="multi-scale factors, e.g. 0.707,1,1.414 (default 1)",
    )
    group.add_argument(
        "--gem-p", type=float, dest="gem_p", metavar="P", help="GeM pooling exponent (default 3)"
    )
    group.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help=f"what runs the backbone (default {DEFAULT_RUNTIME}, the fastest measured within "
        "0.5 mAP of tensorflow; see the README's runtime table). Converted models are cached "
        "in $RETRIEVAL_MODEL_CACHE (default ~/.cache/cbir-retrieval/models)",
    )
    group.add_argument(
        "--calibration",
        metavar="URI",
        help="folder, prefix or manifest of representative images that the int8 runtimes "
        "(tflite-int8, onnx-int8) calibrate on (32 drawn with seed 0). Default: the built-in "
        "sample, scikit-image's public-domain/CC0 photos (see the README's runtime section)",
    )
    group.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        help="cpu (default): one worker per core; gpu: one worker per GPU with batches sized "
        "to its memory, decoding spread over the CPU cores",
    )
    group.add_argument(
        "--shard-size",
        type=int,
        dest="shard_size",
        metavar="N",
        help="images per shard, the unit of work and of re-runs (default 256)",
    )
    group.add_argument(
        "--local-features",
        dest="local_features",
        metavar="METHOD",
        help="local features for spatial verification: rootsift (default, OpenCV, offline), "
        "delf:<TF-Hub handle | SavedModel folder | gs:// or s3:// copy>, or none",
    )
    group.add_argument(
        "--local-image-size",
        type=int,
        dest="local_image_size",
        metavar="PX",
        help="longer image side for local features (default 640: measured cost and gain)",
    )
    group.add_argument(
        "--local-max-features",
        type=int,
        dest="local_max_features",
        metavar="N",
        help="at most N local features per image, strongest first (default 1000)",
    )
    group.add_argument(
        "--local-dtype",
        choices=["float16", "float32"],
        dest="local_dtype",
        help="how local descriptors are stored (default float16: half the bytes)",
    )
    group.add_argument(
        "--max-pixels",
        type=int,
        dest="max_pixels",
        metavar="N",
        help="reject images whose declared width x height exceeds N (default 1e8)",
    )
    group.add_argument(
        "--max-bytes",
        type=int,
        dest="max_bytes",
        metavar="N",
        help="reject files larger than N bytes (default 64 MiB)",
    )


def expansion_options(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--qe",
        type=int,
        metavar="N",
        help="α-query expansion: re-search with each query plus its top N "
        "neighbours (default 0, off: it pulls strangers into queries with 1-2 true matches; "
        "--verified-qe cannot)",
    )
    group.add_argument(
        "--qe-alpha",
        type=float,
        dest="qe_alpha",
        metavar="A",
        help="αQE weight exponent: neighbour similarity ** A (default 3)",
    )


def rerank_options(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--shortlist",
        type=int,
        metavar="K",
        help="spatially verify the top K global results by local-feature matching + RANSAC "
        "(MAGSAC) and move verified images first, by inliers (default 100; 0: off)",
    )
    group.add_argument(
        "--min-inliers",
        type=int,
        dest="min_inliers",
        metavar="N",
        help="inliers that make an image verified (default 20)",
    )
    group.add_argument(
        "--verified-qe",
        type=int,
        dest="verified_qe",
        metavar="N",
        help="average the query with its best N verified results and search again "
        "(default 10; 0: off). Unlike --qe it cannot pull in unverified strangers",
    )
    group.add_argument(
        "--verify-workers",
        type=int,
        dest="verify_workers",
        metavar="N",
        help="threads verifying pairs (default 2)",
    )


def learn_options(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--mine-neighbours",
        type=int,
        dest="mine_neighbours",
        metavar="N",
        help="global nearest neighbours proposed per sampled image (default 10)",
    )
    group.add_argument(
        "--mine-min-inliers",
        type=int,
        dest="mine_min_inliers",
        metavar="N",
        help="inliers that make a proposed pair a match (default 20)",
    )
    group.add_argument(
        "--mine-sample-size",
        type=int,
        dest="mine_sample_size",
        metavar="N",
        help="images that propose pairs: a seeded (--seed) sample bounds the cost on large "
        "corpora (default 5000)",
    )
    group.add_argument(
        "--mine-min-pairs",
        type=int,
        dest="mine_min_pairs",
        metavar="N",
        help="fewest verified pairs worth learning from (default 20; below it `learn` fails "
        "and `evaluate` skips the whitening, saying so in the report)",
    )
    group.add_argument(
        "--whitening-dim",
        type=int,
        dest="whitening_dim",
        metavar="D",
        help="PCA dimensions kept before whitening (default 256)",
    )
    group.add_argument(
        "--whitening-shrinkage",
        type=float,
        dest="whitening_shrinkage",
        metavar="S",
        help="shrinkage of the pair-difference covariance towards the identity, 0-1 (default 0.3)",
    )


def index_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index")
    group.add_argument(
        "--index-factory",
        dest="index_factory",
        metavar="STR",
        help="faiss index_factory string, or 'auto' (default): IDMap2,Flat up "
        "to 20k vectors, OPQ-IVF-PQ beyond (see retrieval/index/factory.py)",
    )
    group.add_argument(
        "--sample-size",
        type=int,
        dest="sample_size",
        metavar="N",
        help="training sample size (default: chosen from the factory)",
    )
    group.add_argument(
        "--max-index-memory",
        dest="max_index_memory",
        metavar="SIZE",
        help="memory budget of the index (e.g. 512M, 2G): with 'auto', the largest code that "
        "fits (exact up to 20k vectors, else IVF-PQ with 128/96/64/32/16/8/4-byte codes; "
        "without a budget 64)",
    )
    group.add_argument(
        "--pretransform",
        choices=["opq", "pca", "none"],
        help="rotation before IVF-PQ with 'auto': opq (default: started from the sample's "
        "principal axes), pca, none",
    )
    group.add_argument("--seed", type=int, help="seed of the uniform training sample (default 0)")
    group.add_argument("--nprobe", type=int, help="IVF lists visited per query (default 32)")
    expansion_options(group)


def config_from_args(args: argparse.Namespace) -> Any:
    """The run configuration: defaults, then ``--config FILE``, then the flags given."""
    from pipelines.config import build_config, read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    config = build_config(values)
    return build_config(vars(args), config)


def attach_beam_args(argv: list[str]) -> list[str]:
    """``--beam-args "--runner=X ..."`` -> ``--beam-args=--runner=X ...``: argparse would take a
    value that starts with one of our own flags (--runner, --workers) for that flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--beam-args" and i + 1 < len(argv):
            out.append(f"--beam-args={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
