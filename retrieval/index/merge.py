r"""Merging index groups: a tree of bounded fan-in, into one index or N pieces, in RAM or on disk.

    groups (codes)  g0  g1  g2  g3  g4  g5  g6  g7        retrieval index
                     \  /    \  /    \  /    \  /
    round 1          node    node    node    node         codes only, under rounds/
                        \    /          \    /
    round 2             piece 0         piece 1           codebook + codes: a searchable index

Every merge task is a plain function over a :class:`MergeTask` (which inputs, where to write), so
the tasks of one round can run on any workers (Beam, Spark, a loop) and rounds run one after
another. Inputs hold disjoint global ids, so merging appends codes with no id shift, and the
result is the index a single process would have built adding every vector in id order.

Memory: a task holds no inverted list. It copies its inputs' IVF codes file to file, list by
list (``codes.write_merged_lists``: the merged lists, a searchable index, or an on-disk index's
``.ivfdata``, byte-identical to what faiss's ``merge_from`` / ``merge_ondisk`` write), and
streams the id maps row group by row group into one Parquet file (never a whole id map:
millions of id and URI strings outweigh the codes). Measured peak growth: 0.3 MB per MB of
index, on top of a fixed ~70 MB (README, "Index at scale"). With ``on_disk`` the final task
writes an on-disk IVF index (the inverted lists in ``<piece>.ivfdata``, memory-mapped at search
time, as ``faiss.contrib.ondisk`` lays them out) for larger-than-RAM indexes.

Pieces split the groups into N contiguous id ranges; searching queries every piece and merges
the top-k (``search.py``), which gives the same results as one index.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from retrieval import checksums, plan, storage
from retrieval import shard_manifests as manifests
from retrieval.index import codes as codes_io
from retrieval.index.codebook import load_codebook
from retrieval.index.faiss_io import write_index_file
from retrieval.index.group_index import IDMAP_ROW_GROUP_ROWS, codes_uri, idmap_uri
from retrieval.index.group_index import KIND as GROUP_KIND
from retrieval.manifests import require_same, write_manifest
from retrieval.summary import write_summary

INDEX_FILE = "index.faissindex"
IDMAP_FILE = "idmap.parquet"
INDEX_MANIFEST = "index.json"
INDEX_KIND = "merged_index"
ROUNDS_DIR = "rounds"
NODE_KIND = "merge_node"
PIECE_KIND = "index_piece"
DEFAULT_FAN_IN = 8


@dataclass(frozen=True)
class CodesNode:
    """Committed codes + id map that a merge task reads: a group, or an earlier round's output."""

    directory: str
    node_id: str


@dataclass(frozen=True)
class MergeTask:
    """Merge ``inputs`` (in id order) into ``node_id`` under ``directory``.

    A final task (``piece`` set) writes a searchable index; the others write codes only.
    """

    node_id: str
    round: int
    inputs: tuple[CodesNode, ...]
    directory: str
    codebook: str
    piece: int | None = None
    on_disk: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeTask:
        """The inverse of ``dataclasses.asdict`` (tasks travel to workers as JSON)."""
        return cls(**{**d, "inputs": tuple(CodesNode(**n) for n in d["inputs"])})

    @property
    def final(self) -> bool:
        return self.piece is not None


def piece_name(piece: int, pieces: int) -> str:
    return "index" if pieces == 1 else f"index-{piece:05d}-of-{pieces:05d}"


def read_groups(shards: str) -> list[dict[str, Any]]:
    """The committed group manifests of the index folder's plan, in id order."""
    groups = plan.committed_manifests(shards, kind=GROUP_KIND)
    if not groups:
        raise FileNotFoundError(f"no index groups in the plan of {shards}")
    for g in groups[1:]:
        require_same(
            g,
            groups[0],
            ("codebook_id",),
            what=f"{shards}: index groups {groups[0]['shard']} and {g['shard']} were built "
            "with different codebooks",
        )
    return groups


