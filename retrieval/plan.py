"""The run plan: which shards a stage's output folder owns, written to storage, read by shard id.

``retrieval extract`` writes its listing, cut into shards, next to the descriptor shards::

    plan.refs.parquet     shard_id, id, uri, problem,    one row per input, by shard then id
                          sealed
    plan.shards.parquet   shard_id, inputs, input_digest one row per shard
    plan.json             written last (the commit point): counts, source, file checksums

Every later reader of the folder (train, index, search, read_all, summaries) reads exactly the
shards of the plan, and each shard only if its committed manifest carries the planned
``input_digest``. ``part-*`` files left by an earlier run with another listing or shard size are
not part of the plan, so they never count (and are reported as stale). ``retrieval index`` writes
a plan of its own (``plan.shards.parquet`` + ``plan.json``) for the same reason.

Workers read their shard's references from ``plan.refs.parquet`` by shard id
(:func:`read_shard_spec`), touching only the row groups that hold it, so a runner's graph only
ever carries shard ids. The plan's files are plain Parquet: any runner (Spark, Beam, a script)
can read them directly.

The plan holds no secret: ``uri`` is recorded masked (``retrieval.redaction``), and an input
whose real URI carries one (a signed URL) has it in ``sealed``, encrypted with the run's key,
which only the run's processes hold (in memory). ``source`` is recorded masked too.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from retrieval import shard_manifests, storage
from retrieval.corpus import ShardSpec
from retrieval.image_refs import ImageRef
from retrieval.manifests import ManifestError, check_name, read_manifest, write_manifest
from retrieval.redaction import redact

log = logging.getLogger(__name__)

KIND = "plan"
PLAN_MANIFEST = "plan.json"
REFS_FILE = "plan.refs.parquet"
SHARDS_FILE = "plan.shards.parquet"
# Row groups of the refs file: a worker reading one shard reads one or two of them.
ROW_GROUP_ROWS = 16_384


class PlanError(RuntimeError):
    """A folder's plan is missing, or some of its shards are not committed."""


@dataclass(frozen=True)
class PlannedShard:
    """One shard of a plan: its id, how many inputs it has, and the digest of those inputs."""

    shard_id: str
    inputs: int
    input_digest: str


@dataclass(frozen=True)
class RunPlan:
    """A folder's plan as read back (the shard list; the references stay in storage)."""

    directory: str
    shards: tuple[PlannedShard, ...]
    manifest: dict[str, Any]

    @property
    def inputs(self) -> int:
        return sum(s.inputs for s in self.shards)

    @property
    def shard_ids(self) -> list[str]:
        return [s.shard_id for s in self.shards]

    def stale_shard_ids(self) -> list[str]:
        """Shard manifests in the folder that this plan does not own (earlier runs)."""
        planned = set(self.shard_ids)
        return [s for s in shard_manifests.shard_ids_on_disk(self.directory) if s not in planned]


def plan_uri(directory: str) -> str:
    return storage.join(directory, PLAN_MANIFEST)


def _shards_table(shards: Sequence[PlannedShard]) -> pa.Table:
    return pa.table(
        {
            "shard_id": [s.shard_id for s in shards],
            "inputs": pa.array([s.inputs for s in shards], pa.int64()),
            "input_digest": [s.input_digest for s in shards],
        },
        schema=schemas.arrow_schema("plan_shards"),
    )


