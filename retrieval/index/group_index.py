"""Index tasks over groups of descriptor shards: encode the vectors, write codes and ids only.

A task takes a run of consecutive committed descriptor shards (about ``group_vectors`` vectors),
loads the codebook once, adds every shard's vectors under global ids and writes what the vectors
added (``codes.py``: the IVF inverted lists, no codebook copy) and an id map. Global ids are
positions in the deterministic (shard id, row) order, so groups merge without shifting ids and
any worker (Beam, Spark, a plain loop) can build any group independently.

    group-00000.codes            codes + ids (faiss inverted lists, or a small flat index)
    group-00000.idmap.parquet    index_id, id, uri, shard
    group-00000.manifest.json    written last = committed
    plan.json, plan.shards.parquet   the groups of this run (``retrieval.plan``): merge reads
                                     exactly these
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from retrieval import plan, storage
from retrieval import shard_manifests as manifests
from retrieval.index.codebook import load_codebook, read_codebook_manifest
from retrieval.index.codes import codes_format, write_codes
from retrieval.manifests import canonical_digest, require_same
from retrieval.shards import descriptor_shards
from retrieval.summary import write_summary

KIND = "index_group"
DEFAULT_GROUP_VECTORS = 50_000
# Rows per Parquet row group of the id maps: a reader decodes a whole row group at once, so the
# merge (which streams id maps row group by row group) holds at most this many id map rows.
IDMAP_ROW_GROUP_ROWS = 16_384


@dataclass(frozen=True)
class IndexGroupTask:
    """Build the codes of a run of descriptor shards: which shards, the first global id, which
    codebook. Plain data: any runner can ship it to a worker."""

    group_id: str
    descriptors: str
    shard_manifests: tuple[dict[str, Any], ...]
    first_id: int
    codebook: str
    codebook_id: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexGroupTask:
        """The inverse of ``dataclasses.asdict`` (tasks travel to workers as JSON)."""
        return cls(**{**d, "shard_manifests": tuple(d["shard_manifests"])})

    @property
    def rows(self) -> int:
        return sum(m["rows"] for m in self.shard_manifests)

    @property
    def input_digest(self) -> str:
        """What the group is made from: the codebook, the shards' data, the first id."""
        return canonical_digest(
            {
                "codebook_id": self.codebook_id,
                "first_id": self.first_id,
                "shards": [
                    [m["shard"], descriptor_shards.shard_digest(m)] for m in self.shard_manifests
                ],
            }
        )

    def expect(self) -> dict[str, Any]:
        return {"kind": KIND, "codebook_id": self.codebook_id, "input_digest": self.input_digest}


def codes_uri(directory: str, node_id: str) -> str:
    return storage.join(directory, f"{node_id}.codes")


def idmap_uri(directory: str, node_id: str) -> str:
    return storage.join(directory, f"{node_id}.idmap.parquet")


def group_shards(
    shard_manifests: list[dict[str, Any]], group_vectors: int
) -> list[list[dict[str, Any]]]:
    """Consecutive shards in groups of at least ``group_vectors`` vectors (the last may be
    smaller); deterministic for a given shard list."""
    if group_vectors < 1:
        raise ValueError("group_vectors must be at least 1")
    groups: list[list[dict[str, Any]]] = [[]]
    rows = 0
    for manifest in shard_manifests:
        if rows >= group_vectors:
            groups.append([])
            rows = 0
        groups[-1].append(manifest)
        rows += manifest["rows"]
    return [g for g in groups if g]


def plan_index_groups(
    descriptors: str, codebook: str, *, group_vectors: int = DEFAULT_GROUP_VECTORS
) -> list[IndexGroupTask]:
    """One task per group of planned descriptor shards, with global ids in plan order.

    Refuses descriptors made by another model than the one the codebook was trained for.
    """
    trained = read_codebook_manifest(codebook)
    codebook_id = trained["codebook_id"]
    shard_manifests = descriptor_shards.list_shards(descriptors)
    for manifest in shard_manifests:
        require_same(
            manifest["model"],
            trained["model"],
            ("config_hash", "weights_sha256"),
            what=f"descriptor shard {manifest['shard']} and codebook {codebook} come from "
            "different models",
        )
    tasks, first_id = [], 0
    for i, group in enumerate(group_shards(shard_manifests, group_vectors)):
        task = IndexGroupTask(
            f"group-{i:05d}", descriptors, tuple(group), first_id, codebook, codebook_id
        )
        tasks.append(task)
        first_id += task.rows
    return tasks


