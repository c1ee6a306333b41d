"""The vectors' part of an index (codes and ids) without the codebook, and folding it back in.

An index task encodes its vectors with the trained codebook and writes only what the vectors
added: for IVF indexes the inverted lists (codes + ids per list, faiss's own ``ilar`` format); for
flat-code indexes (exact, PQ: the default only up to 20,000 vectors, where the codebook is
small) the whole index. The codebook itself (OPQ rotation, coarse centroids, PQ tables: ~2.5 MB
for the 1280-d default) is stored once, in the codebook folder, not in every task's output.

Folding codes into an index built from the same codebook appends them (ids are global, so no id
shift); the result is byte-identical to adding every vector to one index in the same order.

Merging IVF codes does not need the codes in memory at all: an ``ilar`` file is a header (the
size of every list) followed by each list's codes then ids, so the merge of several files is
their list sizes summed and, list by list, every input's codes then every input's ids, copied
file to file (:func:`write_merged_lists`). The same bytes are the data file of faiss's
``OnDiskInvertedLists`` when every list's capacity equals its size, which is how
``merge_from_multiple`` (``faiss.contrib.ondisk.merge_ondisk``) lays it out.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import faiss
import numpy as np

from retrieval import storage

INVLISTS = "invlists"
INDEX = "index"


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside ``index`` (through pre-transforms), or None for flat-code indexes."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def codes_format(index: faiss.Index) -> str:
    return INVLISTS if ivf_of(index) is not None else INDEX


def codes_bytes(index: faiss.Index) -> bytes:
    """What ``index`` holds beyond its codebook, serialized."""
    ivf = ivf_of(index)
    if ivf is None:
        return faiss.serialize_index(index).tobytes()
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(ivf.invlists, writer)
    return faiss.vector_to_array(writer.data).tobytes()


def read_invlists(uri: str) -> faiss.InvertedLists:
    """Inverted lists written by :func:`codes_bytes` (local files are read without a copy)."""
    if storage.is_local(uri):
        reader = faiss.FileIOReader(storage.filesystem(uri)[1])
    else:
        reader = faiss.VectorIOReader()
        faiss.copy_array_to_vector(np.frombuffer(storage.read_bytes(uri), np.uint8), reader.data)
    return faiss.read_InvertedLists(reader)


def set_ntotal(index: faiss.Index, ntotal: int) -> None:
    """Wrappers (pre-transforms) keep their own count; keep it equal to the IVF's."""
    index = faiss.downcast_index(index)
    while True:
        index.ntotal = ntotal
        inner = getattr(index, "index", None)
        if not isinstance(inner, faiss.Index):
            return
        index = faiss.downcast_index(inner)


def fold_codes(target: faiss.Index, uri: str, fmt: str) -> int:
    """Append the codes stored at ``uri`` to ``target`` (same codebook); returns vectors added."""
    if fmt == INVLISTS:
        ivf = ivf_of(target)
        lists = read_invlists(uri)
        if lists.nlist != ivf.nlist or lists.code_size != ivf.code_size:
            raise ValueError(f"{uri}: inverted lists do not fit this codebook")
        added = sum(lists.list_size(i) for i in range(lists.nlist))
        ivf.invlists.merge_from(lists, 0)  # ids are global: no shift
        set_ntotal(target, int(target.ntotal) + added)
        return added
    if fmt == INDEX:
        from retrieval.index.faiss_io import read_index

        other = read_index(uri)
        added = int(other.ntotal)
        target.merge_from(other, 0)
        return added
    raise ValueError(f"{uri}: unknown codes format {fmt!r}")


def write_codes_file(uri: str, index: faiss.Index) -> dict[str, int | str]:
    """Write what :func:`codes_bytes` would give through faiss's file writer (no in-memory copy
    of the codes: a merge node of millions of vectors must not hold its codes twice); returns
    the file's sha256 and size in bytes."""
    with tempfile.TemporaryDirectory(prefix="retrieval-codes-") as scratch:
        local = os.path.join(scratch, "codes")
        ivf = ivf_of(index)
        if ivf is None:
            faiss.write_index(index, local)
        else:
            faiss.write_InvertedLists(ivf.invlists, faiss.FileIOWriter(local))
        entry = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
        storage.upload(local, uri)
    return entry