class _RefsWriter:
    """Writes ``plan.refs.parquet`` to a local file row group by row group, so the listing is
    never held whole; the file is byte-identical to writing the whole table at once with
    ``row_group_size=ROW_GROUP_ROWS`` (the same row groups, written the same way).

    Checks that planned ids (inputs without a listing problem) are unique: a sorted listing
    (every listing :func:`retrieval.corpus.iter_corpus` makes) is checked between neighbours in
    constant memory; ids out of order (hand-made specs) are checked on the written file, in Arrow.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows = 0
        self._schema = schemas.arrow_schema("plan_refs")
        self._writer = pq.ParquetWriter(path, self._schema, compression="zstd")
        self._columns: tuple[list, list, list, list, list] = ([], [], [], [], [])
        self._last_id: str | None = None
        self._in_order = True

    def add(self, spec: ShardSpec) -> None:
        shard_ids, ids, uris, problems, sealed = self._columns
        for ref in spec.refs:
            if ref.problem is None:
                if self._last_id is not None and ref.id <= self._last_id:
                    if ref.id == self._last_id:
                        raise PlanError(f"image id {ref.id!r} is planned twice ({ref.uri})")
                    self._in_order = False
                self._last_id = ref.id
            shard_ids.append(spec.shard_id)
            ids.append(ref.id)
            uris.append(ref.uri)
            problems.append(ref.problem)
            sealed.append(ref.sealed)
            if len(ids) == ROW_GROUP_ROWS:
                self._flush()

    def _flush(self) -> None:
        shard_ids, ids, uris, problems, sealed = self._columns
        if ids:
            table = pa.table(
                {
                    "shard_id": shard_ids,
                    "id": ids,
                    "uri": uris,
                    "problem": problems,
                    "sealed": sealed,
                },
                schema=self._schema,
            )
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self.rows += len(ids)
        for column in self._columns:
            column.clear()  # in place: add() holds these lists

    def close(self) -> None:
        self._flush()
        self._writer.close()
        if not self._in_order:
            self._check_unique_on_file()

    def _check_unique_on_file(self) -> None:
        table = pq.read_table(self.path, columns=["id", "uri", "problem"])
        planned = table.filter(pc.is_null(table["problem"]))
        counts = pc.value_counts(planned["id"])
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(repeated):
            image_id = repeated.field("values")[0].as_py()
            uri = planned.filter(pc.equal(planned["id"], image_id))["uri"][1].as_py()
            raise PlanError(f"image id {image_id!r} is planned twice ({uri})")


def write_extraction_plan(
    directory: str,
    specs: Iterable[ShardSpec],
    *,
    source: str,
    shard_size: int,
    also_to: Sequence[str] = (),
) -> RunPlan:
    """Write the listing ``specs`` (cut by :func:`retrieval.corpus.iter_shards`) as the plan of
    the descriptor folder ``directory`` (and the same plan to each folder of ``also_to``);
    ``plan.json`` is written last.

    ``specs`` is consumed once, as a stream: the references go to a local Parquet file row
    group by row group and only the per-shard summary (id, count, digest) stays in memory.
    """
    with tempfile.TemporaryDirectory(prefix="retrieval-plan-") as scratch:
        writer = _RefsWriter(os.path.join(scratch, REFS_FILE))
        shards: list[PlannedShard] = []
        try:
            for spec in specs:
                writer.add(spec)
                shards.append(PlannedShard(spec.shard_id, len(spec.refs), spec.input_digest))
        finally:
            writer.close()
        refs = (writer.path, writer.rows)
        source = redact(source)
        written = write_plan(
            directory, shards, refs_file=refs, stage="extract", source=source,
            shard_size=shard_size,
        )  # fmt: skip
        for other in also_to:
            write_plan(
                other, shards, refs_file=refs, stage="extract", source=source,
                shard_size=shard_size,
            )  # fmt: skip
    return written


def write_plan(
    directory: str,
    shards: Sequence[PlannedShard],
    *,
    refs_file: tuple[str, int] | None = None,
    stage: str,
    **details: Any,
) -> RunPlan:
    """Write a plan for ``shards`` (and, for extraction, the per-input references: a local
    ``plan.refs.parquet`` file and its row count); returns it."""
    for shard in shards:
        check_name(shard.shard_id, what="shard id")
    shards_data = _parquet_bytes(_shards_table(shards))
    files = {
        "shards": shard_manifests.file_entry(
            storage.join(directory, SHARDS_FILE), shards_data, len(shards)
        )
    }
    if refs_file is not None:
        path, rows = refs_file
        files["refs"] = {
            "name": REFS_FILE,
            "sha256": storage.sha256_file(path),
            "bytes": os.path.getsize(path),
            "rows": rows,
        }
    plan_id = storage.sha256_bytes("\n".join(s.input_digest for s in shards).encode())
    body = {
        "stage": stage,
        "plan_id": plan_id,
        "shards": len(shards),
        "inputs": sum(s.inputs for s in shards),
        "files": files,
        **details,
    }
    # A listing with sealed URIs is never the same twice (each run seals with its own key), so
    # its plan is rewritten: the refs a run's workers read are always sealed with their key.
    existing = _existing_plan(directory, body)
    if existing is not None:  # a re-run with the same listing: leave the plan untouched
        return RunPlan(directory, tuple(shards), existing)
    storage.write_bytes(storage.join(directory, SHARDS_FILE), shards_data)
    if refs_file is not None:
        storage.upload(refs_file[0], storage.join(directory, REFS_FILE))
    manifest = write_manifest(plan_uri(directory), KIND, body)
    return RunPlan(directory, tuple(shards), manifest)


def _parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _existing_plan(directory: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The committed plan of ``directory`` if it says exactly ``body`` (files included)."""
    if not storage.exists(plan_uri(directory)):
        return None
    try:
        manifest = read_manifest(plan_uri(directory), kind=KIND)
    except (ManifestError, schemas.SchemaMismatchError):
        return None  # damaged or from another version: it is rewritten
    same = all(manifest.get(k) == json_value for k, json_value in _as_json(body).items())
    return manifest if same else None


