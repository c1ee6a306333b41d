"""Shard manifests: the small JSON written last that marks a shard committed.

A shard's data files are written first; the manifest, with counts and checksums, is written last
and atomically. A shard is done if and only if its manifest exists, matches the inputs it was
planned from, and was made with the same model configuration; a re-run skips exactly those.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import schemas
from retrieval import storage

log = logging.getLogger(__name__)
MANIFEST_SUFFIX = ".manifest.json"


def manifest_uri(directory: str, shard_id: str) -> str:
    return storage.join(directory, shard_id + MANIFEST_SUFFIX)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def file_entry(uri: str, data: bytes, rows: int) -> dict[str, Any]:
    return {
        "name": uri.rsplit("/", 1)[-1],
        "sha256": storage.sha256_bytes(data),
        "bytes": len(data),
        "rows": rows,
    }


def commit(directory: str, shard_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (the commit point) after the shard's data files exist."""
    manifest = {
        "schema_version": schemas.CURRENT_VERSIONS["manifest"],
        "shard": shard_id,
        **manifest,
        "created": utc_now(),
    }
    storage.write_json(manifest_uri(directory, shard_id), manifest)
    return manifest


def read(directory: str, shard_id: str) -> dict[str, Any] | None:
    """The shard's manifest, or None if the shard is not committed."""
    uri = manifest_uri(directory, shard_id)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    schemas.check_manifest_version(manifest, source=uri)
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


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def list_manifests(directory: str, *, kind: str) -> list[dict[str, Any]]:
    """Every committed shard's manifest of ``kind`` under ``directory``, by shard id."""
    manifests = []
    for uri in storage.list_files(directory, suffixes=[MANIFEST_SUFFIX]):
        manifest = storage.read_json(uri)
        schemas.check_manifest_version(manifest, source=uri)
        if manifest.get("kind") == kind:
            manifests.append(manifest)
    return sorted(manifests, key=lambda m: m["shard"])
