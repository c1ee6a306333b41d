"""What each ``retrieval`` command does with its parsed flags: call the stage (``pipelines``),
print one or a few lines a person reads. ``COMMANDS`` maps a command's name to its function; a
function returns the exit status, or raises ``CommandError`` for a user-facing failure."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from typing import Any

from pipelines import stages
from pipelines.cli.demo import demo_benchmark
from pipelines.cli.errors import CommandError
from pipelines.cli.options import config_from_args


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def extract(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad config file fails before anything is listed
    summary = stages.extract(args.input, args.output, config, local_output=args.local_output)
    noted = summary.get("images_with_notes")
    print(
        f"{summary['inputs']} inputs = {summary['indexed']} indexed + {summary['failed']} "
        f"failed -> {args.output}"
        + (f" ({noted} indexed with notes, e.g. a broken EXIF block)" if noted else "")
    )
    return 0


def train(args: argparse.Namespace) -> int:
    _print_json(stages.train(args.descriptors, args.output, config_from_args(args)))
    return 0


def index(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    _print_json(stages.index(args.descriptors, args.codebook, args.output, config))
    return 0


def merge(args: argparse.Namespace) -> int:
    _print_json(stages.merge(args.shards, args.output, config_from_args(args)))
    return 0


def search(args: argparse.Namespace) -> int:
    from pipelines import job

    bundle_uri = job.resolve_bundle(args.index)
    if bundle_uri is None:
        if args.query_images:
            raise CommandError(
                f"{args.index} is a bare index folder: --query-images needs a job's bundle "
                "(bundle.json, from `retrieval submit`, `evaluate` or `reindex`) to know the "
                "model; describe the images with `retrieval extract` and pass --queries"
            )
        config = config_from_args(args)
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
    else:
        if args.local:
            raise CommandError(f"{args.index} is a bundle: it knows its own local features")
        bundle = job.Bundle.read(bundle_uri)
        # The bundle's settings, then the config file's and flags' (what the user changed).
        base = config_from_args(args)
        config = bundle.config(base, **given_search_settings(args))
        if args.query_images:
            summary = job.run_query_job(
                bundle_uri,
                args.query_images,
                args.output,
                base=config,
                k=args.k,
                results=args.output,
            )
        else:
            summary = job.search_bundle(
                bundle,
                args.queries,
                args.output,
                config,
                k=args.k,
                query_local=args.query_local,
            )
    print(f"{summary['inputs']} queries, top {summary['k']} each -> {summary['results']}")
    return 0


def given_search_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The search settings a user gave (flags, or the config file), over a bundle's defaults."""
    from pipelines import settings
    from pipelines.config import read_config_file

    names = [s.name for s in settings.SETTINGS if s.group in ("expansion", "rerank")]
    given = read_config_file(args.config) if getattr(args, "config", None) else {}
    values = {k: v for k, v in given.items() if k in names}
    values.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    return values


def learn(args: argparse.Namespace) -> int:
    from retrieval.learning.whitening import InsufficientPairsError

    try:
        record = stages.learn(args.descriptors, args.local, args.output, config_from_args(args))
    except InsufficientPairsError as exc:
        raise CommandError(str(exc)) from exc
    mining = record["mining"]
    print(
        f"{mining['verified_pairs']} verified pairs of {mining['proposed_pairs']} proposed "
        f"({mining['sampled_images']} images sampled, {mining['mining_s']} s) -> "
        f"whitening to {record['dim']} dims in {args.output}"
    )
    return 0


def whiten(args: argparse.Namespace) -> int:
    info = stages.whiten(args.descriptors, args.whitening, args.output)
    print(f"whitened descriptors ({info['id']}) -> {args.output}")
    return 0


def reindex(args: argparse.Namespace) -> int:
    from pipelines.reindex import reindex as reindex_corpus

    summary = reindex_corpus(
        args.corpus,
        args.root,
        config_from_args(args),
        keep=args.keep,
        drift_threshold=args.drift_threshold,
        relearn_fraction=args.relearn_fraction,
    )
    print(
        f"{summary['version']}: {summary['new']} new, {summary['changed']} changed, "
        f"{summary['deleted']} deleted, {summary['unchanged']} unchanged, "
        f"{summary['failed']} failed; codebook "
        + ("retrained" if summary["retrained"] else "kept")
        + f" ({summary['retrain_reason']}); whitening: {summary['whitening_reason']}"
    )
    return 0


def rollback(args: argparse.Namespace) -> int:
    from retrieval.versions import rollback as rollback_root

    print(f"CURRENT -> {rollback_root(args.root, lease_wait=config_from_args(args).lease_wait)}")
    return 0


def submit(args: argparse.Namespace) -> int:
    from pipelines.submit.command import submit as submit_job
    from pipelines.submit.dataflow import SubmitError

    try:
        submit_job(
            args.runner,
            args.input,
            args.output,
            queries=args.queries,
            config=args.config,
            dry_run=args.dry_run,
            verbose=bool(args.verbose),
            master=args.master,
            k=args.k,
        )
    except SubmitError as exc:
        raise CommandError(str(exc)) from exc
    return 0


def _report(benchmark: str, out: str, args: argparse.Namespace) -> int:
    """Evaluate the default pipeline (and, unless --default-only, each step) on a benchmark
    folder, print the result rows and where the report is."""
    from pipelines.evaluate import evaluate_benchmark
    from retrieval import storage
    from retrieval.evaluation import protocols

    try:
        chosen = protocols.expand(getattr(args, "protocol", None))
        report = evaluate_benchmark(
            benchmark,
            out,
            config_from_args(args),
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
    print(f"report: {storage.join(out, 'report.html')}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    return _report(args.benchmark, args.out, args)


def demo(args: argparse.Namespace) -> int:
    benchmark = demo_benchmark()
    return _report(str(benchmark), args.out or f"reports/{benchmark.name}", args)


def datasets(args: argparse.Namespace) -> int:
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
        return 0
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
    return 0


def compare(args: argparse.Namespace) -> int:
    from retrieval.evaluation.compare import ReportError, compare_reports

    try:
        paths = compare_reports(
            args.reports, args.out, benchmark_dir=args.benchmark, changed=args.changed
        )
    except (ReportError, FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"comparison: {paths['html']} ({paths['markdown']})")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "extract": extract,
    "train": train,
    "index": index,
    "merge": merge,
    "search": search,
    "learn": learn,
    "whiten": whiten,
    "reindex": reindex,
    "rollback": rollback,
    "submit": submit,
    "evaluate": evaluate,
    "demo": demo,
    "datasets": datasets,
    "compare": compare,
}
