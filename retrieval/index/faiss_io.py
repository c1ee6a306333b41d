"""faiss indexes to and from any URI (faiss's own I/O only knows local files).

faiss serializes indexes in its own binary format, not pickle, so reading one runs no code.
"""

from __future__ import annotations

import faiss
import numpy as np

from retrieval import storage


def index_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def write_index(uri: str, index: faiss.Index) -> bytes:
    """Write ``index`` to ``uri``; returns the bytes written (for checksums)."""
    data = index_bytes(index)
    storage.write_bytes(uri, data)
    return data


def read_index(uri: str, *, expect_sha256: str | None = None) -> faiss.Index:
    data = storage.read_bytes(uri)
    if expect_sha256 is not None and storage.sha256_bytes(data) != expect_sha256:
        raise OSError(f"{uri}: checksum does not match its manifest")
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
