"""Searching a merged index and turning faiss ids back into image ids."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from retrieval import storage
from retrieval.index.faiss_io import read_index
from retrieval.index.merge import IDMAP_FILE, INDEX_FILE, INDEX_MANIFEST

DEFAULT_NPROBE = 32


@dataclass
class SearchableIndex:
    """A merged index with its id map and manifest, ready for queries."""

    index: faiss.Index
    ids: np.ndarray  # image id per faiss id (faiss ids are 0..n-1 positions)
    uris: np.ndarray
    manifest: dict[str, Any]

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query on IVF indexes (no effect on exact or flat-PQ indexes)."""
        if "IVF" in self.manifest.get("factory", ""):
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, faiss ids) per query; ids are -1 where fewer than k were found."""
        k = min(k, self.index.ntotal)
        scores, found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, found

    def results_table(self, query_ids: list[str], queries: np.ndarray, k: int) -> pa.Table:
        """Top-``k`` results per query as a table (query_id, rank, id, uri, score)."""
        scores, found = self.search(queries, k)
        valid = found >= 0
        rows, ranks = np.nonzero(valid)
        hits = found[valid]
        return pa.table(
            {
                "query_id": pa.array(np.asarray(query_ids, dtype=object)[rows], pa.string()),
                "rank": pa.array(ranks, pa.int32()),
                "id": pa.array(self.ids[hits], pa.string()),
                "uri": pa.array(self.uris[hits], pa.string()),
                "score": pa.array(scores[valid], pa.float32()),
            }
        )

    def ranked_ids(self, found: np.ndarray) -> list[list[str]]:
        """Image ids for a (nq, k) array of faiss ids, dropping the -1 padding."""
        return [[str(self.ids[i]) for i in row if i >= 0] for row in found]


def load_index(directory: str, *, nprobe: int = DEFAULT_NPROBE) -> SearchableIndex:
    manifest = storage.read_json(storage.join(directory, INDEX_MANIFEST))
    index = read_index(storage.join(directory, INDEX_FILE), expect_sha256=manifest["sha256"])
    idmap = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(directory, IDMAP_FILE))))
    schemas.check_schema("idmap", idmap.schema, source=storage.join(directory, IDMAP_FILE))
    index_ids = idmap.column("index_id").to_numpy()
    if not np.array_equal(index_ids, np.arange(len(index_ids))):
        raise ValueError(f"{directory}: id map is not the dense range 0..{len(index_ids) - 1}")
    searchable = SearchableIndex(
        index,
        np.asarray(idmap.column("id").to_pylist(), dtype=object),
        np.asarray(idmap.column("uri").to_pylist(), dtype=object),
        manifest,
    )
    searchable.set_nprobe(nprobe)
    return searchable