def plan_merge(
    shards: str,
    output: str,
    *,
    fan_in: int = DEFAULT_FAN_IN,
    pieces: int = 1,
    on_disk: bool = False,
) -> list[list[MergeTask]]:
    """The merge tasks, round by round: every task of a round depends only on earlier rounds."""
    if fan_in < 2:
        raise ValueError("fan_in must be at least 2")
    groups = read_groups(shards)
    if not 1 <= pieces <= len(groups):
        raise ValueError(
            f"cannot split {len(groups)} index groups into {pieces} pieces "
            "(a smaller --group-size makes more groups)"
        )
    if on_disk and groups[0]["codes_format"] != codes_io.INVLISTS:
        raise ValueError("an on-disk index needs an IVF index type")
    codebook = groups[0]["codebook"]
    rounds_dir = storage.join(output, ROUNDS_DIR)
    rounds: dict[int, list[MergeTask]] = {}
    for p, members in enumerate(np.array_split(np.arange(len(groups)), pieces)):
        level = [CodesNode(shards, groups[i]["shard"]) for i in members]
        r = 1
        while len(level) > fan_in:
            nodes = []
            for j in range(0, len(level), fan_in):
                task = MergeTask(
                    f"p{p:05d}-r{r}-{j // fan_in:05d}",
                    r,
                    tuple(level[j : j + fan_in]),
                    rounds_dir,
                    codebook,
                )
                rounds.setdefault(r, []).append(task)
                nodes.append(CodesNode(rounds_dir, task.node_id))
            level, r = nodes, r + 1
        final = MergeTask(
            piece_name(p, pieces), r, tuple(level), output, codebook, piece=p, on_disk=on_disk
        )
        rounds.setdefault(r, []).append(final)
    return [rounds[r] for r in sorted(rounds)]


def _output_idmap_uri(task: MergeTask) -> str:
    # A single index keeps the plain names: index.faissindex + idmap.parquet.
    if task.final and task.node_id == piece_name(0, 1):
        return storage.join(task.directory, IDMAP_FILE)
    return idmap_uri(task.directory, task.node_id)


def _read_input(node: CodesNode, scratch: str) -> tuple[dict[str, Any], str]:
    """The input's manifest and a local path of its codes, checked against the manifest (a
    local file is read in place; a remote one is copied to ``scratch`` once)."""
    manifest = manifests.read(node.directory, node.node_id)
    if manifest is None:
        raise FileNotFoundError(f"{node.directory}: {node.node_id} is not committed")
    uri = codes_uri(node.directory, node.node_id)
    local = storage.local_copy(uri, scratch)
    if storage.sha256_file(local) != manifest["files"]["codes"]["sha256"]:
        raise checksums.mismatch(uri, checksums.REBUILD_INDEX)
    return manifest, local


def _drop_copy(node: CodesNode, local: str) -> None:
    if local != storage.filesystem(codes_uri(node.directory, node.node_id))[1]:
        os.remove(local)


