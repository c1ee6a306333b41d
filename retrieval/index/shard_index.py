"""Per-shard indexes: a copy of the trained codebook plus one shard's vectors under global ids.

Global ids are positions in the deterministic (shard id, row) order of the descriptor shards, so
shard indexes merge without shifting ids and any worker can build any shard independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from retrieval import plan, storage
from retrieval.index.codebook import read_codebook, read_codebook_manifest
from retrieval.index.faiss_io import write_index
from retrieval.manifests import canonical_digest, require_same
from retrieval.shards import descriptor_shards
from retrieval.shards import manifest as manifests
from retrieval.summary import write_summary

KIND = "index"


@dataclass(frozen=True)
class ShardIndexTask:
    """Build the index of one descriptor shard: which shard, its first global id, which codebook."""

    descriptors: str
    shard_manifest: dict[str, Any]
    id_offset: int
    codebook: str
    codebook_id: str
    codebook_sha256: str

    @property
    def shard_id(self) -> str:
        return self.shard_manifest["shard"]

    @property
    def input_digest(self) -> str:
        """What the shard index is made from: the codebook, the descriptors, the id range."""
        return canonical_digest(
            {
                "codebook_id": self.codebook_id,
                "id_offset": self.id_offset,
                "descriptors_sha256": self.shard_manifest["files"]["data"]["sha256"],
            }
        )

    def expect(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "codebook_id": self.codebook_id,
            "id_offset": self.id_offset,
            "descriptors_sha256": self.shard_manifest["files"]["data"]["sha256"],
            "input_digest": self.input_digest,
        }


def index_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, f"{shard_id}.faissindex")


def idmap_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, f"{shard_id}.idmap.parquet")


def plan_shard_indexes(descriptors: str, codebook: str) -> list[ShardIndexTask]:
    """One task per planned descriptor shard, with global id offsets in plan order.

    Refuses descriptors made by another model than the one the codebook was trained for.
    """
    trained = read_codebook_manifest(codebook)
    tasks, offset = [], 0
    for manifest in descriptor_shards.list_shards(descriptors):
        require_same(
            manifest["model"],
            trained["model"],
            ("config_hash", "weights_sha256"),
            what=f"descriptor shard {manifest['shard']} and codebook {codebook} come from "
            "different models",
        )
        tasks.append(
            ShardIndexTask(
                descriptors, manifest, offset, codebook, trained["codebook_id"], trained["sha256"]
            )
        )
        offset += manifest["rows"]
    return tasks


def write_index_plan(tasks: list[ShardIndexTask], output: str) -> plan.RunPlan:
    """The shard index folder's plan: exactly these shards (merge reads nothing else)."""
    shards = [
        plan.PlannedShard(t.shard_id, t.shard_manifest["rows"], t.input_digest) for t in tasks
    ]
    codebook_id = tasks[0].codebook_id if tasks else None
    descriptors = tasks[0].descriptors if tasks else None
    return plan.write_plan(
        output, shards, stage="index", codebook_id=codebook_id, descriptors=descriptors
    )


def pending(tasks: list[ShardIndexTask], output: str) -> list[ShardIndexTask]:
    return [t for t in tasks if manifests.committed(output, t.shard_id, expect=t.expect()) is None]


def idmap_table(index_ids: np.ndarray, ids: list[str], uris: list[str], shard: str) -> pa.Table:
    schema = schemas.arrow_schema("idmap")
    return pa.table(
        {
            "index_id": pa.array(index_ids, pa.int64()),
            "id": pa.array(ids, pa.string()),
            "uri": pa.array(uris, pa.string()),
            "shard": pa.array([shard] * len(ids), pa.string()),
        },
        schema=schema,
    )


def build_shard_index(task: ShardIndexTask, output: str) -> dict[str, Any]:
    """Add one shard's vectors to a copy of the trained index; write index, id map, manifest."""
    shard = descriptor_shards.read_shard(task.descriptors, task.shard_manifest)
    index = read_codebook(task.codebook, {"sha256": task.codebook_sha256})
    ids = np.arange(task.id_offset, task.id_offset + len(shard.ids), dtype=np.int64)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(shard.vectors), ids)
    data = write_index(index_uri(output, task.shard_id), index)
    idmap = storage.write_parquet(
        idmap_uri(output, task.shard_id), idmap_table(ids, shard.ids, shard.uris, task.shard_id)
    )
    return manifests.commit(
        output,
        task.shard_id,
        {
            **task.expect(),
            "codebook": task.codebook,
            "rows": len(ids),
            "files": {
                "index": manifests.file_entry(index_uri(output, task.shard_id), data, len(ids)),
                "idmap": manifests.file_entry(idmap_uri(output, task.shard_id), idmap, len(ids)),
            },
        },
    )


def summarize_shard_indexes(
    tasks: list[ShardIndexTask], output: str, skipped: int, timings: dict[str, float]
) -> dict[str, Any]:
    rows = 0
    for task in tasks:
        manifest = manifests.committed(output, task.shard_id, expect=task.expect())
        if manifest is None:
            raise RuntimeError(f"shard index {task.shard_id} not committed after the run")
        rows += manifest["rows"]
    inputs = sum(t.shard_manifest["rows"] for t in tasks)
    return write_summary(
        output,
        "index",
        inputs=inputs,
        indexed=rows,
        failed=inputs - rows,
        timings=timings,
        shards=len(tasks),
        shards_skipped=skipped,
    )
