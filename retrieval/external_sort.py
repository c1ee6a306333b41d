"""Sorting a listing larger than memory: sorted runs spilled to local files, merged lazily.

A corpus listing (millions of image references) is sorted by ``(id, uri)`` before it is cut into
shards, so that the same listing always gives the same shards. Holding it as one Python list
costs ~0.5 KB per entry (687 MB of launcher memory for a 1M-entry manifest), so
:func:`sort_refs` keeps at most ``run_rows`` entries in memory, as Arrow columns: each full run
is sorted in Arrow and written to a scratch Arrow IPC file, and the runs are then merged with
:func:`heapq.merge`, reading one small batch of each at a time (in several passes when there
are more than :data:`MERGE_FAN_IN` runs). Memory is bounded by ``run_rows`` and the fan-in,
whatever the listing's length.

The order is exactly Python's ``sorted(refs, key=lambda r: (r.id, r.uri))``: Arrow compares
strings by their UTF-8 bytes, which orders them like Python's code points; both sorts are
stable, and runs are merged in input order, so equal keys keep their input order.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from retrieval.image_refs import ImageRef

RUN_ROWS = 16_384  # entries held in memory (as Arrow columns) while a run is filled
BATCH_ROWS = 8_192  # Python objects converted to Arrow at a time
READ_ROWS = 256  # rows of each run read at a time while merging
MERGE_FAN_IN = 64  # runs merged at once; more runs are merged in several passes

_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("problem", pa.string()),
        # The real URI of a reference whose recorded ``uri`` is masked, sealed (only that goes
        # to the spill files: see retrieval.redaction).
        pa.field("sealed", pa.string()),
    ]
)
_COLUMNS = len(_SCHEMA)
_SORT_KEYS = [("id", "ascending"), ("uri", "ascending")]


def _batch(refs: list[ImageRef]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([r.id for r in refs], pa.string()),
            pa.array([r.uri for r in refs], pa.string()),
            pa.array([r.problem for r in refs], pa.string()),
            pa.array([r.sealed for r in refs], pa.string()),
        ],
        schema=_SCHEMA,
    )


def _sorted_run(batches: list[pa.RecordBatch]) -> pa.Table:
    table = pa.Table.from_batches(batches, schema=_SCHEMA)
    return table.take(pc.sort_indices(table, sort_keys=_SORT_KEYS))


def _write_run(path: str, rows: Iterable[tuple] | pa.Table) -> str:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        if isinstance(rows, pa.Table):
            writer.write_table(rows, max_chunksize=READ_ROWS)
        else:
            buffer: list[ImageRef] = []
            for row in rows:
                buffer.append(ImageRef(*row))
                if len(buffer) == READ_ROWS:
                    writer.write_batch(_batch(buffer))
                    buffer.clear()
            if buffer:
                writer.write_batch(_batch(buffer))
    return path


def _read_run(path: str) -> Iterator[tuple]:
    """A run's rows, one small batch in memory at a time (read, not memory-mapped: mapped pages
    would count as the process's memory)."""
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield from zip(*(batch.column(c).to_pylist() for c in range(_COLUMNS)), strict=True)
    os.remove(path)  # merged: its disk space is not needed any more


def _table_rows(table: pa.Table) -> Iterator[tuple]:
    for batch in table.to_batches(max_chunksize=READ_ROWS):
        yield from zip(*(batch.column(c).to_pylist() for c in range(_COLUMNS)), strict=True)


def _merge(runs: list[Iterator[tuple]]) -> Iterator[tuple]:
    # Ties go to the earlier run (heapq.merge is stable across its inputs): input order kept.
    return heapq.merge(*runs, key=lambda row: (row[0], row[1]))


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
    with tempfile.TemporaryDirectory(prefix="retrieval-sort-", dir=scratch) as folder:
        runs: list[str] = []
        batches: list[pa.RecordBatch] = []
        buffer: list[ImageRef] = []
        held = 0
        for ref in refs:
            buffer.append(ref)
            if len(buffer) == BATCH_ROWS:
                batches.append(_batch(buffer))
                held += len(buffer)
                buffer = []
            if held + len(buffer) >= run_rows:
                batches.append(_batch(buffer))
                buffer = []
                path = os.path.join(folder, f"run-{len(runs):06d}.arrow")
                runs.append(_write_run(path, _sorted_run(batches)))
                batches, held = [], 0
        if buffer:
            batches.append(_batch(buffer))
        del buffer
        last = _sorted_run(batches) if batches else None
        del batches
        if not runs:  # it all fitted in one run: no disk needed
            rows: Iterator[tuple] = _table_rows(last) if last is not None else iter(())
        else:
            if last is not None:
                path = os.path.join(folder, f"run-{len(runs):06d}.arrow")
                runs.append(_write_run(path, last))
            del last
            passes = 0
            while len(runs) > MERGE_FAN_IN:
                passes += 1
                merged = []
                for j in range(0, len(runs), MERGE_FAN_IN):
                    path = os.path.join(folder, f"pass-{passes}-{j // MERGE_FAN_IN:06d}.arrow")
                    group = [_read_run(p) for p in runs[j : j + MERGE_FAN_IN]]
                    merged.append(_write_run(path, _merge(group)))
                runs = merged
            rows = _merge([_read_run(p) for p in runs])
        for row in rows:
            yield ImageRef(*row)
