"""Beam pipeline options for the two ways this project runs Beam.

Locally we use the portable FnApiRunner directly: the default DirectRunner first tries to
download the Prism runner binary, which cannot work offline and costs time. ``workers`` > 1
starts that many SDK worker processes (``multi_processing``), each running its own model copy
with ``threads`` threads (``--direct_running_mode=multi_threading`` in ``extra_args`` runs them
as threads of the launcher instead). Anything else (``--runner=DataflowRunner --project=...``)
is passed through untouched as ``extra_args``.

Secret-looking options (``--aws_secret_access_key=...``) reach Beam as given (a runner may need
them), but never a log line: Beam logs the options it does not know ("Discarding unparseable
args: [...]", then each one alone, "Unparseable argument: VALUE"), so its options logger masks
secrets, and their values are registered to be masked wherever they appear
(``retrieval.redaction``).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from retrieval.redaction import mask_option_values, redact_logger

# The logger of Beam's option parsing (its warnings about unknown options quote them).
BEAM_OPTIONS_LOGGER = "apache_beam.options.pipeline_options"
redact_logger(BEAM_OPTIONS_LOGGER)


def pipeline_options(workers: int = 1, extra_args: Sequence[str] | str = ()) -> PipelineOptions:
    if isinstance(extra_args, str):
        extra_args = shlex.split(extra_args)
    args = list(extra_args)
    mask_option_values(args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        args.append(f"--direct_num_workers={max(1, workers)}")
        # A running mode given in extra_args wins (e.g. multi_threading: no worker processes to
        # start, slower once running; see pipelines/runners/beam.py).
        if not any(a.startswith("--direct_running_mode") for a in args):
            mode = "multi_processing" if workers > 1 else "in_memory"
            args.append(f"--direct_running_mode={mode}")
    return PipelineOptions(args)


def is_local(options: PipelineOptions) -> bool:
    runner = options.get_all_options().get("runner") or ""
    return runner in ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "")
