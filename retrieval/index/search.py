"""Searching a merged index and turning faiss ids back into image ids."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from retrieval import checksums, storage
from retrieval.index.faiss_io import read_index
from retrieval.index.merge import INDEX_KIND, INDEX_MANIFEST
from retrieval.manifests import ManifestError, check_name, read_manifest
from retrieval.rerank.query_expansion import QueryExpansion, alpha_query_expansion

DEFAULT_NPROBE = 32
NO_EXPANSION = QueryExpansion(n=0)


@dataclass
class SearchableIndex:
    """A merged index (one or more pieces over contiguous id ranges) with its id map."""

    pieces: list[faiss.Index]
    first_ids: np.ndarray  # the first global id of each piece
    ids: np.ndarray  # image id per faiss id (faiss ids are 0..n-1 positions)
    uris: np.ndarray
    manifest: dict[str, Any]
    _direct_map: bool = False

    @property
    def ntotal(self) -> int:
        return sum(int(p.ntotal) for p in self.pieces)

    @property
    def d(self) -> int:
        return int(self.pieces[0].d)

    def set_nprobe(self, nprobe: int) -> None:
        """Lists visited per query on IVF indexes (no effect on exact or flat-PQ indexes)."""
        if "IVF" in self.manifest.get("factory", ""):
            for piece in self.pieces:
                faiss.ParameterSpace().set_index_parameter(piece, "nprobe", nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, faiss ids) per query; ids are -1 where fewer than k were found.

        Pieces hold disjoint global ids under one codebook: each is searched and the per-piece
        top-k lists are merged by score, which is what one index holding everything returns.
        """
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(self.pieces) == 1:
            return self.pieces[0].search(queries, k)
        results = [piece.search(queries, k) for piece in self.pieces]
        scores = np.stack([r[0] for r in results])
        found = np.stack([r[1] for r in results])
        return faiss.merge_knn_results(scores, found, keep_max=True)

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
            for piece, first_id in zip(self.pieces, self.first_ids, strict=True):
                # id -> code, for reconstruct; an array needs ids 0..n-1, later pieces a hash
                kind = faiss.DirectMap.Array if first_id == 0 else faiss.DirectMap.Hashtable
                faiss.extract_index_ivf(piece).set_direct_map_type(kind)
            self._direct_map = True
        keys = found.reshape(-1)
        vectors = np.zeros((len(keys), self.d), dtype=np.float32)
        owner = np.searchsorted(self.first_ids, keys, side="right") - 1
        for p, piece in enumerate(self.pieces):
            mine = (keys >= 0) & (owner == p)
            if mine.any():
                vectors[mine] = piece.reconstruct_batch(keys[mine].astype(np.int64))
        return vectors.reshape(*found.shape, self.d)

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

    def ranked_ids_list(self, found: list[np.ndarray]) -> list[list[str]]:
        """Image ids for per-query faiss id arrays of any lengths (-1 padding dropped)."""
        return [[str(self.ids[i]) for i in row if i >= 0] for row in found]

    def ranked_ids(self, found: np.ndarray) -> list[list[str]]:
        """Image ids for a (nq, k) array of faiss ids, dropping the -1 padding."""
        return [[str(self.ids[i]) for i in row if i >= 0] for row in found]


def _load_piece(directory: str, piece: dict[str, Any]) -> faiss.Index:
    for key in ("index", "idmap", "ivfdata"):
        if key in piece:
            check_name(piece[key]["name"], what="index file name")
    uri = storage.join(directory, piece["index"]["name"])
    if "ivfdata" not in piece:
        return read_index(uri, expect_sha256=piece["index"]["sha256"])
    # On disk: faiss memory-maps <piece>.ivfdata found next to the index file.
    folder = (
        storage.filesystem(directory)[1]
        if storage.is_local(directory)
        else tempfile.mkdtemp(prefix="cbir-index-")
    )
    for key in ("index", "ivfdata"):
        name = piece[key]["name"]
        if not storage.is_local(directory):
            storage.local_copy(storage.join(directory, name), folder)
        if storage.sha256_file(os.path.join(folder, name)) != piece[key]["sha256"]:
            raise checksums.mismatch(f"{directory}/{name}", checksums.REBUILD_INDEX)
    return faiss.read_index(
        os.path.join(folder, piece["index"]["name"]), faiss.IO_FLAG_ONDISK_SAME_DIR
    )


def load_index(directory: str, *, nprobe: int = DEFAULT_NPROBE) -> SearchableIndex:
    """Load a merged index folder (one index, N pieces, or an on-disk IVF index)."""
    uri = storage.join(directory, INDEX_MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{directory}: no {INDEX_MANIFEST} (not a merged index folder; "
            "build one with `retrieval merge`)"
        )
    manifest = read_manifest(uri, kind=INDEX_KIND)
    entries = manifest["pieces"]
    pieces = [_load_piece(directory, entry) for entry in entries]
    try:
        idmap = pa.concat_tables(
            storage.read_parquet(
                storage.join(directory, e["idmap"]["name"]),
                schema="idmap",
                expect_sha256=e["idmap"]["sha256"],
            )
            for e in entries
        )
    except checksums.ChecksumMismatchError as exc:
        raise checksums.with_remedy(exc, checksums.REBUILD_INDEX) from None
    index_ids = idmap.column("index_id").to_numpy()
    if not np.array_equal(index_ids, np.arange(len(index_ids))):
        raise ValueError(f"{directory}: id map is not the dense range 0..{len(index_ids) - 1}")
    if len(index_ids) != sum(int(p.ntotal) for p in pieces):
        raise ValueError(f"{directory}: id map and index pieces disagree on the vector count")
    searchable = SearchableIndex(
        pieces,
        np.asarray([e["first_id"] for e in entries], dtype=np.int64),
        np.asarray(idmap.column("id").to_pylist(), dtype=object),
        np.asarray(idmap.column("uri").to_pylist(), dtype=object),
        manifest,
    )
    searchable.set_nprobe(nprobe)
    return searchable
