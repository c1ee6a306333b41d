"""faiss indexes to and from any URI (faiss's own I/O only knows local files).

faiss serializes indexes in its own binary format, not pickle, so reading one runs no code.
Large indexes are written with faiss's file writer (to the target on a local disk, else to a
local temporary file that is then uploaded), never through an in-memory byte copy: a second copy
of a multi-gigabyte index would double the merge's peak memory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

import faiss
import numpy as np

from retrieval import checksums, storage


def index_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def write_index(uri: str, index: faiss.Index) -> bytes:
    """Write a small ``index`` to ``uri``; returns the bytes written (for checksums)."""
    data = index_bytes(index)
    storage.write_bytes(uri, data)
    return data


def write_index_file(uri: str, index: faiss.Index) -> dict[str, int | str]:
    """Write ``index`` through faiss's file writer; returns its sha256 and size in bytes."""
    path = storage.filesystem(uri)[1]
    if storage.is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, path)
        except BaseException:  # a full disk must not keep a partial index beside the real one
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return {"sha256": storage.sha256_file(uri), "bytes": os.path.getsize(path)}
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, "index")
        faiss.write_index(index, local)
        entry = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
        storage.upload(local, uri)
        return entry


def read_index(uri: str, *, expect_sha256: str | None = None) -> faiss.Index:
    if storage.is_local(uri):
        path = storage.filesystem(uri)[1]
        if expect_sha256 is not None and storage.sha256_file(uri) != expect_sha256:
            raise checksums.mismatch(uri, checksums.REBUILD_INDEX)
        return faiss.read_index(path)
    data = storage.read_bytes(uri)
    if expect_sha256 is not None and storage.sha256_bytes(data) != expect_sha256:
        raise checksums.mismatch(uri, checksums.REBUILD_INDEX)
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
