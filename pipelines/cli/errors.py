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
    from retrieval.storage import StorageRefusedError

    # A full disk or quota, a read-only folder: not the user's typing, but what ends the run is
    # the same, one line naming the URI and exit status 2 (the scheduler must not retry blindly
    # either: a person frees space, then re-runs, which keeps what was committed). A damaged
    # file is no bug: the line names it and the command that writes it again. A place another
    # run writes to: the line names that run.
    return (
        *USER_ERRORS,
        PlanError,
        StorageRefusedError,
        ChecksumMismatchError,
        LeaseError,
        CommandError,
    )


def as_refused(exc: OSError) -> OSError:
    """An OS error that ends the run (disk full, quota, read-only, ...) raised outside
    ``retrieval.storage`` (a Parquet or faiss writer, a temporary folder) as the one-line
    :class:`~retrieval.storage.StorageRefusedError`; any other error unchanged."""
    from retrieval.storage import StorageRefusedError, final_reason

    if isinstance(exc, StorageRefusedError | PermissionError) or final_reason(exc) is None:
        return exc
    return StorageRefusedError(exc.filename or "(a temporary file)", exc)
