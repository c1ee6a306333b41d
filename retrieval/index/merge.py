"""Merging shard indexes into one index and one id map.

Shard indexes hold disjoint global ids, so merging is appending (``merge_from`` with no id
shift). Merging runs in rounds of bounded fan-in, as autofaiss does, so each step holds at most
``fan_in`` indexes in memory at once; ``faiss.contrib.ondisk.merge_ondisk`` is the way to go past
RAM for IVF indexes.
"""

from __future__ import annotations

import io
import time
from typing import Any

import faiss
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from retrieval import storage
from retrieval.index.codebook import read_codebook_manifest
from retrieval.index.faiss_io import read_index, write_index
from retrieval.index.shard_index import KIND, idmap_uri, index_uri
from retrieval.shards import manifest as manifests
from retrieval.shards.manifest import utc_now
from retrieval.summary import write_summary

INDEX_FILE = "index.faissindex"
IDMAP_FILE = "idmap.parquet"
INDEX_MANIFEST = "index.json"


def merge_pair(first: faiss.Index, second: faiss.Index) -> faiss.Index:
    first.merge_from(second, 0)
    return first


def merge_all(indexes: list[faiss.Index], fan_in: int = 8) -> faiss.Index:
    """Merge a list of compatible indexes in rounds of at most ``fan_in``."""
    if not indexes:
        raise ValueError("nothing to merge")
    while len(indexes) > 1:
        merged = []
        for i in range(0, len(indexes), fan_in):
            group = indexes[i : i + fan_in]
            head = group[0]
            for other in group[1:]:
                merge_pair(head, other)
            merged.append(head)
        indexes = merged
    return indexes[0]


def merge_shard_indexes(shards: str, output: str) -> dict[str, Any]:
    """Merge every committed shard index under ``shards`` into ``output``."""
    start = time.perf_counter()
    shard_manifests = manifests.list_manifests(shards, kind=KIND)
    if not shard_manifests:
        raise FileNotFoundError(f"no committed shard indexes under {shards}")
    codebooks = {m["codebook_id"] for m in shard_manifests}
    if len(codebooks) != 1:
        raise ValueError(f"{shards}: shard indexes were built with {len(codebooks)} codebooks")
    indexes, idmaps = [], []
    for m in shard_manifests:
        indexes.append(
            read_index(index_uri(shards, m["shard"]), expect_sha256=m["files"]["index"]["sha256"])
        )
        table = pq.read_table(io.BytesIO(storage.read_bytes(idmap_uri(shards, m["shard"]))))
        schemas.check_schema("idmap", table.schema, source=idmap_uri(shards, m["shard"]))
        idmaps.append(table)
    expected = sum(m["rows"] for m in shard_manifests)
    index = merge_all(indexes)
    if index.ntotal != expected:
        raise RuntimeError(f"merged index has {index.ntotal} vectors, shards hold {expected}")
    idmap = pa.concat_tables(idmaps).sort_by("index_id")
    data = write_index(storage.join(output, INDEX_FILE), index)
    sink = io.BytesIO()
    pq.write_table(idmap, sink)
    storage.write_bytes(storage.join(output, IDMAP_FILE), sink.getvalue())
    codebook = read_codebook_manifest(shard_manifests[0]["codebook"])
    manifest = {
        "schema_version": 1,
        "kind": "merged_index",
        "codebook_id": codebooks.pop(),
        "factory": codebook["factory"],
        "metric": codebook["metric"],
        "dim": codebook["dim"],
        "model": codebook["model"],
        "ntotal": int(index.ntotal),
        "shards": len(shard_manifests),
        "sha256": storage.sha256_bytes(data),
        "bytes": len(data),
        "created": utc_now(),
    }
    storage.write_json(storage.join(output, INDEX_MANIFEST), manifest)
    write_summary(
        output,
        "merge",
        inputs=expected,
        indexed=int(index.ntotal),
        failed=0,
        timings={"merge_s": time.perf_counter() - start},
        shards=len(shard_manifests),
    )
    return manifest