def write_codes(uri: str, index: faiss.Index) -> bytes:
    data = codes_bytes(index)
    storage.write_bytes(uri, data)
    return data


# Bytes copied per read when streaming lists from file to file: bounds the merge's buffers
# whatever the size of one inverted list.
COPY_CHUNK_BYTES = 4 << 20
_ID_BYTES = 8  # faiss idx_t


@dataclass(frozen=True)
class ListsFile:
    """Where each inverted list lies in an ``ilar`` file (faiss's ``write_InvertedLists`` of an
    ``ArrayInvertedLists``): list ``i`` is ``sizes[i] * code_size`` bytes of codes at
    ``offsets[i]``, then ``sizes[i]`` 8-byte ids."""

    path: str
    nlist: int
    code_size: int
    sizes: np.ndarray
    offsets: np.ndarray

    @property
    def ntotal(self) -> int:
        return int(self.sizes.sum())


def read_lists_layout(path: str) -> ListsFile:
    """The list sizes and data offsets of a local ``ilar`` file (reads its header only)."""
    with open(path, "rb") as f:
        head = f.read(4 + 8 + 8 + 4 + 8)
        if len(head) < 32 or head[:4] != b"ilar":
            raise ValueError(f"{path}: not a faiss inverted lists file (ilar)")
        nlist, code_size = (int(v) for v in np.frombuffer(head, "<u8", 2, offset=4))
        kind, count = head[20:24], int(np.frombuffer(head, "<u8", 1, offset=24)[0])
        if kind not in (b"full", b"sprs") or count > 2 * nlist:
            raise ValueError(f"{path}: unknown inverted lists layout {kind!r}")
        table = np.frombuffer(f.read(8 * count), "<u8")
        data_start = f.tell()
        f.seek(0, io.SEEK_END)
        file_bytes = f.tell()
    if len(table) != count:
        raise ValueError(f"{path}: truncated inverted lists header")
    sizes = np.zeros(nlist, np.int64)
    if kind == b"full":
        if count != nlist:
            raise ValueError(f"{path}: {count} list sizes for {nlist} lists")
        sizes[:] = table
    else:
        lists, counts = table[0::2], table[1::2]
        if len(lists) and int(lists.max()) >= nlist:
            raise ValueError(f"{path}: list number out of range")
        sizes[lists.astype(np.int64)] = counts
    ends = data_start + np.cumsum(sizes * (code_size + _ID_BYTES))
    if (ends[-1] if nlist else data_start) != file_bytes:
        raise ValueError(f"{path}: {file_bytes} bytes, its header describes {ends[-1]}")
    offsets = np.concatenate([[data_start], ends[:-1]]).astype(np.int64)
    return ListsFile(path, nlist, code_size, sizes, offsets)


def _same_shape(inputs: Sequence[ListsFile]) -> tuple[int, int]:
    nlist, code_size = inputs[0].nlist, inputs[0].code_size
    for lists in inputs[1:]:
        if (lists.nlist, lists.code_size) != (nlist, code_size):
            raise ValueError(f"{lists.path}: inverted lists do not fit {inputs[0].path}")
    return nlist, code_size


def lists_header(sizes: np.ndarray, code_size: int) -> bytes:
    """The ``ilar`` header faiss writes for lists of these sizes (full or sparse table)."""
    nlist = len(sizes)
    head = b"ilar" + np.array([nlist, code_size], "<u8").tobytes()
    nonzero = np.flatnonzero(sizes)
    if len(nonzero) > nlist // 2:
        table = sizes.astype("<u8")
        kind = b"full"
    else:
        table = np.stack([nonzero, sizes[nonzero]], axis=1).reshape(-1).astype("<u8")
        kind = b"sprs"
    return head + kind + np.array([len(table)], "<u8").tobytes() + table.tobytes()


