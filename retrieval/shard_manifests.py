"""Shard manifests: the small JSON written last that marks a shard committed.

A shard's data files are written first; the manifest, with counts and checksums, is written last
and atomically (through :mod:`retrieval.manifests`, which versions and checksums it). A shard is
done if and only if its manifest exists, matches the inputs it was planned from, and was made
with the same model configuration; a re-run skips exactly those. Which shards a folder holds is
said by its run plan (:mod:`retrieval.plan`), never by whatever manifests happen to be there.

Not part of ``shards/``: the plan reads these manifests, and the shard readers in ``shards/`` read
through the plan, so this module sits below the plan and they above it.
"""

from __future__ import annotations

import logging
from typing import Any

from retrieval import storage
from retrieval.manifests import ManifestError, check_name, read_manifest, write_manifest

log = logging.getLogger(__name__)
MANIFEST_SUFFIX = ".manifest.json"


def manifest_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, check_name(shard_id, what="shard id") + MANIFEST_SUFFIX)


def file_entry(uri: str, data: bytes, rows: int) -> dict[str, Any]:
    return {
        "name": uri.rsplit("/", 1)[-1],
        "sha256": storage.sha256_bytes(data),
        "bytes": len(data),
        "rows": rows,
    }


def commit(directory: str, shard_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (the commit point) after the shard's data files exist."""
    body = {k: v for k, v in manifest.items() if k != "kind"}
    return write_manifest(
        manifest_uri(directory, shard_id), manifest["kind"], {"shard": shard_id, **body}
    )


def read(directory: str, shard_id: str) -> dict[str, Any] | None:
    """The shard's checked manifest, or None if the shard is not committed.

    A manifest whose ``shard`` is not its own file name is refused: its data file names are
    derived from that field, so a copied or crafted manifest could point at another shard's data.
    """
    uri = manifest_uri(directory, shard_id)
    if not storage.exists(uri):
        return None
    manifest = read_manifest(uri)
    if manifest.get("shard") != shard_id:
        raise ManifestError(
            f"{uri}: manifest says shard {manifest.get('shard')!r}, its file name says {shard_id!r}"
        )
    return manifest


def committed(directory: str, shard_id: str, *, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if the shard is committed with the expected values (digest, config hash)."""
    manifest = read(directory, shard_id)
    if manifest is None:
        return None
    for key, value in expect.items():
        found = _get(manifest, key)
        if found != value:
            log.info(
                "%s: stale (%s is %r, expected %r); it will be rebuilt", shard_id, key, found, value
            )
            return None
    return manifest


def committed_for_model(
    directory: str, kind: str, spec: Any, model_info: dict[str, Any]
) -> dict[str, Any] | None:
    """The manifest of ``spec``'s shard (a ``ShardSpec`` or ``PlannedShard``) if it is committed
    as ``kind`` for the same inputs (digest) and the same model (config hash and weights)."""
    return committed(
        directory,
        spec.shard_id,
        expect={
            "kind": kind,
            "input_digest": spec.input_digest,
            "model.config_hash": model_info["config_hash"],
            "model.weights_sha256": model_info["weights_sha256"],
        },
    )


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def damaged_files(directory: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """The files of a manifest's ``files`` (in ``directory``) whose bytes no longer match it:
    missing, another size (a stat), or another SHA-256 (read back, only when the size
    matches). What a re-run checks before it skips a committed shard: a manifest says the shard
    was committed, this says it is still intact. Each entry as ``name (why)``."""
    problems = []
    for entry in files.values():
        name = check_name(entry["name"], what="file name")
        uri = storage.join(directory, name)
        fs, path = storage.filesystem(uri)
        fs.invalidate_cache(path)  # a listing cached before a rewrite would give the old size
        try:
            size = storage.with_retries(lambda fs=fs, path=path: fs.size(path), what=f"stat {uri}")
        except FileNotFoundError:
            problems.append(f"{name} (missing)")
            continue
        if size != entry["bytes"]:
            problems.append(f"{name} ({size} bytes, its manifest says {entry['bytes']})")
        elif storage.sha256_file(uri) != entry["sha256"]:
            problems.append(f"{name} (checksum)")
    return problems


def shard_ids_on_disk(directory: str) -> list[str]:
    """Shard ids of every manifest file under ``directory`` (committed by this run or another)."""
    names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(directory)]
    return sorted(n[: -len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX))