def write_index_plan(tasks: list[IndexGroupTask], output: str) -> plan.RunPlan:
    """The index folder's plan: exactly these groups (merge reads nothing else)."""
    return plan.write_plan(
        output,
        [plan.PlannedShard(t.group_id, t.rows, t.input_digest) for t in tasks],
        stage="index",
        codebook_id=tasks[0].codebook_id if tasks else None,
        descriptors=tasks[0].descriptors if tasks else None,
    )


def pending(tasks: list[IndexGroupTask], output: str) -> list[IndexGroupTask]:
    return [t for t in tasks if manifests.committed(output, t.group_id, expect=t.expect()) is None]


def idmap_table(index_ids: np.ndarray, ids: list[str], uris: list[str], shard: str) -> pa.Table:
    return pa.table(
        {
            "index_id": pa.array(index_ids, pa.int64()),
            "id": pa.array(ids, pa.string()),
            "uri": pa.array(uris, pa.string()),
            "shard": pa.array([shard] * len(ids), pa.string()),
        },
        schema=schemas.arrow_schema("idmap"),
    )


def build_group_index(task: IndexGroupTask, output: str) -> dict[str, Any]:
    """Add the group's vectors to a copy of the codebook; write codes, id map, then manifest."""
    index, _ = load_codebook(task.codebook)
    next_id, idmaps = task.first_id, []
    for shard_manifest in task.shard_manifests:
        shard = descriptor_shards.read_shard(task.descriptors, shard_manifest)
        ids = np.arange(next_id, next_id + len(shard.ids), dtype=np.int64)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(shard.vectors), ids)
        idmaps.append(idmap_table(ids, shard.ids, shard.uris, shard.shard_id))
        next_id += len(ids)
    rows = next_id - task.first_id
    codes = write_codes(codes_uri(output, task.group_id), index)
    idmap = storage.write_parquet(
        idmap_uri(output, task.group_id),
        pa.concat_tables(idmaps) if idmaps else idmap_table(np.zeros(0, np.int64), [], [], ""),
        row_group_size=IDMAP_ROW_GROUP_ROWS,
    )
    return manifests.commit(
        output,
        task.group_id,
        {
            **task.expect(),
            "codebook": task.codebook,
            "codes_format": codes_format(index),
            "rows": rows,
            "shards": [m["shard"] for m in task.shard_manifests],
            "files": {
                "codes": manifests.file_entry(codes_uri(output, task.group_id), codes, rows),
                "idmap": manifests.file_entry(idmap_uri(output, task.group_id), idmap, rows),
            },
        },
    )


def summarize_index_groups(
    tasks: list[IndexGroupTask], output: str, skipped: int, timings: dict[str, float]
) -> dict[str, Any]:
    rows, committed = 0, []
    for task in tasks:
        manifest = manifests.committed(output, task.group_id, expect=task.expect())
        if manifest is None:
            raise RuntimeError(f"index group {task.group_id} not committed after the run")
        rows += manifest["rows"]
        committed.append(manifest)
    inputs = sum(t.rows for t in tasks)
    return write_summary(
        output,
        "index",
        inputs=inputs,
        indexed=rows,
        failed=inputs - rows,
        timings=timings,
        groups=len(tasks),
        groups_skipped=skipped,
        shards=sum(len(t.shard_manifests) for t in tasks),
        codes_bytes=sum(m["files"]["codes"]["bytes"] for m in committed),
    )


def build_index_groups(
    descriptors: str, codebook: str, output: str, *, group_vectors: int = DEFAULT_GROUP_VECTORS
) -> dict[str, Any]:
    """Plan, build (in this process) and summarize every index group not yet committed."""
    tasks = plan_index_groups(descriptors, codebook, group_vectors=group_vectors)
    write_index_plan(tasks, output)
    todo = pending(tasks, output)
    for task in todo:
        build_group_index(task, output)
    return summarize_index_groups(tasks, output, len(tasks) - len(todo), {})
