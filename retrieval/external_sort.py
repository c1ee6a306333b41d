"""Sorting a listing larger than memory: sorted runs spilled to local files, merged in batches.

A corpus listing (millions of image references) is sorted by ``(id, uri)`` before it is cut into
shards, so that the same listing always gives the same shards. Holding it as one Python list
costs ~0.5 KB per entry (687 MB of launcher memory for a 1M-entry manifest), so
:func:`sort_refs` keeps at most ``run_rows`` entries in memory, as Arrow columns: each full run
is sorted in Arrow and written to a scratch Arrow IPC file, and the runs are then merged a batch
at a time (in several passes when there are more than :data:`MERGE_FAN_IN` runs). Memory is
bounded by ``run_rows`` and :data:`MERGE_ROWS`, whatever the listing's length.

The merge works on Arrow batches, not on rows: each run holds one batch of its next rows; every
row up to the smallest of those batches' last keys can be output (no run has a smaller one left
to come), so those rows are taken from every run, sorted together in Arrow and output as one
batch. Python touches a handful of keys per batch (a binary search per run), not every row: a
row-by-row ``heapq.merge`` of Python tuples made the sort most of the 1M-entry planning time.

The order is exactly Python's ``sorted(refs, key=lambda r: (r.id, r.uri))``: Arrow compares
strings by their UTF-8 bytes, which orders them like Python's code points; ties are broken by
the input position, which every row carries (``seq``), so equal keys keep their input order
and the merge's keys are unique.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from retrieval.corpus import ImageRef

RUN_ROWS = 65_536  # entries held in memory (as Arrow columns) while a run is filled
BATCH_ROWS = 8_192  # Python objects converted to Arrow at a time
MERGE_ROWS = 65_536  # rows held across all runs while merging (each run gets its share)
MIN_READ_ROWS = 256  # rows of each run read at a time, at least
MERGE_FAN_IN = 64  # runs merged at once; more runs are merged in several passes

_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("problem", pa.string()),
        pa.field("seq", pa.int64(), nullable=False),
    ]
)
_SORT_KEYS = [("id", "ascending"), ("uri", "ascending"), ("seq", "ascending")]


def _batch(refs: list[ImageRef], first_seq: int) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([r.id for r in refs], pa.string()),
            pa.array([r.uri for r in refs], pa.string()),
            pa.array([r.problem for r in refs], pa.string()),
            pa.array(range(first_seq, first_seq + len(refs)), pa.int64()),
        ],
        schema=_SCHEMA,
    )


def _sorted(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=_SORT_KEYS))


def _write_run(path: str, batches: Iterable[pa.Table | pa.RecordBatch], chunk: int) -> str:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        for batch in batches:
            if isinstance(batch, pa.Table):
                writer.write_table(batch, max_chunksize=chunk)
            elif batch.num_rows:
                writer.write_batch(batch)
    return path


class _Run:
    """A sorted run being merged: its next batch of rows, read from its file (read, not
    memory-mapped: mapped pages would count as the process's memory)."""

    def __init__(self, path: str, read_rows: int) -> None:
        self._path = path
        self._read_rows = read_rows
        self._source = pa.OSFile(path, "rb")
        self._reader = pa.ipc.open_file(self._source)
        self._next_batch = 0
        self._pending: list[pa.RecordBatch] = []
        self.rows: pa.RecordBatch | None = None
        self._load()

    def _load(self) -> None:
        """Make ``rows`` hold up to ``read_rows`` rows (``None`` once the run is done)."""
        held = sum(len(b) for b in self._pending)
        while held < self._read_rows and self._next_batch < self._reader.num_record_batches:
            batch = self._reader.get_batch(self._next_batch)
            self._next_batch += 1
            self._pending.append(batch)
            held += len(batch)
        if not held:
            self.rows = None
            self.close()
            return
        table = pa.Table.from_batches(self._pending, schema=_SCHEMA)
        self.rows = table.slice(0, self._read_rows).combine_chunks().to_batches()[0]
        rest = table.slice(self._read_rows)
        self._pending = rest.combine_chunks().to_batches() if len(rest) else []

    def key(self, i: int) -> tuple[str, str, int]:
        rows = self.rows
        return (rows.column(0)[i].as_py(), rows.column(1)[i].as_py(), rows.column(3)[i].as_py())

    def take_up_to(self, bound: tuple[str, str, int]) -> pa.RecordBatch | None:
        """Remove and return this run's rows with keys up to ``bound`` (a prefix of the run)."""
        if self.key(0) > bound:
            return None
        lo, hi = 1, len(self.rows)  # rows[:lo] are <= bound; find the first row > bound
        while lo < hi:
            mid = (lo + hi) // 2
            if self.key(mid) <= bound:
                lo = mid + 1
            else:
                hi = mid
        taken = self.rows.slice(0, lo)
        if lo == len(self.rows):
            self._load()
        else:
            self.rows = self.rows.slice(lo)
        return taken

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
            os.remove(self._path)  # merged: its disk space is not needed any more


def _merge(paths: list[str]) -> Iterator[pa.Table]:
    """The rows of the sorted runs at ``paths``, in order, as sorted tables."""
    read_rows = max(MIN_READ_ROWS, MERGE_ROWS // max(1, len(paths)))
    runs = [_Run(p, read_rows) for p in paths]
    try:
        while True:
            live = [r for r in runs if r.rows is not None]
            if not live:
                return
            # No run has a key <= the smallest last key still to come: all such rows can go.
            bound = min(r.key(len(r.rows) - 1) for r in live)
            taken = [t for t in (r.take_up_to(bound) for r in live) if t is not None]
            yield _sorted(pa.Table.from_batches(taken, schema=_SCHEMA))
    finally:
        for run in runs:
            run.close()


def _table_refs(tables: Iterable[pa.Table]) -> Iterator[ImageRef]:
    for table in tables:
        for batch in table.to_batches(max_chunksize=BATCH_ROWS):
            columns = (batch.column(c).to_pylist() for c in range(3))
            yield from map(ImageRef, *columns)


def sort_refs(
    refs: Iterable[ImageRef], *, run_rows: int | None = None, scratch: str | None = None
) -> Iterator[ImageRef]:
    """``refs`` sorted by ``(id, uri)``, stable, in bounded memory (see the module doc).

    Spill files live in a temporary folder under ``scratch`` (default: the system's temporary
    folder), removed when the iterator is exhausted or closed.
    """
    run_rows = RUN_ROWS if run_rows is None else run_rows
    if run_rows < 1:
        raise ValueError("run_rows must be at least 1")
    chunk = max(MIN_READ_ROWS, MERGE_ROWS // MERGE_FAN_IN)  # batch size of the run files
    with tempfile.TemporaryDirectory(prefix="retrieval-sort-", dir=scratch) as folder:
        runs: list[str] = []
        batches: list[pa.RecordBatch] = []
        buffer: list[ImageRef] = []
        held = seq = 0
        for ref in refs:
            buffer.append(ref)
            if len(buffer) == BATCH_ROWS:
                batches.append(_batch(buffer, seq))
                held, seq, buffer = held + len(buffer), seq + len(buffer), []
            if held + len(buffer) >= run_rows:
                batches.append(_batch(buffer, seq))
                seq, buffer = seq + len(buffer), []
                path = os.path.join(folder, f"run-{len(runs):06d}.arrow")
                runs.append(_write_run(path, [_sorted(pa.Table.from_batches(batches))], chunk))
                batches, held = [], 0
        if buffer:
            batches.append(_batch(buffer, seq))
        del buffer
        last = _sorted(pa.Table.from_batches(batches, schema=_SCHEMA)) if batches else None
        del batches
        if not runs:  # it all fitted in one run: no disk needed
            yield from _table_refs([last] if last is not None else [])
            return
        if last is not None:
            path = os.path.join(folder, f"run-{len(runs):06d}.arrow")
            runs.append(_write_run(path, [last], chunk))
        del last
        passes = 0
        while len(runs) > MERGE_FAN_IN:
            passes += 1
            merged = []
            for j in range(0, len(runs), MERGE_FAN_IN):
                path = os.path.join(folder, f"pass-{passes}-{j // MERGE_FAN_IN:06d}.arrow")
                merged.append(_write_run(path, _merge(runs[j : j + MERGE_FAN_IN]), chunk))
            runs = merged
        yield from _table_refs(_merge(runs))
