"""Flag groups that several commands share (runner, extraction, index, re-ranking, learning),
made from the setting declarations (``pipelines/settings.py``: name, type, help, default), and
how parsed flags become a run configuration. Every flag defaults to None so that ``--config
FILE`` values show through where a flag is not given (``config_from_args``)."""

from __future__ import annotations

import argparse
from typing import Any

from pipelines import settings


def _defaults() -> Any:
    from pipelines.config import RunConfig

    return RunConfig()


def runner_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runner")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file of settings (flags given here override it)",
    )
    settings.add_flags(group, ["runner", "lease"], _defaults())


def lease_options(parser: argparse.ArgumentParser) -> None:
    """--lease-wait alone, for commands without runner settings (rollback)."""
    settings.add_flags(parser, ["lease"], _defaults())


def extract_options(parser: argparse.ArgumentParser) -> None:
    settings.add_flags(parser, ["descriptor"], _defaults(), "descriptor")


def expansion_options(group: argparse._ActionsContainer) -> None:
    settings.add_flags(group, ["expansion"], _defaults())


def rerank_options(group: argparse._ActionsContainer) -> None:
    settings.add_flags(group, ["rerank"], _defaults())


def learn_options(group: argparse._ActionsContainer) -> None:
    settings.add_flags(group, ["learn"], _defaults())


def job_options(group: argparse._ActionsContainer) -> None:
    """Settings that turn stages of the default job off (``--no-learn``) or say when they run
    (``--local-at``)."""
    settings.add_flags(group, ["job"], _defaults())


def index_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index")
    settings.add_flags(group, ["index", "expansion"], _defaults())


def group_options(parser: argparse._ActionsContainer) -> None:
    settings.add_flags(parser, ["groups"], _defaults())


def merge_options(parser: argparse._ActionsContainer) -> None:
    settings.add_flags(parser, ["merge"], _defaults())


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
