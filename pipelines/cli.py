"""The ``retrieval`` command line. Run ``retrieval --help`` or ``retrieval <command> --help``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from pipelines import stages
from retrieval.runtimes import DEFAULT_RUNTIME, RUNTIMES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DESCRIPTION = """\
Batch indexing and evaluation for instance-level image retrieval.

The indexing pipeline, one command per stage, each reading and writing URIs
(local paths, gs://, s3://):

  retrieval extract  --input IMAGES --output DESC       images -> GeM descriptor shards (Parquet)
  retrieval train    --descriptors DESC --output CB     codebook on a uniform sample
  retrieval index    --descriptors DESC --codebook CB --output GROUPS   codes per shard group
  retrieval merge    --shards GROUPS --output INDEX     tree merge: one index (or N pieces)
  retrieval search   --index INDEX --queries QDESC --output RESULTS [--local LOCAL]

learning from the corpus itself (no labels): mine verified pairs, learn a whitening, apply it

  retrieval learn    --descriptors DESC --local LOCAL --output MODEL
  retrieval whiten   --descriptors DESC --whitening MODEL --output WDESC   then train/index WDESC

and, for a corpus that changes, a versioned index kept up to date:

  retrieval reindex  --corpus IMAGES --root ROOT      extract only new/changed, new version
  retrieval rollback --root ROOT                      CURRENT back to the previous version

and the whole default pipeline on a benchmark folder, with a report:

  retrieval evaluate --benchmark ../shared/benchmarks/oxford-dev --out reports/oxford-dev
  retrieval demo

the field's standard benchmarks, fetched from their publishers and converted:

  retrieval datasets list
  retrieval datasets fetch roxford5k --to data/roxford5k
  retrieval evaluate --benchmark data/roxford5k --protocol roxford --out reports/roxford5k

and runs compared side by side:

  retrieval compare reports/run-a/report.json reports/run-b/report.json --out reports/a-vs-b

Every stage skips the shards a previous run already committed, writes summary.json
(inputs = indexed + failed), and takes --config FILE (TOML or JSON) for repeatable runs.
"""

DEMO_BENCHMARK = "oxford-dev"
# Fetched by `retrieval demo` when the shared benchmarks are absent: the smallest standard set
# (1,491 images, about 1.1 GB from INRIA's FTP server).
DEMO_FALLBACK = "holidays"


def _runner_options(parser: argparse.ArgumentParser) -> None:
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


def _extract_options(parser: argparse.ArgumentParser) -> None:
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


def _expansion_options(group: argparse._ActionsContainer) -> None:
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


def _rerank_options(group: argparse._ActionsContainer) -> None:
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


def _learn_options(group: argparse._ActionsContainer) -> None:
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


def _index_options(parser: argparse.ArgumentParser) -> None:
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
    _expansion_options(group)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="retrieval", description=DESCRIPTION, formatter_class=fmt)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=None,
        help="log progress details, and the runners' own logs (Spark's JVM log)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "extract",
        formatter_class=fmt,
        help="images -> descriptor shards",
        description=textwrap.dedent("""\
        Describe every image under --input with GeM and write Parquet shards to --output.

        --input is a prefix (folder, gs://bucket/dir, s3://bucket/dir) listed recursively for
        .jpg/.jpeg/.png/.webp/.bmp/.tif/.gif files, or a manifest file (.csv or .parquet with
        a 'uri' column and an optional 'id' column). Image ids are the path relative to the
        prefix, extension included. The listing, cut into shards, is written to --output as
        the run plan (plan.json); later stages read exactly its shards. Shards already
        committed with the same inputs and model are skipped (shards holding transient
        errors, read_failed or model_error, are extracted again). Images that cannot be read
        or decoded become error rows
        (part-XXXXX.errors.parquet) with a reason; the job still succeeds."""),
    )
    p.add_argument("--input", required=True, metavar="URI", help="image prefix or manifest file")
    p.add_argument("--output", required=True, metavar="URI", help="descriptor shard folder")
    p.add_argument(
        "--local-output",
        dest="local_output",
        metavar="URI",
        help="also extract local features (same pass: one read and decode per image) into "
        "their own shards here",
    )
    _extract_options(p)
    _runner_options(p)

    p = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train the index codebook",
        description="Train an empty faiss index (codebook) on a seeded uniform "
        "random sample of all descriptor shards.",
    )
    p.add_argument("--descriptors", required=True, metavar="URI")
    p.add_argument("--output", required=True, metavar="URI", help="codebook folder")
    _index_options(p)
    _runner_options(p)

    p = sub.add_parser(
        "index",
        formatter_class=fmt,
        help="encode groups of descriptor shards with the codebook",
        description=textwrap.dedent("""\
        Encode the descriptors with the trained codebook, in tasks over groups of consecutive
        shards (--group-size vectors each; the codebook is loaded once per task). Each group
        writes only its codes and ids (group-XXXXX.codes: the IVF inverted lists, no codebook
        copy) and an id map, committed by a manifest; a re-run skips committed groups."""),
    )
    p.add_argument("--descriptors", required=True, metavar="URI")
    p.add_argument("--codebook", required=True, metavar="URI")
    p.add_argument("--output", required=True, metavar="URI", help="index group folder")
    p.add_argument(
        "--group-size",
        type=int,
        dest="group_vectors",
        metavar="N",
        help="vectors per index task (default 50000); also the smallest piece of the merge",
    )
    _runner_options(p)

    p = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="merge index groups into one index or N pieces",
        description=textwrap.dedent("""\
        Merge the index groups in rounds of bounded fan-in (each merge task reads at most
        --fan-in inputs, one at a time, so its memory stays below twice what it writes) into
        index.faissindex + idmap.parquet (index id -> image id, uri), or into --pieces N
        index pieces over contiguous id ranges (searched together by `retrieval search`).
        --on-disk writes IVF indexes whose inverted lists stay on disk (<piece>.ivfdata,
        memory-mapped at search time; faiss.contrib.ondisk) for larger-than-memory indexes."""),
    )
    p.add_argument("--shards", required=True, metavar="URI", help="index group folder")
    p.add_argument("--output", required=True, metavar="URI", help="merged index folder")
    p.add_argument(
        "--fan-in", type=int, dest="fan_in", metavar="F", help="inputs per merge task (default 8)"
    )
    p.add_argument("--pieces", type=int, metavar="N", help="index pieces to write (default 1)")
    p.add_argument(
        "--on-disk",
        action="store_true",
        default=None,
        dest="on_disk",
        help="on-disk inverted lists (IVF index types only)",
    )
    _runner_options(p)

    p = sub.add_parser(
        "search",
        formatter_class=fmt,
        help="search the index with query descriptors",
        description="Search the merged index with every descriptor under "
        "--queries (a descriptor shard folder, e.g. from `retrieval "
        "extract` on the query images) and write the top --k results "
        "per query as results.parquet (query_id, rank, id, uri, score).",
    )
    p.add_argument(
        "--index",
        required=True,
        metavar="URI",
        help="merged index folder, or a versioned root (its CURRENT version is searched)",
    )
    p.add_argument("--queries", required=True, metavar="URI", help="query descriptor folder")
    p.add_argument(
        "--output", required=True, metavar="URI", help="folder for results.parquet and summary.json"
    )
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument("--nprobe", type=int, help="IVF lists visited per query (default 32)")
    p.add_argument(
        "--local",
        metavar="URI",
        help="local-feature folder of the indexed images (from `extract --local-output`): "
        "turns on spatial verification and verified query expansion",
    )
    p.add_argument(
        "--query-local",
        dest="query_local",
        metavar="URI",
        help="local-feature folder of the queries (default: --local)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings")
    _expansion_options(p)
    _rerank_options(p)

    p = sub.add_parser(
        "learn",
        formatter_class=fmt,
        help="mine verified pairs (no labels) and learn a whitening",
        description=textwrap.dedent("""\
        Learn from the corpus itself, without labels: every image of a seeded sample proposes
        its nearest neighbours by global descriptor, each proposed pair is verified by local-
        feature matching + RANSAC, and the verified pairs teach a whitening of the global
        descriptors (Radenović et al.'s learned whitening: PCA, then whitening of matching-pair
        differences, with shrinkage). Writes whitening.npz + whitening.json (with pairs found
        and mining time) to --output; never reads ground truth. Apply it with `retrieval whiten`
        before train/index; `retrieval search` whitens raw query descriptors itself."""),
    )
    p.add_argument("--descriptors", required=True, metavar="URI", help="descriptor folder")
    p.add_argument(
        "--local", required=True, metavar="URI", help="local-feature folder of the same images"
    )
    p.add_argument("--output", required=True, metavar="URI", help="whitening model folder")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings")
    p.add_argument("--seed", type=int, help="seed of the mining sample (default 0)")
    _learn_options(p)
    _rerank_options(p)

    p = sub.add_parser(
        "whiten",
        formatter_class=fmt,
        help="apply a learned whitening to descriptor shards",
        description="Write the whitened copy of every descriptor shard (same shard ids and "
        "error rows; the model fingerprint gains the whitening's SHA-256) for train/index.",
    )
    p.add_argument("--descriptors", required=True, metavar="URI")
    p.add_argument("--whitening", required=True, metavar="URI", help="folder from `learn`")
    p.add_argument("--output", required=True, metavar="URI", help="whitened descriptor folder")

    p = sub.add_parser(
        "reindex",
        formatter_class=fmt,
        help="re-index only what changed in a corpus (nightly)",
        description=textwrap.dedent("""\
        Compare the corpus with the live version under --root (content keys: GCS generation
        + size, S3 ETag + size, else SHA-256 of the bytes), extract only new and changed
        images, drop deleted ones, and write a new complete version:

          ROOT/versions/vNNNNNN/   state, descriptors, codebook, index, summary.json
          ROOT/CURRENT             moved to the new version atomically once it is complete

        The codebook is kept unless the new vectors' quantization error exceeds
        --drift-threshold times the training sample's (default 1.5), or the corpus size calls
        for another index type; then it is retrained. summary.json counts new, changed,
        deleted, unchanged and failed images. The last --keep versions are kept."""),
    )
    p.add_argument("--corpus", required=True, metavar="URI", help="image prefix or manifest")
    p.add_argument("--root", required=True, metavar="URI", help="versioned index root")
    p.add_argument("--keep", type=int, default=3, metavar="N", help="versions to keep (default 3)")
    p.add_argument(
        "--drift-threshold",
        type=float,
        default=1.5,
        dest="drift_threshold",
        metavar="R",
        help="retrain when new vectors quantize R times worse than the training sample",
    )
    _extract_options(p)
    _index_options(p)
    _runner_options(p)

    p = sub.add_parser(
        "rollback",
        formatter_class=fmt,
        help="point CURRENT back at the previous version",
        description="Move ROOT/CURRENT back to the newest kept version older than the live "
        "one (atomically); `retrieval search --index ROOT` then answers from it.",
    )
    p.add_argument("--root", required=True, metavar="URI", help="versioned index root")

    p = sub.add_parser(
        "submit",
        formatter_class=fmt,
        help="run the whole indexing job on Dataflow or a Spark cluster",
        description=textwrap.dedent("""\
        Run the whole indexing job on a cluster: extract -> train -> index -> merge for the
        corpus under --input (and extract for --queries), into folders under --output:
        descriptors/, codebook/, index_shards/, index/, query_descriptors/.

        --runner dataflow: extract and index run as Dataflow jobs (pipeline options from the
          [dataflow] section of --config: project, region, temp_location, machine_type,
          max_workers, sdk_container_image, gpu_type/gpu_count); train and merge run here.
        --runner spark: one Spark application (deploy/spark/job.py) runs every stage with
          --runner spark: `spark-submit` (standalone, YARN, Kubernetes) or, when [spark]
          cluster is set, `gcloud dataproc jobs submit pyspark`. The project reaches the
          executors as a packed environment (env_archive) or a container image (Kubernetes).

        The same --config drives local runs (`retrieval extract --config ...`) and this one.
        --dry-run prints exactly what would run, with <PLACEHOLDERS> for missing values; only
        settings that contradict each other are refused. See deploy/ and the README."""),
    )
    p.add_argument("--runner", required=True, choices=["dataflow", "spark"])
    p.add_argument("--input", required=True, metavar="URI", help="image prefix or manifest")
    p.add_argument("--output", required=True, metavar="URI", help="job folder")
    p.add_argument("--queries", metavar="URI", help="query images to describe as well")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON settings")
    p.add_argument("--dry-run", action="store_true", dest="dry_run", help="print, do not run")

    for name, helptext in (
        ("evaluate", "run the whole pipeline on a benchmark and report"),
        (
            "demo",
            f"evaluate on ../shared/benchmarks/{DEMO_BENCHMARK}, else on {DEMO_FALLBACK} "
            "(fetched to data/ on first use)",
        ),
    ):
        p = sub.add_parser(
            name,
            formatter_class=fmt,
            help=helptext,
            description=textwrap.dedent(f"""\
            {helptext[0].upper() + helptext[1:]}.

            Runs extract (GeM + local features, one decode per image) -> learn (mine verified
            pairs without labels, learn a whitening) -> whiten -> train -> index -> merge ->
            search every query + spatial verification + verified query expansion -> metrics,
            and writes report.json, report.md and report.html to --out. A benchmark folder
            holds images/ and gt.json (see ../shared/benchmarks/README.md): mAP as in Revisited
            Oxford/Paris (junk and the query ignored), mAP per landmark, mP@1/5/10, and the
            UKBench N-S score when every group has 4 images. results[0] is the default
            pipeline (global+lw+sv+vqe); the row `global` is the floor (raw descriptors, exact
            search, nothing else); further rows add one step at a time, and show α-query
            expansion and PQ compression for comparison."""),
        )
        if name == "evaluate":
            p.add_argument(
                "--benchmark", required=True, metavar="DIR", help="folder with images/ and gt.json"
            )
            p.add_argument(
                "--protocol",
                metavar="NAME[,NAME]",
                help="how queries are scored: default (the gt.json as it is), "
                "roxford-easy|medium|hard, rparis-easy|medium|hard, or roxford / rparis for "
                "all three Revisited setups (one result row each, mP@k as revisitop "
                "defines it)",
            )
        p.add_argument(
            "--out",
            metavar="DIR",
            required=name == "evaluate",
            help="output folder (work files and report)"
            + ("" if name == "evaluate" else " (default reports/<benchmark name>)"),
        )
        _extract_options(p)
        _index_options(p)
        group = p.add_argument_group("re-ranking and learning")
        _rerank_options(group)
        group.add_argument(
            "--default-only",
            dest="default_only",
            action="store_true",
            help="score only the default pipeline and the `global` floor (skips the other "
            "rows: faster)",
        )
        group.add_argument(
            "--no-learn",
            dest="learn",
            action="store_false",
            default=None,
            help="skip mining pairs and learning a whitening",
        )
        _learn_options(group)
        _runner_options(p)

    _datasets_parser(sub, fmt)
    _compare_parser(sub, fmt)
    return parser


def _datasets_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "datasets",
        formatter_class=fmt,
        help="list and fetch the standard benchmarks",
        description=textwrap.dedent("""\
        The field's standard instance-retrieval benchmarks: Oxford5k, Paris6k, Revisited
        Oxford/Paris, INRIA Holidays, UKBench, Google Landmarks v2 (retrieval lists).

          retrieval datasets list                       sizes, protocols, licences, citations
          retrieval datasets fetch NAME --to DIR        download, verify, unpack, convert

        `fetch` downloads from the publishers' own URLs into DIR/downloads (resuming an
        interrupted download), checks SHA-256 digests (none are published for these sets:
        the digest computed on the first download is recorded in DIR/downloads/SHA256SUMS and
        later downloads must match it), unpacks, and converts the ground truth to DIR/images/
        + DIR/gt.json, keeping the official query crops. Then:
        retrieval evaluate --benchmark DIR --out REPORT_DIR [--protocol roxford]"""),
    )
    actions = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="the known benchmarks")
    f = actions.add_parser(
        "fetch",
        formatter_class=fmt,
        help="download and convert one benchmark",
        description="Download, verify, unpack and convert one benchmark into --to.",
    )
    f.add_argument("name", metavar="NAME", help="a name from `retrieval datasets list`")
    f.add_argument("--to", required=True, metavar="DIR", help="destination folder")
    f.add_argument(
        "--mirror",
        metavar="URL",
        default=os.environ.get("CBIR_DATASETS_MIRROR"),
        help="fetch every file from URL/<file name> instead of the publisher "
        "(a local copy of the archives; default $CBIR_DATASETS_MIRROR)",
    )
    f.add_argument(
        "--with-images",
        action="store_true",
        dest="with_images",
        help="also the optional files (GLDv2 images, about 110 GB)",
    )
    f.add_argument(
        "--delete-archives",
        action="store_true",
        dest="delete_archives",
        help="delete the downloaded archives after conversion",
    )
    f.add_argument("--no-progress", action="store_true", dest="no_progress")


def _compare_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "compare",
        formatter_class=fmt,
        help="compare evaluation reports side by side",
        description=textwrap.dedent("""\
        Compare two or more evaluation reports (report.json from `retrieval evaluate`) of
        the same benchmark: writes DIR/compare.html and DIR/compare.md with the metrics side by
        side and their deltas against the first report, a per-query AP scatter (which
        queries got better or worse), per-landmark deltas, and the top-10 results of the
        queries that changed most (thumbnails, when the benchmark images are found).

        Each report's first result row is compared; REPORT may be report.json or the
        folder holding it, optionally suffixed with #ROW to pick another row by name."""),
    )
    p.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--benchmark",
        metavar="DIR",
        help="benchmark folder for thumbnails (default: the one the first report names)",
    )
    p.add_argument(
        "--changed",
        type=int,
        default=5,
        metavar="N",
        help="show the top-10 results of the N queries whose AP changed most (default 5)",
    )


