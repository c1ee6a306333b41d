"""What ends a command with one line on stderr and exit status 2 instead of a traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


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


def user_errors() -> tuple[type[BaseException], ...]:
    from retrieval.checksums import ChecksumMismatchError
    from retrieval.leases import LeaseError
    from retrieval.plan import PlanError

    # A damaged file is no bug: the line names it and the command that writes it again. A
    # place another run writes to: the line names that run.
    return (*USER_ERRORS, PlanError, ChecksumMismatchError, LeaseError, CommandError)