def _copy(src: BinaryIO, offset: int, nbytes: int, dst: BinaryIO) -> None:
    src.seek(offset)
    while nbytes:
        chunk = src.read(min(nbytes, COPY_CHUNK_BYTES))
        if not chunk:
            raise OSError(f"{src.name}: ended early")
        dst.write(chunk)
        nbytes -= len(chunk)


def write_merged_lists_data(dst: BinaryIO, inputs: Sequence[ListsFile]) -> None:
    """List by list, every input's codes then every input's ids: the data section of the merged
    ``ilar`` file, and the whole ``.ivfdata`` file of an on-disk index (no list in memory)."""
    nlist, code_size = _same_shape(inputs)
    files = [open(lists.path, "rb") for lists in inputs]  # noqa: SIM115 (closed below)
    try:
        for i in range(nlist):
            for lists, src in zip(inputs, files, strict=True):
                _copy(src, int(lists.offsets[i]), int(lists.sizes[i]) * code_size, dst)
            for lists, src in zip(inputs, files, strict=True):
                n = int(lists.sizes[i])
                _copy(src, int(lists.offsets[i]) + n * code_size, n * _ID_BYTES, dst)
    finally:
        for f in files:
            f.close()


def merged_sizes(inputs: Sequence[ListsFile]) -> np.ndarray:
    _same_shape(inputs)
    return np.sum([lists.sizes for lists in inputs], axis=0).astype(np.int64)


def write_merged_lists(dst: BinaryIO, inputs: Sequence[ListsFile]) -> int:
    """The ``ilar`` file of ``inputs`` merged in order (what ``merge_from`` of each into one
    ``ArrayInvertedLists`` then ``write_InvertedLists`` writes); returns the vectors written."""
    sizes = merged_sizes(inputs)
    dst.write(lists_header(sizes, inputs[0].code_size))
    write_merged_lists_data(dst, inputs)
    return int(sizes.sum())


def ondisk_lists_bytes(sizes: np.ndarray, code_size: int, ivfdata: str) -> bytes:
    """What faiss writes for the ``OnDiskInvertedLists`` that ``merge_from_multiple`` makes of
    lists of these sizes in the data file ``ivfdata`` (``ilod``: each list's size, capacity and
    byte offset, the free slots, the file name, the total size)."""
    nlist = len(sizes)
    region = sizes.astype(np.int64) * (code_size + _ID_BYTES)
    offsets = np.concatenate([[0], np.cumsum(region)[:-1]]) if nlist else region
    total = int(region.sum())
    lists = np.stack([sizes, sizes, offsets], axis=1).astype("<u8") if nlist else region
    slots = np.array([[0, total]] if total else np.zeros((0, 2)), "<u8")
    name = ivfdata.encode()

    def vector(data: bytes, count: int) -> bytes:
        return np.array([count], "<u8").tobytes() + data

    return (
        b"ilod"
        + np.array([nlist, code_size], "<u8").tobytes()
        + vector(lists.astype("<u8").tobytes(), nlist)
        + vector(slots.tobytes(), len(slots))
        + vector(name, len(name))
        + np.array([total], "<u8").tobytes()
    )


def index_prefix(codebook_index: faiss.Index, ntotal: int) -> bytes | None:
    """The bytes faiss writes for ``codebook_index`` holding ``ntotal`` vectors, up to its
    inverted lists (which are the end of the file); None for an index type where they are not
    (then the caller folds the codes into memory instead)."""
    ivf = ivf_of(codebook_index)
    if ivf is None or ivf.invlists.compute_ntotal() != 0:
        return None
    empty = faiss.VectorIOWriter()
    faiss.write_InvertedLists(ivf.invlists, empty)
    suffix = faiss.vector_to_array(empty.data).tobytes()
    before = int(codebook_index.ntotal)
    set_ntotal(codebook_index, ntotal)
    try:
        whole = faiss.serialize_index(codebook_index).tobytes()
    finally:
        set_ntotal(codebook_index, before)
    if not whole.endswith(suffix):
        return None
    return whole[: len(whole) - len(suffix)]
