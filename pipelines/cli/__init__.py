"""The ``retrieval`` command line. Run ``retrieval --help`` or ``retrieval <command> --help``.

parser.py    the sub-commands and their flags (``--help`` is the documentation)
options.py   flag groups several commands share; flags + --config -> run configuration
commands.py  what each command does with its flags (calls ``pipelines.stages`` & co.)
demo.py      where the demo and the tests find a benchmark
errors.py    what ends in one line and exit status 2 instead of a traceback
"""

from __future__ import annotations

import builtins
import logging
import os
import sys
import types
import warnings

from pipelines.cli.commands import COMMANDS
from pipelines.cli.demo import benchmarks_dir
from pipelines.cli.errors import CommandError, as_refused, user_errors
from pipelines.cli.options import attach_beam_args
from pipelines.cli.parser import build_parser

__all__ = ["CommandError", "benchmarks_dir", "build_parser", "main"]

# Third-party warnings a run cannot act on, hidden unless --verbose (Python's -W syntax; passed on
# to worker processes through PYTHONWARNINGS): tensorflow_hub imports pkg_resources, and the LiteRT
# converter asks for statistics of the inputs, which stay float.
QUIET_WARNINGS = (
    "ignore:pkg_resources is deprecated as an API:UserWarning:tensorflow_hub",
    "ignore:Statistics for quantized inputs were expected:UserWarning:"
    "tensorflow.lite.python.convert",
)


def _quiet_native_logs(verbose: bool) -> None:
    """Unless --verbose, TensorFlow's C++ log shows fatal errors only (TF_CPP_MIN_LOG_LEVEL=3:
    no "failed call to cuInit", no oneDNN or CPU-instruction notices, and through
    retrieval/native_logs.py none of the lines it logs while loading) and known third-party
    warnings are off. Set before TensorFlow is imported (it is imported lazily, by the commands)
    and inherited by the runners' worker processes. A value the user exported wins."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for entry in QUIET_WARNINGS:
        action, message, category, module = entry.split(":")
        warnings.filterwarnings(action, message, getattr(builtins, category), module)
    # Later entries win: the user's own PYTHONWARNINGS stays after ours.
    given = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    os.environ["PYTHONWARNINGS"] = ",".join(
        [*(e for e in QUIET_WARNINGS if e not in given), *given]
    )


def _configure_logging(verbose: bool) -> None:
    from retrieval.redaction import redact_handlers

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_handlers()  # no log line carries a secret, whichever library logs it
    if not verbose:
        # Local Beam workers forward their start-up notices as warnings; errors still show.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.ERROR
        )
        # TensorFlow's Python side logs its deprecation advice through absl's logger (e.g. the
        # converter's "Please consider providing the trackable_obj argument"). A handler filter,
        # not a level on logging.getLogger("absl"): absl must create that logger itself.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_no_absl_notices)


def _no_absl_notices(record: logging.LogRecord) -> bool:
    return record.name != "absl" or record.levelno >= logging.ERROR


def _redacting_excepthook(
    kind: type[BaseException], value: BaseException, traceback: types.TracebackType | None
) -> None:
    """A traceback that ends the process, with its secrets masked (a URI in an exception's
    message, a signed URL in a frame's line)."""
    import traceback as tb

    from retrieval.redaction import redact

    sys.stderr.write(redact("".join(tb.format_exception(kind, value, traceback))))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_beam_args(sys.argv[1:] if argv is None else argv))
    _quiet_native_logs(bool(args.verbose))
    _configure_logging(bool(args.verbose))
    if sys.excepthook is sys.__excepthook__:  # a bug's traceback, printed on the way out
        sys.excepthook = _redacting_excepthook
    try:
        try:
            return COMMANDS[args.command](args)
        except OSError as exc:
            refused = as_refused(exc)
            if refused is exc:
                raise
            raise refused from exc
    except user_errors() as exc:
        from retrieval.redaction import redact

        if args.verbose:
            import traceback

            sys.stderr.write(redact(traceback.format_exc()))
        message = redact(str(exc) or type(exc).__name__)
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        print(f"retrieval: error: {message}{hint}", file=sys.stderr)
        return 2
