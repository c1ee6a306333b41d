"""The vectors' part of an index (codes and ids) without the codebook, and folding it back in.

An index task encodes its vectors with the trained codebook and writes only what the vectors
added: for IVF indexes the inverted lists (codes + ids per list, faiss's own ``ilar`` format); for
flat-code indexes (exact, PQ: the default only up to 20,000 vectors, where the codebook is
small) the whole index. The codebook itself (OPQ rotation, coarse centroids, PQ tables: ~2.5 MB
for the 1280-d default) is stored once, in the codebook folder, not in every task's output.

Folding codes into an index built from the same codebook appends them (ids are global, so no id
shift); the result is byte-identical to adding every vector to one index in the same order.
"""

from __future__ import annotations

import os
import tempfile

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
