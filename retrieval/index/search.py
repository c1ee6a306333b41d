"""Searching a merged index and turning faiss ids back into image ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from retrieval import storage
from retrieval.index.faiss_io import read_index
from retrieval.index.merge import IDMAP_FILE, INDEX_FILE, INDEX_KIND, INDEX_MANIFEST
from retrieval.manifests import ManifestError, read_manifest
from retrieval.rerank.query_expansion import QueryExpansion, alpha_query_expansion

DEFAULT_NPROBE = 32
NO_EXPANSION = QueryExpansion(n=0)


@dataclass
class SearchableIndex:
    """A merged index with its id map and manifest, ready for queries."""

    index: faiss.Index
    ids: np.ndarray  # image id per faiss id (faiss ids are 0..n-1 positions)
    uris: np.ndarray
    manifest: dict[str, Any]
    _direct_map: bool = False

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query on IVF indexes (no effect on exact or flat-PQ indexes)."""
        if "IVF" in self.manifest.get("factory", ""):
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, faiss ids) per query; ids are -1 where fewer than k were found."""
        k = min(k, self.index.ntotal)
        scores, found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, found

    def check_query_model(self, query_manifests: list[dict[str, Any]]) -> None:
        """Refuse query descriptors made by another model than the indexed ones.

        Descriptors of different models (or configs, or weights) live in unrelated spaces;
        searching across them returns confident nonsense, so it is an error, not a warning.
        """
        indexed = self.manifest["model"]
        for manifest in query_manifests:
            model = manifest["model"]
            for key in ("config_hash", "weights_sha256"):
                if model[key] != indexed[key]:
                    raise ManifestError(
                        f"query shard {manifest['shard']} was made by {model['id']} "
                        f"({key} {model[key][:12]}), the index by {indexed['id']} "
                        f"({indexed[key][:12]}): extract the queries with the index's settings"
                    )

    def reconstruct(self, found: np.ndarray) -> np.ndarray:
        """Stored vectors (decoded codes for PQ) of an (nq, n) id array; zeros for -1."""
        if "IVF" in self.manifest.get("factory", "") and not self._direct_map:
            faiss.extract_index_ivf(self.index).make_direct_map()  # id -> code, for reconstruct
            self._direct_map = True
        keys = found.reshape(-1)
        vectors = self.index.reconstruct_batch(np.where(keys >= 0, keys, 0).astype(np.int64))
        vectors[keys < 0] = 0.0
        return vectors.reshape(*found.shape, self.index.d)

    def search_expanded(
        self,
        queries: np.ndarray,
        k: int,
        expansion: QueryExpansion,
        query_ids: list[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search, expand each query with its top ``expansion.n`` neighbours (αQE), search again.

        A neighbour with the query's own image id (a query that is also in the database) is
        skipped: it would only count the query twice.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if expansion.n == 0:
            return self.search(queries, k)
        scores, found = self.search(queries, expansion.n + 1)
        keep = found >= 0
        if query_ids is not None:
            keep &= self.ids[found.clip(0)] != np.asarray(query_ids, dtype=object)[:, None]
        # The first n kept neighbours of each row (a stable sort moves dropped ones last).
        order = np.argsort(~keep, axis=1, kind="stable")[:, : expansion.n]
        chosen = np.where(
            np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1
        )
        similarities = np.where(chosen >= 0, np.take_along_axis(scores, order, 1), 0.0)
        expanded = alpha_query_expansion(
            queries, self.reconstruct(chosen), similarities, expansion.alpha
        )
        return self.search(expanded, k)

    def results_table(
        self,
        query_ids: list[str],
        queries: np.ndarray,
        k: int,
        expansion: QueryExpansion = NO_EXPANSION,
    ) -> pa.Table:
        """Top-``k`` results per query as a table (query_id, rank, id, uri, score)."""
        scores, found = self.search_expanded(queries, k, expansion, query_ids)
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
    """The merged index in ``directory``, checked against ``index.json`` (version, checksums)."""
    uri = storage.join(directory, INDEX_MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{directory}: no {INDEX_MANIFEST} (not a merged index folder; "
            "build one with `retrieval merge`)"
        )
    manifest = read_manifest(uri, kind=INDEX_KIND)
    index = read_index(storage.join(directory, INDEX_FILE), expect_sha256=manifest["sha256"])
    idmap = storage.read_parquet(
        storage.join(directory, IDMAP_FILE), schema="idmap", expect_sha256=manifest["idmap_sha256"]
    )
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
