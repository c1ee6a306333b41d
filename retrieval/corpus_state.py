"""What a corpus holds right now, and how it differs from what was indexed.

Each image gets a content key: the object store's own version where it has one (GCS
``generation`` + size, S3 ``ETag`` + size: no bytes read), else (local disks, other stores) the
SHA-256 of the bytes, since a modification time says nothing about content. Comparing the keys
with the last indexed state sorts every image into new, changed, deleted or unchanged. Both
sides are streamed in id order (the corpus listing from the external sort, the state from its
Parquet file), so the comparison never holds either as Python objects.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import storage

STATE_FILE = "state.parquet"
STATE_ROW_GROUP_ROWS = 65_536
STATE_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("content_key", pa.string())])


# The content key of an image that could not be read to key it (it is never a real key: those
# start with the scheme of the store's version or ``sha256:``).
UNREADABLE = "unreadable:"  # for good (not a regular file, a link loop, permission): extracted,
# where it becomes an error row with its reason (and leaves the index if it was in it)
UNREADABLE_NOW = "unreadable-now:"  # transient (an outage outlasting the retries): kept as it
# was indexed if it was, else extracted (an error row the next run retries)


def content_key(uri: str, info: dict | None = None) -> str:
    """A string that changes whenever the object's content does (see module doc)."""
    fs, path = storage.filesystem(uri)
    info = info if info is not None else storage.with_retries(lambda: fs.info(path), what=uri)
    size = info.get("size")
    if info.get("generation"):
        return f"gcs-generation:{info['generation']}:{size}"
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{size}"
    return f"sha256:{storage.sha256_file(uri)}"


def content_key_or_reason(uri: str) -> str:
    """:func:`content_key`, or for an image that cannot be read a key saying so (one image,
    not the run: a FIFO, a link loop or an outage in the corpus never stops a re-index)."""
    try:
        return content_key(uri)
    except Exception as exc:
        if storage.is_transient(exc):
            return f"{UNREADABLE_NOW}{type(exc).__name__}"
        if isinstance(exc, OSError):  # not a regular file, ELOOP, permission, vanished
            return f"{UNREADABLE}{type(exc).__name__}"
        raise


@dataclass
class CorpusChanges:
    """How the corpus differs from the last indexed state. Only the changes are listed (their
    volume, not the corpus's); unchanged images are counted."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    # Indexed images that could not be read to key them this time (an outage): kept as indexed.
    kept_unreadable: list[str] = field(default_factory=list)
    uris: dict[str, str] = field(default_factory=dict)  # URI of every new and changed image
    # The sealed real URI of those whose recorded URI is masked (a signed URL: redaction).
    sealed: dict[str, str] = field(default_factory=dict)

    @property
    def to_extract(self) -> list[str]:
        return sorted(self.new + self.changed)


StateRow = tuple[str, str, str]  # id, uri (as recorded: secrets masked), content key
# The corpus now may carry a 4th item: the sealed real URI (kept for the changes, not written).


class StateWriter:
    """Writes a state table (id, uri, content key; ids ascending) row group by row group."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows = 0
        self._writer = pq.ParquetWriter(path, STATE_SCHEMA, compression="zstd")
        self._buffer: list[StateRow] = []
        self._last: str | None = None

    def add(self, row: StateRow | tuple[str, str, str, str | None]) -> None:
        if self._last is not None and row[0] <= self._last:
            raise ValueError(f"state rows out of id order: {row[0]!r} after {self._last!r}")
        self._last = row[0]
        self._buffer.append((row[0], row[1], row[2]))
        if len(self._buffer) == STATE_ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            columns = list(zip(*self._buffer, strict=True))
            self._writer.write_table(
                pa.table([pa.array(c, pa.string()) for c in columns], schema=STATE_SCHEMA)
            )
            self.rows += len(self._buffer)
            self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def iter_state_file(path: str) -> Iterator[StateRow]:
    """The rows of a local state file, in id order, one row group in memory at a time."""
    parquet = pq.ParquetFile(path, pre_buffer=False)
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group, columns=["id", "uri", "content_key"])
        yield from zip(*(table.column(c).to_pylist() for c in range(3)), strict=True)


def iter_state(directory: str, scratch: str) -> Iterator[StateRow]:
    """The indexed state of a version folder (empty if it has none), streamed in id order."""
    uri = storage.join(directory, STATE_FILE)
    if not storage.exists(uri):
        return iter(())
    return iter_state_file(storage.local_copy(uri, scratch))


def compare(
    previous: Iterable[StateRow],
    now: Iterable[StateRow | tuple[str, str, str, str | None]],
    now_state: StateWriter,
) -> CorpusChanges:
    """Sort every image into new, changed, deleted or unchanged: a merge join of two listings
    sorted by id (the last indexed state and the corpus now), in constant memory apart from the
    changes themselves. The corpus now is written to ``now_state`` on the way."""
    changes = CorpusChanges()
    old = iter(previous)
    before = next(old, None)
    for row in now:
        image_id = row[0]
        while before is not None and before[0] < image_id:
            changes.deleted.append(before[0])
            before = next(old, None)
        if before is not None and before[0] == image_id and row[2].startswith(UNREADABLE_NOW):
            # Whether it changed cannot be told now: it stays as indexed (its state row too,
            # so the next run compares with the key it was indexed under).
            now_state.add(before)
            changes.unchanged += 1
            changes.kept_unreadable.append(image_id)
            before = next(old, None)
            continue
        now_state.add(row)
        if before is not None and before[0] == image_id:
            if before[1:3] == row[1:3] and not row[2].startswith(UNREADABLE):
                changes.unchanged += 1
            else:
                changes.changed.append(image_id)
                _keep_uri(changes, row)
            before = next(old, None)
        else:
            changes.new.append(image_id)
            _keep_uri(changes, row)
    while before is not None:
        changes.deleted.append(before[0])
        before = next(old, None)
    return changes


def _keep_uri(changes: CorpusChanges, row: tuple) -> None:
    changes.uris[row[0]] = row[1]
    if len(row) > 3 and row[3]:
        changes.sealed[row[0]] = row[3]


def write_state(directory: str, now_state_path: str, *, leave_out: set[str]) -> int:
    """The new version's state: the corpus now (a state file written by :func:`compare`) less
    ``leave_out`` (images that failed), streamed; returns its row count."""
    with tempfile.TemporaryDirectory(prefix="retrieval-state-") as scratch:
        writer = StateWriter(os.path.join(scratch, STATE_FILE))
        for row in iter_state_file(now_state_path):
            if row[0] not in leave_out:
                writer.add(row)
        writer.close()
        storage.upload(writer.path, storage.join(directory, STATE_FILE))
        return writer.rows
