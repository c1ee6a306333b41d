"""Merging shard indexes into one index and one id map.

Shard indexes hold disjoint global ids, so merging is appending (``merge_from`` with no id
shift). Shard indexes are read one at a time and folded into the first, so memory holds the
merged index plus one shard; past RAM, ``faiss.contrib.ondisk.merge_ondisk`` is the way for IVF
indexes.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

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


def merge_shard_indexes(shards: str, output: str) -> dict[str, Any]:
    """Merge every committed shard index under ``shards`` into ``output``."""
    start = time.perf_counter()
    shard_manifests = manifests.list_manifests(shards, kind=KIND)
    if not shard_manifests:
        raise FileNotFoundError(f"no committed shard indexes under {shards}")
    codebooks = {m["codebook_id"] for m in shard_manifests}
    if len(codebooks) != 1:
        raise ValueError(f"{shards}: shard indexes were built with {len(codebooks)} codebooks")
    index, idmaps = None, []
    for m in shard_manifests:
        shard = read_index(
            index_uri(shards, m["shard"]), expect_sha256=m["files"]["index"]["sha256"]
        )
        if index is None:
            index = shard
        else:
            index.merge_from(shard, 0)  # ids are already global: no shift
        idmaps.append(storage.read_parquet(idmap_uri(shards, m["shard"]), schema="idmap"))
    expected = sum(m["rows"] for m in shard_manifests)
    if index.ntotal != expected:
        raise RuntimeError(f"merged index has {index.ntotal} vectors, shards hold {expected}")
    idmap = pa.concat_tables(idmaps).sort_by("index_id")
    data = write_index(storage.join(output, INDEX_FILE), index)
    storage.write_parquet(storage.join(output, IDMAP_FILE), idmap)
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