def _config(args: argparse.Namespace) -> Any:
    from pipelines.config import build_config, read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    config = build_config(values)
    return build_config(vars(args), config)


def benchmarks_dir() -> Path:
    """Where the shared benchmarks are: $CBIR_BENCHMARKS, else ../shared/benchmarks next to the
    repository, else next to the current folder (the first that exists; else the repo one)."""
    if os.environ.get("CBIR_BENCHMARKS"):
        return Path(os.environ["CBIR_BENCHMARKS"])
    candidates = [
        base.parent / "shared" / "benchmarks"
        for base in (Path(__file__).resolve().parents[1], Path.cwd())
    ]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def demo_data_dir() -> Path:
    """Where the demo fetches its fallback benchmark: $CBIR_DEMO_DATA, else data/ in the repo."""
    if os.environ.get("CBIR_DEMO_DATA"):
        return Path(os.environ["CBIR_DEMO_DATA"])
    return Path(__file__).resolve().parents[1] / "data"


def demo_benchmark() -> Path:
    """The shared oxford-dev if present; else the fallback set, fetched on first use (from
    $CBIR_DATASETS_MIRROR when set). Raises CommandError with what to do when neither works."""
    candidate = benchmarks_dir() / DEMO_BENCHMARK
    if (candidate / "gt.json").exists():
        return candidate
    from retrieval.datasets import registry
    from retrieval.datasets.fetch import FetchError, fetch_dataset
    from retrieval.datasets.formats import FormatError

    target = demo_data_dir() / DEMO_FALLBACK
    spec = registry.get(DEMO_FALLBACK)
    print(
        f"{candidate} not found; fetching {spec.title} ({spec.download_size}) to {target}",
        file=sys.stderr,
    )
    try:
        fetch_dataset(spec, target, mirror=os.environ.get("CBIR_DATASETS_MIRROR"))
    except (FetchError, FormatError, OSError) as exc:
        raise CommandError(
            f"no benchmark at {candidate} and {DEMO_FALLBACK} could not be fetched ({exc}); "
            f"run `retrieval datasets fetch {DEMO_FALLBACK} --to {target}` where the "
            "publisher is reachable (or point $CBIR_BENCHMARKS at a folder holding "
            f"{DEMO_BENCHMARK}/), then `make demo` again"
        ) from exc
    return target


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def _datasets(args: argparse.Namespace) -> None:
    from retrieval.datasets import registry

    if args.datasets_command == "list":
        for spec in registry.DATASETS.values():
            print(f"{spec.name}: {spec.title}")
            for label, value in (
                ("download", spec.download_size),
                ("images", spec.images),
                ("queries", spec.queries),
                ("protocol", spec.protocol),
                ("licence", spec.licence),
                ("cite", spec.citation),
                *(("note", note) for note in spec.notes),
            ):
                print(
                    textwrap.fill(
                        value, 96, initial_indent=f"  {label:<9} ", subsequent_indent=" " * 12
                    )
                )
            print()
        return
    from retrieval.datasets.fetch import FetchError, fetch_dataset
    from retrieval.datasets.formats import FormatError

    try:
        spec = registry.get(args.name)
        record = fetch_dataset(
            spec,
            args.to,
            mirror=args.mirror,
            with_optional=args.with_images,
            progress=not args.no_progress,
            keep_archives=not args.delete_archives,
        )
    except (FetchError, FormatError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    state = "already fetched" if record.get("already_fetched") else "fetched"
    print(
        f"{spec.name} {state}: {record['images']} images, {record['queries']} queries "
        f"-> {args.to} (gt.json, images/)"
    )
    for warning in record.get("warnings", []):
        print(f"warning: {warning}")
    print(f"next: retrieval evaluate --benchmark {args.to} --out reports/{spec.name}")


def _compare(args: argparse.Namespace) -> None:
    from retrieval.evaluation.compare import ReportError, compare_reports

    try:
        paths = compare_reports(
            args.reports, args.out, benchmark_dir=args.benchmark, changed=args.changed
        )
    except (ReportError, FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"comparison: {paths['html']} ({paths['markdown']})")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _search(args: argparse.Namespace) -> None:
    config = _config(args)
    summary = stages.search(
        args.index,
        args.queries,
        args.output,
        k=args.k,
        nprobe=config.nprobe,
        expansion=config.expansion,
        rerank=config.rerank,
        local=args.local,
        query_local=args.query_local,
    )
    print(f"{summary['inputs']} queries, top {summary['k']} each -> {summary['results']}")


def _evaluate(benchmark: str, out: str, args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate_benchmark
    from retrieval.evaluation import protocols

    try:
        chosen = protocols.expand(getattr(args, "protocol", None))
        report = evaluate_benchmark(
            benchmark,
            out,
            _config(args),
            protocols=chosen,
            variants=not getattr(args, "default_only", False),
        )
    except ValueError as exc:  # a bad gt.json or a protocol the ground truth cannot serve
        raise CommandError(str(exc)) from exc
    acc = report["accounting"]
    print(
        f"\n{report['benchmark']}: {acc['inputs']} inputs = {acc['indexed']} indexed + "
        f"{acc['failed']} failed; {report['queries']} queries"
    )
    name_width = max(len(result["name"]) for result in report["results"])
    index_width = max(len(result["index"]) for result in report["results"])
    for result in report["results"]:
        ns = f"  N-S {result['ns_score']:.2f}" if result.get("ns_score") is not None else ""
        print(
            f"  {result['name']:<{name_width}}  {result['index']:<{index_width}}  "
            f"mAP {result['mAP']:6.2f}  "
            f"landmark mAP {result['landmark_mAP']:6.2f}  mP@10 {result['mP@10']:6.2f}{ns}"
        )
    from retrieval import storage

    print(f"report: {storage.join(out, 'report.html')}")


def _attach_beam_args(argv: list[str]) -> list[str]:
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


# What a user can get wrong (a path, a URI, a setting, a folder from another stage or version):
# these end in one line naming the problem, exit status 2; anything else is a bug and keeps its
# traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ValueError,  # bad settings, unknown URI schemes, manifests and schemas that are refused
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from retrieval.plan import PlanError

    return (*USER_ERRORS, PlanError, CommandError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_beam_args(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except _user_errors() as exc:
        from retrieval.redaction import redact

        if args.verbose:
            import traceback

            traceback.print_exc()
        message = redact(str(exc) or type(exc).__name__)
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        print(f"retrieval: error: {message}{hint}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Local Beam workers forward their start-up notices as warnings; errors still show.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.ERROR
        )
    if args.command == "extract":
        config = _config(args)  # a bad config file fails before anything is listed
        summary = stages.extract(args.input, args.output, config, local_output=args.local_output)
        noted = summary.get("images_with_notes")
        print(
            f"{summary['inputs']} inputs = {summary['indexed']} indexed + {summary['failed']} "
            f"failed -> {args.output}"
            + (f" ({noted} indexed with notes, e.g. a broken EXIF block)" if noted else "")
        )
    elif args.command == "train":
        _print_json(stages.train(args.descriptors, args.output, _config(args)))
    elif args.command == "index":
        _print_json(stages.index(args.descriptors, args.codebook, args.output, _config(args)))
    elif args.command == "merge":
        _print_json(stages.merge(args.shards, args.output, _config(args)))
    elif args.command == "search":
        _search(args)
    elif args.command == "learn":
        from retrieval.learning.whitening import InsufficientPairsError

        try:
            record = stages.learn(args.descriptors, args.local, args.output, _config(args))
        except InsufficientPairsError as exc:
            raise SystemExit(f"retrieval learn: {exc}") from None
        mining = record["mining"]
        print(
            f"{mining['verified_pairs']} verified pairs of {mining['proposed_pairs']} proposed "
            f"({mining['sampled_images']} images sampled, {mining['mining_s']} s) -> "
            f"whitening to {record['dim']} dims in {args.output}"
        )
    elif args.command == "whiten":
        info = stages.whiten(args.descriptors, args.whitening, args.output)
        print(f"whitened descriptors ({info['id']}) -> {args.output}")
    elif args.command == "reindex":
        from pipelines.reindex import reindex

        summary = reindex(
            args.corpus,
            args.root,
            _config(args),
            keep=args.keep,
            drift_threshold=args.drift_threshold,
        )
        print(
            f"{summary['version']}: {summary['new']} new, {summary['changed']} changed, "
            f"{summary['deleted']} deleted, {summary['unchanged']} unchanged, "
            f"{summary['failed']} failed; codebook "
            + ("retrained" if summary["retrained"] else "kept")
            + f" ({summary['retrain_reason']})"
        )
    elif args.command == "rollback":
        from retrieval.versions import rollback

        print(f"CURRENT -> {rollback(args.root)}")
    elif args.command == "datasets":
        _datasets(args)
    elif args.command == "compare":
        _compare(args)
    elif args.command == "evaluate":
        _evaluate(args.benchmark, args.out, args)
    elif args.command == "submit":
        from pipelines.submit.command import submit
        from pipelines.submit.dataflow import SubmitError

        try:
            submit(
                args.runner,
                args.input,
                args.output,
                queries=args.queries,
                config=args.config,
                dry_run=args.dry_run,
                verbose=bool(args.verbose),
            )
        except SubmitError as exc:
            print(f"retrieval submit: {exc}", file=sys.stderr)
            return 2
    elif args.command == "demo":
        benchmark = demo_benchmark()
        _evaluate(str(benchmark), args.out or f"reports/{benchmark.name}", args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
