"""Data whose bytes no longer match the checksum its manifest recorded.

Every reader checks a file against the SHA-256 its manifest recorded before it trusts the bytes.
A mismatch is not a bug and not a transient fault (reading again returns the same bytes): a
file was cut short, altered, or damaged on storage. The fix is to write it again, which only
the stage that wrote it can do, so the error names the file and that stage; the command line
prints it as one line (exit status 2) instead of a traceback.

A subclass of ``OSError`` (what readers raised before, and what callers catch), never retried:
:func:`retrieval.storage.is_transient` retries plain ``OSError`` only.
"""

from __future__ import annotations

# What to do, by what wrote the file. Shards: whichever command extracted them (a job's output
# folder, a re-index root's batches) re-extracts a shard whose files no longer match on its next
# run; a re-index version only refers to shards, so a re-index repairs them.
REEXTRACT = (
    "run the command that extracted it again (`retrieval extract` into that folder, the job, "
    "or `retrieval reindex` for a re-index root): a re-run re-extracts the shards whose files "
    "no longer match"
)
REINDEX = (
    "run `retrieval reindex` again: it re-extracts the images of shards whose files no longer match"
)
REBUILD_INDEX = "build the index again (`retrieval index` then `merge`, or `retrieval reindex`)"


class ChecksumMismatchError(OSError):
    """A file's bytes do not match its manifest's checksum (see the module doc)."""


def mismatch(uri: str, remedy: str | None = None) -> ChecksumMismatchError:
    """The error for ``uri``, with what to do about it."""
    message = f"{uri}: checksum does not match its manifest (partial or altered file)"
    return ChecksumMismatchError(f"{message}; {remedy}" if remedy else message)


def with_remedy(exc: ChecksumMismatchError, remedy: str) -> ChecksumMismatchError:
    """``exc`` with ``remedy`` added (a reader that knows which stage wrote the file)."""
    text = str(exc)
    return exc if remedy in text else ChecksumMismatchError(f"{text}; {remedy}")
