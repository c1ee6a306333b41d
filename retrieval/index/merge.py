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

import schemas
from retrieval import plan, storage
from retrieval.index.codebook import read_codebook_manifest
from retrieval.index.faiss_io import read_index, write_index
from retrieval.index.shard_index import KIND, idmap_uri, index_uri
from retrieval.manifests import require_same, write_manifest
from retrieval.plan import check_unique_ids
from retrieval.summary import write_summary

INDEX_FILE = "index.faissindex"
IDMAP_FILE = "idmap.parquet"
INDEX_MANIFEST = "index.json"
INDEX_KIND = "merged_index"


def merge_shard_indexes(shards: str, output: str) -> dict[str, Any]:
    """Merge exactly the shard indexes of the plan of ``shards`` into ``output``.

    Refuses shards built with different codebooks and ids that are not unique across the index.
    """
    start = time.perf_counter()
    shard_manifests = plan.committed_manifests(shards, kind=KIND)
    if not shard_manifests:
        raise FileNotFoundError(f"no shard indexes in the plan of {shards}")
    for m in shard_manifests[1:]:
        require_same(
            m,
            shard_manifests[0],
            ("codebook_id",),
            what=f"{shards}: shard indexes {shard_manifests[0]['shard']} and {m['shard']} were "
            "built with different codebooks",
        )
    codebooks = {shard_manifests[0]["codebook_id"]}
    index, idmaps = None, []
    for m in shard_manifests:
        shard = read_index(
            index_uri(shards, m["shard"]), expect_sha256=m["files"]["index"]["sha256"]
        )
        if index is None:
            index = shard
        else:
            index.merge_from(shard, 0)  # ids are already global: no shift
        idmaps.append(
            storage.read_parquet(
                idmap_uri(shards, m["shard"]),
                schema="idmap",
                expect_sha256=m["files"]["idmap"]["sha256"],
            )
        )
    expected = sum(m["rows"] for m in shard_manifests)
    if index.ntotal != expected:
        raise RuntimeError(f"merged index has {index.ntotal} vectors, shards hold {expected}")
    idmap = pa.concat_tables(idmaps).sort_by("index_id")
    check_unique_ids(idmap.column("id").to_pylist(), what=f"merging {shards}")
    data = write_index(storage.join(output, INDEX_FILE), index)
    codebook = read_codebook_manifest(shard_manifests[0]["codebook"])
    idmap_data = storage.write_parquet(storage.join(output, IDMAP_FILE), idmap)
    body = {
        "codebook_id": codebooks.pop(),
        "factory": codebook["factory"],
        "metric": codebook["metric"],
        "dim": codebook["dim"],
        "model": codebook["model"],
        "ntotal": int(index.ntotal),
        "shards": len(shard_manifests),
        "sha256": storage.sha256_bytes(data),
        "bytes": len(data),
        "idmap_sha256": storage.sha256_bytes(idmap_data),
        "schemas": {"idmap": schemas.CURRENT_VERSIONS["idmap"]},
    }
    manifest = write_manifest(storage.join(output, INDEX_MANIFEST), INDEX_KIND, body)
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