class _IdmapMerger:
    """Concatenates the inputs' id maps into one Parquet file, one input row group at a time.

    Never holds a whole id map (millions of id and URI strings weigh more than the codes): each
    row group is checked (contiguous global ids; image ids unique) and written through a
    Parquet writer before the next is read. Ids come in plan order, which is id order for every
    listing ``retrieval extract`` makes, so uniqueness is checked between neighbours in constant
    memory; ids out of order are checked afterwards with an external sort of the written file.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self.rows = 0
        self.first_id: int | None = None
        self._writer = pq.ParquetWriter(path, schemas.arrow_schema("idmap"), compression="zstd")
        self._last_id: str | None = None
        self._in_order = True
        self._repeated: list[str] = []
        self._repeats = 0

    def add_input(self, node: CodesNode, manifest: dict[str, Any], scratch: str) -> None:
        uri = idmap_uri(node.directory, node.node_id)
        local = storage.local_copy(uri, scratch)  # a local file is read in place
        if storage.sha256_file(local) != manifest["files"]["idmap"]["sha256"]:
            raise checksums.mismatch(uri, checksums.REBUILD_INDEX)
        parquet = pq.ParquetFile(local, pre_buffer=False)
        schemas.check_schema("idmap", parquet.schema_arrow, source=uri)
        for group in range(parquet.metadata.num_row_groups):
            self._add(parquet.read_row_group(group, use_threads=False))
            # Arrow's allocator (mimalloc) keeps freed row group buffers: measured on 1M ids,
            # ~35 MB more at the merge's peak (6 MB ever live in Arrow) unless handed back.
            pa.default_memory_pool().release_unused()
        if local != storage.filesystem(uri)[1]:
            os.remove(local)

    def _add(self, table: pa.Table) -> None:
        n = table.num_rows
        if not n:
            return
        index_ids = table.column("index_id").to_numpy()
        start = int(index_ids[0]) if self.first_id is None else self.first_id + self.rows
        if not np.array_equal(index_ids, np.arange(start, start + n)):
            raise RuntimeError(f"{self.what}: inputs do not hold one contiguous id range")
        if self.first_id is None:
            self.first_id = start
        ids = table.column("id").combine_chunks()
        if self._last_id is not None:
            ids_before = pa.concat_arrays([pa.array([self._last_id], pa.string()), ids])
        else:
            ids_before = ids
        if len(ids_before) > 1:
            left, right = ids_before.slice(0, len(ids_before) - 1), ids_before.slice(1)
            same = pc.equal(left, right)
            if pc.any(same).as_py():
                self._repeats += pc.sum(same).as_py()
                self._repeated += right.filter(same).to_pylist()[: 5 - len(self._repeated)]
            if not pc.all(pc.less_equal(left, right)).as_py():
                self._in_order = False
        self._last_id = ids[-1].as_py()
        self._writer.write_table(table, row_group_size=IDMAP_ROW_GROUP_ROWS)
        self.rows += n

    def close(self) -> None:
        self._writer.close()
        if not self._in_order:
            self._count_repeats_sorted()
        if self._repeats:
            raise plan.PlanError(
                f"{self.what}: {self._repeats} image id(s) occur more than once "
                f"({', '.join(map(repr, self._repeated))}): every id must be unique across an "
                "index"
            )

    def _count_repeats_sorted(self) -> None:
        """Ids out of order: count repeats between neighbours of the externally sorted ids."""
        from retrieval.external_sort import sort_refs
        from retrieval.image_refs import ImageRef

        def ids() -> Iterator[ImageRef]:
            parquet = pq.ParquetFile(self.path, pre_buffer=False)
            for group in range(parquet.metadata.num_row_groups):
                column = parquet.read_row_group(group, columns=["id"]).column("id")
                for image_id in column.to_pylist():
                    yield ImageRef(image_id, "")

        self._repeated, self._repeats, previous = [], 0, None
        for ref in sort_refs(ids(), scratch=os.path.dirname(self.path)):
            if ref.id == previous:
                self._repeats += 1
                if len(self._repeated) < 5:
                    self._repeated.append(ref.id)
            previous = ref.id


def run_merge_task(task: MergeTask, *, stream_codes: bool = True) -> dict[str, Any]:
    """Run one merge task; returns the manifest it committed.

    IVF codes are merged file to file (``codes.write_merged_lists``: no inverted list is ever
    held in memory, whatever the index size). ``stream_codes=False``, and index types whose
    inverted lists do not end the index file, fold every input into one in-memory index
    instead (the same bytes; kept as the reference the streamed merge is checked against).
    """
    index, codebook = load_codebook(task.codebook)
    streamed = (
        stream_codes
        and codes_io.ivf_of(index) is not None
        and codes_io.index_prefix(index, 0) is not None
    )
    with tempfile.TemporaryDirectory(prefix="retrieval-merge-") as scratch:
        idmap = _IdmapMerger(os.path.join(scratch, IDMAP_FILE), f"merging {task.node_id}")
        layouts: list[codes_io.ListsFile] = []
        parts: list[str] = []
        fmt = None
        try:
            for i, node in enumerate(task.inputs):
                manifest, local = _read_input(node, scratch)
                fmt = manifest["codes_format"]
                if streamed and fmt == codes_io.INVLISTS:
                    layouts.append(codes_io.read_lists_layout(local))
                elif task.on_disk:
                    part = faiss.clone_index(index)
                    codes_io.fold_codes(part, local, fmt)
                    parts.append(os.path.join(scratch, f"input-{i}.faissindex"))
                    faiss.write_index(part, parts[-1])
                    del part
                    _drop_copy(node, local)
                else:
                    codes_io.fold_codes(index, local, fmt)
                    _drop_copy(node, local)
                idmap.add_input(node, manifest, scratch)
        finally:
            idmap.close()
        rows = idmap.rows
        first_id = idmap.first_id or 0
        if layouts:
            ntotal = sum(lists.ntotal for lists in layouts)
            files = _write_streamed(task, index, layouts, scratch)
        else:
            files = _write_on_disk(task, index, parts, scratch) if task.on_disk else {}
            ntotal = int(index.ntotal)  # on disk: set by merge_ondisk
            if not task.final:
                uri = codes_uri(task.directory, task.node_id)
                files["codes"] = {
                    "name": uri.rsplit("/", 1)[-1],
                    **codes_io.write_codes_file(uri, index),
                }
            elif not task.on_disk:
                uri = storage.join(task.directory, f"{task.node_id}.faissindex")
                files["index"] = {"name": uri.rsplit("/", 1)[-1], **write_index_file(uri, index)}
        if ntotal != rows:
            raise RuntimeError(f"{task.node_id}: {ntotal} vectors but {rows} id map rows")
        for entry in ("codes", "index"):
            if entry in files and not (task.on_disk and entry == "index"):
                files[entry]["rows"] = rows
        idmap_out = _output_idmap_uri(task)
        files["idmap"] = {
            "name": idmap_out.rsplit("/", 1)[-1],
            "sha256": storage.sha256_file(idmap.path),
            "bytes": os.path.getsize(idmap.path),
            "rows": rows,
        }
        storage.upload(idmap.path, idmap_out)
    if not task.final:
        kind, extra = NODE_KIND, {"codes_format": fmt}
    else:
        kind, extra = PIECE_KIND, {"piece": task.piece, "on_disk": task.on_disk}
    return manifests.commit(
        task.directory,
        task.node_id,
        {
            "kind": kind,
            "codebook_id": codebook["codebook_id"],
            "rows": rows,
            "first_id": first_id,
            "inputs": [n.node_id for n in task.inputs],
            **extra,
            "files": files,
        },
    )


def _local_target(task: MergeTask, name: str, scratch: str) -> str:
    """Where to write an output file: beside its final place when that is a local folder (so
    placing it is a rename), else in ``scratch`` (then uploaded)."""
    if storage.is_local(task.directory):
        folder = storage.filesystem(task.directory)[1]
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    return os.path.join(scratch, name)


def _place(local: str, task: MergeTask, name: str) -> dict[str, Any]:
    """Checksum a finished output file and move it into ``task.directory`` as ``name``."""
    entry = {"name": name, "sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
    uri = storage.join(task.directory, name)
    if storage.is_local(uri):
        os.replace(local, storage.filesystem(uri)[1])
    else:
        storage.upload(local, uri)
    return entry


def _write_streamed(
    task: MergeTask,
    index: faiss.Index,
    layouts: list[codes_io.ListsFile],
    scratch: str,
) -> dict[str, Any]:
    """Write the task's output from its inputs' codes files, list by list (nothing held).

    A node: the merged inverted lists. A piece in RAM: the codebook's bytes (``ntotal`` set)
    then the merged lists, i.e. what ``faiss.write_index`` writes for the folded index. A piece
    on disk: the lists' data as ``<piece>.ivfdata`` and the index with the ``OnDiskInvertedLists``
    header that ``merge_ondisk`` gives it (which names the data file by its local path).
    """
    sizes = codes_io.merged_sizes(layouts)
    if not task.final:
        name = f"{task.node_id}.codes"
        with open(local := _local_target(task, name, scratch), "wb") as out:
            codes_io.write_merged_lists(out, layouts)
        return {"codes": _place(local, task, name)}
    name = f"{task.node_id}.faissindex"
    prefix = codes_io.index_prefix(index, int(sizes.sum()))
    if not task.on_disk:
        with open(local := _local_target(task, name, scratch), "wb") as out:
            out.write(prefix)
            codes_io.write_merged_lists(out, layouts)
        return {"index": _place(local, task, name)}
    data_name = f"{task.node_id}.ivfdata"
    with open(data_local := _local_target(task, data_name, scratch), "wb") as out:
        codes_io.write_merged_lists_data(out, layouts)
    data_path = (
        storage.filesystem(storage.join(task.directory, data_name))[1]
        if storage.is_local(task.directory)
        else os.path.join(scratch, data_name)
    )
    lists = codes_io.ondisk_lists_bytes(sizes, layouts[0].code_size, data_path)
    with open(local := _local_target(task, name, scratch), "wb") as out:
        out.write(prefix + lists)
    return {"index": _place(local, task, name), "ivfdata": _place(data_local, task, data_name)}


def _write_on_disk(
    task: MergeTask, index: faiss.Index, parts: list[str], scratch: str
) -> dict[str, Any]:
    """``faiss.contrib.ondisk.merge_ondisk`` the inputs: ``<piece>.faissindex`` + ``.ivfdata``."""
    from faiss.contrib.ondisk import merge_ondisk

    name = task.node_id
    local = storage.is_local(task.directory)
    folder = storage.filesystem(task.directory)[1] if local else scratch
    os.makedirs(folder, exist_ok=True)
    ivfdata = os.path.join(folder, f"{name}.ivfdata")
    if os.path.exists(ivfdata):
        os.remove(ivfdata)  # OnDiskInvertedLists would append to a stale file
    merge_ondisk(index, parts, ivfdata)
    codes_io.set_ntotal(index, int(faiss.extract_index_ivf(index).ntotal))
    index_path = os.path.join(scratch, f"{name}.faissindex")
    faiss.write_index(index, index_path)
    del index
    files = {}
    for key, path in (("index", index_path), ("ivfdata", ivfdata)):
        uri = storage.join(task.directory, os.path.basename(path))
        entry = {
            "name": os.path.basename(path),
            "sha256": storage.sha256_file(path),
            "bytes": os.path.getsize(path),
        }
        if path != storage.filesystem(uri)[1] or not local:
            storage.upload(path, uri)
        files[key] = entry
    return files


def finish_merge(
    shards: str, output: str, rounds: list[list[MergeTask]], timings: dict[str, float]
) -> dict[str, Any]:
    """Check the pieces, write ``index.json`` (the commit point) and the summary; drop rounds/."""
    groups = read_groups(shards)
    finals = sorted((t for r in rounds for t in r if t.final), key=lambda t: t.piece)
    pieces, next_id = [], 0
    for task in finals:
        manifest = manifests.read(output, task.node_id)
        if manifest is None or manifest.get("kind") != PIECE_KIND:
            raise RuntimeError(f"{output}: piece {task.node_id} not committed after the run")
        if manifest["rows"] and manifest["first_id"] != next_id:
            raise RuntimeError(f"{output}: piece {task.node_id} does not start at id {next_id}")
        pieces.append(
            {
                "name": task.node_id,
                **manifest["files"],
                "first_id": next_id,
                "ntotal": manifest["rows"],
            }
        )
        next_id += manifest["rows"]
    expected = sum(g["rows"] for g in groups)
    if next_id != expected:
        raise RuntimeError(f"merged pieces hold {next_id} vectors, the groups {expected}")
    codebook = load_codebook(groups[0]["codebook"])[1]
    body = {
        "codebook_id": codebook["codebook_id"],
        "codebook": groups[0]["codebook"],
        "factory": codebook["factory"],
        "metric": codebook["metric"],
        "dim": codebook["dim"],
        "model": codebook["model"],
        "ntotal": next_id,
        "groups": len(groups),
        "shards": sum(len(g["shards"]) for g in groups),
        "on_disk": any(p.get("ivfdata") for p in pieces),
        "pieces": pieces,
        "bytes": sum(p["index"]["bytes"] + p.get("ivfdata", {}).get("bytes", 0) for p in pieces),
        "schemas": {"idmap": schemas.CURRENT_VERSIONS["idmap"]},
    }
    manifest = write_manifest(storage.join(output, INDEX_MANIFEST), INDEX_KIND, body)
    storage.remove(storage.join(output, ROUNDS_DIR), recursive=True)
    write_summary(
        output,
        "merge",
        inputs=expected,
        indexed=next_id,
        failed=0,
        timings=timings,
        groups=len(groups),
        shards=body["shards"],
        rounds=len(rounds),
        pieces=len(pieces),
        bytes=manifest["bytes"],
    )
    return manifest


def merge_index_groups(
    shards: str,
    output: str,
    *,
    fan_in: int = DEFAULT_FAN_IN,
    pieces: int = 1,
    on_disk: bool = False,
    stream_codes: bool = True,
) -> dict[str, Any]:
    """Plan and run the whole merge in this process (runners run the rounds' tasks in parallel).

    ``stream_codes=False`` folds the codes in memory (see :func:`run_merge_task`)."""
    start = time.perf_counter()
    rounds = plan_merge(shards, output, fan_in=fan_in, pieces=pieces, on_disk=on_disk)
    for tasks in rounds:
        for task in tasks:
            run_merge_task(task, stream_codes=stream_codes)
    return finish_merge(shards, output, rounds, {"merge_s": time.perf_counter() - start})
