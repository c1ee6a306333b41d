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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DESCRIPTION = """\
Batch indexing and evaluation for instance-level image retrieval.

The indexing pipeline, one command per stage, each reading and writing URIs
(local paths, gs://, s3://):

  retrieval extract  --input IMAGES --output DESC       images -> GeM descriptor shards (Parquet)
  retrieval train    --descriptors DESC --output CB     codebook on a uniform sample
  retrieval index    --descriptors DESC --codebook CB --output GROUPS   codes per shard group
  retrieval merge    --shards GROUPS --output INDEX     tree merge: one index (or N pieces)
  retrieval search   --index INDEX --queries QDESC --output RESULTS

and, for a corpus that changes, a versioned index kept up to date:

  retrieval reindex  --corpus IMAGES --root ROOT      extract only new/changed, new version
  retrieval rollback --root ROOT                      CURRENT back to the previous version

and the whole default pipeline on a benchmark folder, with a report:

  retrieval evaluate --benchmark ../shared/benchmarks/oxford-dev --out reports/oxford-dev
  retrieval demo

Every stage skips the shards a previous run already committed, writes summary.json
(inputs = indexed + failed), and takes --config FILE (TOML or JSON) for repeatable runs.
"""

DEMO_BENCHMARK = "oxford-dev"


def _runner_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runner")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file of settings (flags given here override it)",
    )
    group.add_argument(
        "--runner",
        choices=["beam", "local"],
        help="beam: Apache Beam, locally on the FnApiRunner with --workers "
        "processes, or on Dataflow via --beam-args (default); local: one "
        "process, no Beam (debugging, baselines)",
    )
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="parallel worker processes for local Beam runs (default: CPU cores)",
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
        "--shard-size",
        type=int,
        dest="shard_size",
        metavar="N",
        help="images per shard, the unit of work and of re-runs (default 256)",
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
        "neighbours (default 3; 0 turns it off)",
    )
    group.add_argument(
        "--qe-alpha",
        type=float,
        dest="qe_alpha",
        metavar="A",
        help="αQE weight exponent: neighbour similarity ** A (default 3)",
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
        "fits (exact up to 20k vectors, else IVF-PQ with 64/32/16/8/4-byte codes)",
    )
    group.add_argument(
        "--pretransform",
        choices=["opq", "pca", "none"],
        help="rotation before IVF-PQ with 'auto': opq (default), pca (faster to train), none",
    )
    group.add_argument("--seed", type=int, help="seed of the uniform training sample (default 0)")
    group.add_argument("--nprobe", type=int, help="IVF lists visited per query (default 32)")
    _expansion_options(group)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="retrieval", description=DESCRIPTION, formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
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
    _expansion_options(p)

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

    for name, helptext in (
        ("evaluate", "run the whole pipeline on a benchmark and report"),
        ("demo", f"evaluate on ../shared/benchmarks/{DEMO_BENCHMARK}"),
    ):
        p = sub.add_parser(
            name,
            formatter_class=fmt,
            help=helptext,
            description=textwrap.dedent(f"""\
            {helptext[0].upper() + helptext[1:]}.

            Runs extract -> train -> index -> merge -> search for every query -> metrics, and
            writes report.json, report.md and report.html to --out. A benchmark folder holds
            images/ and gt.json (see ../shared/benchmarks/README.md): mAP as in Revisited
            Oxford/Paris (junk and the query ignored), mAP per landmark, mP@1/5/10, and the
            UKBench N-S score when every group has 4 images. results[0] is the default
            pipeline (with α-query expansion); further rows show the same descriptors without
            expansion and with the other index type (exact / PQ)."""),
        )
        if name == "evaluate":
            p.add_argument(
                "--benchmark", required=True, metavar="DIR", help="folder with images/ and gt.json"
            )
        p.add_argument(
            "--out",
            metavar="DIR",
            required=name == "evaluate",
            help="output folder (work files and report)"
            + ("" if name == "evaluate" else f" (default reports/{DEMO_BENCHMARK})"),
        )
        _extract_options(p)
        _index_options(p)
        _runner_options(p)
    return parser


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


def demo_benchmark() -> Path:
    candidate = benchmarks_dir() / DEMO_BENCHMARK
    if not (candidate / "gt.json").exists():
        raise SystemExit(f"cannot find {candidate} (set CBIR_BENCHMARKS); use `retrieval evaluate`")
    return candidate


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
    )
    print(f"{summary['inputs']} queries, top {summary['k']} each -> {summary['results']}")


def _evaluate(benchmark: str, out: str, args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate_benchmark

    report = evaluate_benchmark(benchmark, out, _config(args))
    acc = report["accounting"]
    print(
        f"\n{report['benchmark']}: {acc['inputs']} inputs = {acc['indexed']} indexed + "
        f"{acc['failed']} failed; {report['queries']} queries"
    )
    for result in report["results"]:
        ns = f"  N-S {result['ns_score']:.2f}" if result.get("ns_score") is not None else ""
        print(
            f"  {result['name']:<12} {result['index']:<24} mAP {result['mAP']:6.2f}  "
            f"landmark mAP {result['landmark_mAP']:6.2f}  mP@10 {result['mP@10']:6.2f}{ns}"
        )
    print(f"report: {Path(out) / 'report.html'}")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_beam_args(sys.argv[1:] if argv is None else argv))
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
        summary = stages.extract(args.input, args.output, _config(args))
        print(
            f"{summary['inputs']} inputs = {summary['indexed']} indexed + {summary['failed']} "
            f"failed -> {args.output}"
        )
    elif args.command == "train":
        _print_json(stages.train(args.descriptors, args.output, _config(args)))
    elif args.command == "index":
        _print_json(stages.index(args.descriptors, args.codebook, args.output, _config(args)))
    elif args.command == "merge":
        _print_json(stages.merge(args.shards, args.output, _config(args)))
    elif args.command == "search":
        _search(args)
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
    elif args.command == "evaluate":
        _evaluate(args.benchmark, args.out, args)
    elif args.command == "demo":
        _evaluate(str(demo_benchmark()), args.out or f"reports/{DEMO_BENCHMARK}", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
