"""The ``retrieval`` command line. Run ``retrieval --help`` or ``retrieval <command> --help``.

parser.py    the sub-commands and their flags (``--help`` is the documentation)
options.py   flag groups several commands share; flags + --config -> run configuration
commands.py  what each command does with its flags (calls ``pipelines.stages`` & co.)
demo.py      where the demo and the tests find a benchmark
errors.py    what ends in one line and exit status 2 instead of a traceback
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipelines.cli.commands import COMMANDS
from pipelines.cli.demo import benchmarks_dir
from pipelines.cli.errors import CommandError, user_errors
from pipelines.cli.options import attach_beam_args
from pipelines.cli.parser import build_parser

__all__ = ["CommandError", "benchmarks_dir", "build_parser", "main"]


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # Local Beam workers forward their start-up notices as warnings; errors still show.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.ERROR
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_beam_args(sys.argv[1:] if argv is None else argv))
    _configure_logging(bool(args.verbose))
    try:
        return COMMANDS[args.command](args)
    except user_errors() as exc:
        from retrieval.redaction import redact

        if args.verbose:
            import traceback

            traceback.print_exc()
        message = redact(str(exc) or type(exc).__name__)
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        print(f"retrieval: error: {message}{hint}", file=sys.stderr)
        return 2
