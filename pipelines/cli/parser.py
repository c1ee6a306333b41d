"""The ``retrieval`` argument parser: one sub-command per stage, each ``--help`` written as
documentation. The flag groups several commands share are in ``options``."""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Any

from pipelines.cli import options
from pipelines.cli.demo import DEMO_BENCHMARK, DEMO_FALLBACK

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
    options.extract_options(p)
    options.runner_options(p)

    p = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train the index codebook",
        description="Train an empty faiss index (codebook) on a seeded uniform "
        "random sample of all descriptor shards.",
    )
    p.add_argument("--descriptors", required=True, metavar="URI")
    p.add_argument("--output", required=True, metavar="URI", help="codebook folder")
    options.index_options(p)
    options.runner_options(p)

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
    options.group_options(p)
    options.runner_options(p)

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
    options.merge_options(p)
    options.runner_options(p)

    p = sub.add_parser(
        "search",
        formatter_class=fmt,
        help="answer queries from a job's bundle (or a merged index)",
        description=textwrap.dedent("""\
        Answer queries and write the top --k per query to --output/results.parquet (query_id,
        rank, id, uri, score, inliers) with summary.json.

        --index is a job's output (the bundle `retrieval submit`, `retrieval evaluate` and
        `retrieval reindex` leave: bundle.json), a re-index root (its CURRENT version), or a
        bare merged index folder. A bundle answers with its own default pipeline and needs no
        other flag: raw query descriptors are whitened with the bundle's whitening, the global
        shortlist is verified against the corpus's local features (spatial verification;
        those of shortlisted images not yet computed are computed first, once, on the
        runner's workers: local features on first use) and expanded with verified
        neighbours. Flags given here override the bundle's defaults.

        --query-images URI describes the query images first (a folder, prefix or manifest,
        like `extract --input`) with the bundle's own model, global and local features, into
        --output; --queries URI takes descriptors already extracted (with the same model)."""),
    )
    p.add_argument(
        "--index",
        required=True,
        metavar="URI",
        help="a job's bundle, a re-index root (CURRENT is searched), or a merged index folder",
    )
    queries = p.add_mutually_exclusive_group(required=True)
    queries.add_argument(
        "--query-images",
        dest="query_images",
        metavar="URI",
        help="query images (prefix or manifest): described with the bundle's model first",
    )
    queries.add_argument("--queries", metavar="URI", help="query descriptor folder")
    p.add_argument(
        "--output", required=True, metavar="URI", help="folder for results.parquet and summary.json"
    )
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument(
        "--local",
        metavar="URI",
        help="local-feature folder of the indexed images (from `extract --local-output`, or a "
        "job's local_features/ with the layers computed on first use), for a bare index "
        "folder: turns on spatial verification and verified query expansion (a bundle knows "
        "its own, and computes missing ones on first use)",
    )
    p.add_argument(
        "--query-local",
        dest="query_local",
        metavar="URI",
        help="local-feature folder of the --queries descriptors (default: the corpus's, for "
        "queries that are images of the corpus)",
    )
    group = p.add_argument_group("re-ranking (default: the bundle's)")
    options.expansion_options(group)
    options.rerank_options(group)
    options.runner_options(p)

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
    options.learn_options(p)
    options.rerank_options(p)
    p.add_argument("--seed", type=int, help="seed of the mining sample (default 0)")

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
        Run the default job incrementally: compare the corpus with the live version under
        --root (content keys: GCS generation + size, S3 ETag + size, else SHA-256 of the
        bytes), extract global and local features of new and changed images only, drop
        deleted ones, and write a new complete version, a bundle that `retrieval search
        --index ROOT` answers from with the job's default pipeline:

          ROOT/data/vNNNNNN/       this run's extraction (local features shared, not copied,
                                   by later versions)
          ROOT/versions/vNNNNNN/   state, descriptors, whitening, codebook, index,
                                   bundle.json, summary.json
          ROOT/CURRENT             moved to the new version atomically once it is complete

        The whitening is kept unless there is none yet, the settings changed, or images added,
        changed and deleted since it was learned exceed --relearn-fraction of the corpus it
        was learned on; then it is learned again. The codebook is kept unless the new vectors'
        quantization error exceeds --drift-threshold times the training sample's (default
        1.5), the corpus size calls for another index type, or the whitening changed; then it
        is retrained. summary.json counts new, changed, deleted, unchanged and failed images.
        The last --keep versions are kept, with the data they use."""),
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
    p.add_argument(
        "--relearn-fraction",
        type=float,
        default=0.25,
        dest="relearn_fraction",
        metavar="F",
        help="learn the whitening again once images added, changed or deleted since it was "
        "learned exceed F times the corpus it was learned on (default 0.25)",
    )
    options.extract_options(p)
    options.index_options(p)
    options.group_options(p)
    options.merge_options(p)
    options.job_options(p)
    options.learn_options(p)
    options.rerank_options(p)
    options.runner_options(p)

    p = sub.add_parser(
        "rollback",
        formatter_class=fmt,
        help="point CURRENT back at the previous version",
        description="Move ROOT/CURRENT back to the newest kept version older than the live "
        "one (atomically); `retrieval search --index ROOT` then answers from it.",
    )
    p.add_argument("--root", required=True, metavar="URI", help="versioned index root")
    options.lease_options(p)

    p = sub.add_parser(
        "submit",
        formatter_class=fmt,
        help="run the whole indexing job on Dataflow or a Spark cluster",
        description=textwrap.dedent("""\
        Run the default job on a cluster, the same stages `retrieval evaluate` measures:
        extract (GeM) -> learn (mined pairs, their images' local features on first use ->
        whitening) -> whiten -> train -> index -> merge, into --output, which ends as a
        bundle (bundle.json) that `retrieval search --index OUTPUT` answers from with the job's
        defaults. With --queries, the job then describes the query images with the bundle's
        model and searches: OUTPUT/results/results.parquet (query_id, rank, id, uri, score,
        inliers).

        --runner dataflow: the workers' stages (extract, learn's local features, index,
          merge) run as Dataflow jobs (pipeline options from the [dataflow] section of
          --config: project, region, temp_location, machine_type, max_workers,
          sdk_container_image, gpu_type/gpu_count); learn, whiten and train run here.
        --runner spark: one Spark application (deploy/spark/job.py) runs the job with the
          Spark runner: `spark-submit` (standalone, YARN, Kubernetes) or, when [spark]
          cluster is set, `gcloud dataproc jobs submit pyspark`. The project reaches the
          executors as a packed environment (env_archive) or a container image (Kubernetes);
          a standalone master on this machine (spark://127.0.0.1:PORT) uses this Python.

        The same --config drives local runs (`retrieval extract --config ...`) and this one.
        --dry-run prints exactly what would run, with <PLACEHOLDERS> for missing values; only
        settings that contradict each other are refused. See deploy/ and the README."""),
    )
    p.add_argument("--runner", required=True, choices=["dataflow", "spark"])
    p.add_argument("--input", required=True, metavar="URI", help="image prefix or manifest")
    p.add_argument("--output", required=True, metavar="URI", help="job folder")
    p.add_argument(
        "--queries", metavar="URI", help="query images: described and searched after the job"
    )
    p.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    p.add_argument(
        "--master",
        metavar="URL",
        help="Spark master (over [spark] master in --config), e.g. spark://HOST:7077, yarn",
    )
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

            Runs extract (GeM) -> learn (mine pairs by global kNN, compute their images' local
            features on first use, keep the verified pairs: no labels; learn a whitening) ->
            whiten -> train -> index -> merge -> search every query + spatial verification +
            verified query expansion -> metrics, and writes report.json, report.md and
            report.html to --out. A benchmark folder
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
        options.extract_options(p)
        options.index_options(p)
        options.group_options(p)
        options.merge_options(p)
        group = p.add_argument_group("re-ranking and learning")
        options.rerank_options(group)
        group.add_argument(
            "--default-only",
            dest="default_only",
            action="store_true",
            help="score only the default pipeline and the `global` floor (skips the other "
            "rows: faster)",
        )
        options.job_options(group)
        options.learn_options(group)
        options.runner_options(p)

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