def _as_json(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


def read_plan(directory: str) -> RunPlan:
    """The folder's plan (checked against its manifest), or :class:`PlanError` if it has none."""
    uri = plan_uri(directory)
    if not storage.exists(uri):
        raise PlanError(
            f"{directory} has no run plan ({PLAN_MANIFEST}): it is not the output of a "
            "finished `retrieval extract` / `retrieval index` run (or was written by an older "
            "version); run that stage into it"
        )
    manifest = read_manifest(uri, kind=KIND)
    return RunPlan(directory, _planned_shards(directory, manifest["checksum"]), manifest)


@functools.lru_cache(maxsize=8)
def _planned_shards(directory: str, plan_checksum: str) -> tuple[PlannedShard, ...]:
    """The shard table of the plan whose manifest has ``plan_checksum`` (cached per process)."""
    manifest = read_manifest(plan_uri(directory), kind=KIND)
    if manifest["checksum"] != plan_checksum:
        raise PlanError(f"{directory}: the plan changed while it was being read")
    entry = manifest["files"]["shards"]
    table = storage.read_parquet(
        storage.join(directory, SHARDS_FILE), schema="plan_shards", expect_sha256=entry["sha256"]
    )
    shards = tuple(
        PlannedShard(check_name(r["shard_id"], what="shard id"), r["inputs"], r["input_digest"])
        for r in table.to_pylist()
    )
    if len(shards) != manifest["shards"]:
        raise ManifestError(
            f"{directory}: plan lists {manifest['shards']} shards, its table {len(shards)}"
        )
    return shards


@functools.lru_cache(maxsize=8)
def _refs_file(uri: str, sha256: str) -> tuple[pq.ParquetFile, list[tuple[str, str]]]:
    """The refs file's footer and each row group's shard id range (cached per worker)."""
    fs, path = storage.filesystem(uri)
    handle = storage.with_retries(lambda: fs.open(path, "rb"), what=f"open {uri}")
    parquet = pq.ParquetFile(handle)
    schemas.check_schema("plan_refs", parquet.schema_arrow, source=uri)
    ranges = []
    for i in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(i).column(0).statistics
        ranges.append((stats.min, stats.max) if stats is not None and stats.has_min_max else None)
    return parquet, ranges


def read_shard_spec(directory: str, shard_id: str) -> ShardSpec:
    """One shard's references, read from ``plan.refs.parquet`` by shard id (on a worker).

    Only the row groups whose shard id range holds the shard are read. The references are
    checked against the planned ``input_digest``, so a worker never works from a damaged or
    replaced plan.
    """
    plan = read_plan(directory)
    shard = next((s for s in plan.shards if s.shard_id == shard_id), None)
    if shard is None:
        raise PlanError(f"{directory}: the plan has no shard {shard_id!r}")
    entry = plan.manifest["files"].get("refs")
    if entry is None:
        raise PlanError(f"{directory}: this plan has no input references (not an extract plan)")
    uri = storage.join(directory, REFS_FILE)

    def read() -> pa.Table | None:
        parquet, ranges = _refs_file(uri, entry["sha256"])
        groups = [i for i, r in enumerate(ranges) if r is None or r[0] <= shard_id <= r[1]]
        return parquet.read_row_groups(groups) if groups else None

    table = storage.with_retries(read, what=f"read {uri}")
    rows = [] if table is None else table.filter(pc.equal(table["shard_id"], shard_id)).to_pylist()
    spec = ShardSpec(
        shard_id,
        tuple(ImageRef(r["id"], r["uri"], r["problem"], r.get("sealed")) for r in rows),
    )
    if len(spec.refs) != shard.inputs or spec.input_digest != shard.input_digest:
        _refs_file.cache_clear()
        raise PlanError(
            f"{uri}: the references of {shard_id} do not match the plan's digest "
            "(the plan was replaced or damaged; re-run `retrieval extract`)"
        )
    return spec


def read_refs(directory: str, ids: Iterable[str]) -> list[ImageRef]:
    """The references of ``ids`` in ``directory``'s extraction plan (those it has), by id.

    The whole refs file is read and checked against the plan (a driver's lookup, once per
    request: about 100 bytes an input), then filtered."""
    plan = read_plan(directory)
    entry = plan.manifest["files"].get("refs")
    if entry is None:
        raise PlanError(f"{directory}: this plan has no input references (not an extract plan)")
    table = storage.read_parquet(
        storage.join(directory, REFS_FILE), schema="plan_refs", expect_sha256=entry["sha256"]
    )
    wanted = pa.array(sorted(set(ids)), pa.string())
    rows = table.filter(pc.is_in(table["id"], value_set=wanted)).to_pylist()
    return [ImageRef(r["id"], r["uri"], r["problem"], r.get("sealed")) for r in rows]


def committed_manifests(directory: str, *, kind: str) -> list[dict[str, Any]]:
    """The committed manifests of exactly the shards of ``directory``'s plan, in plan order.

    Raises :class:`PlanError` naming the shards that are missing or were committed for other
    inputs (an unfinished run); logs shard files that are not part of the plan (stale).
    """
    plan = read_plan(directory)
    found, missing = [], []
    for shard in plan.shards:
        manifest = shard_manifests.read(directory, shard.shard_id)
        if (
            manifest is None
            or manifest.get("kind") != kind
            or manifest.get("input_digest") != shard.input_digest
        ):
            missing.append(shard.shard_id)
        else:
            found.append(manifest)
    if missing:
        raise PlanError(
            f"{directory}: {len(missing)} of {len(plan.shards)} planned shards are not committed "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); the run that "
            "wrote it did not finish: run the same command again to complete it"
        )
    stale = plan.stale_shard_ids()
    if stale:
        log.warning(
            "%s: %d shard file(s) not in the current plan are ignored (left by an earlier run "
            "with another listing or shard size): %s",
            directory,
            len(stale),
            ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""),
        )
    return found


def check_unique_ids(ids: Iterable[str], *, what: str) -> None:
    """Refuse an index whose image ids are not unique, naming a few of the repeated ones."""
    seen: set[str] = set()
    repeated: list[str] = []
    for image_id in ids:
        if image_id in seen:
            repeated.append(image_id)
        seen.add(image_id)
    if repeated:
        raise PlanError(
            f"{what}: {len(repeated)} image id(s) occur more than once "
            f"({', '.join(map(repr, repeated[:5]))}): every id must be unique across an index"
        )
