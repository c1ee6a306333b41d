"""Manifest-like JSON files, written by one helper and checked by one reader.

Shard manifests, ``plan.json``, ``codebook.json`` and ``index.json`` all say what a folder holds
and which bytes it must find. Each is written with the manifest schema version, its ``kind`` and
a SHA-256 ``checksum`` over its own canonical JSON, and read back only after those three are
checked: a file from an incompatible version of the code, a file of another kind, or a file that
was altered or cut short is refused with a message naming the problem, instead of being trusted.

Names that come from inside a manifest (a shard id) are joined into paths; :func:`check_name`
confines them to their folder.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import schemas
from retrieval import storage

MANIFEST_VERSION = schemas.CURRENT_VERSIONS["manifest"]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """A manifest that cannot be trusted: wrong version or kind, bad checksum, unsafe name."""


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def checksum(doc: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, without its own ``checksum`` field."""
    return storage.sha256_bytes(_canonical({k: v for k, v in doc.items() if k != "checksum"}))


def canonical_digest(value: Any) -> str:
    """SHA-256 of any JSON value in canonical form (stable across runs and machines)."""
    return storage.sha256_bytes(_canonical(value))


def check_name(name: Any, *, what: str = "name") -> str:
    """A file-name component read from untrusted data: no separators, no '..', not absolute."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ManifestError(f"unsafe {what} {name!r}: only letters, digits, '.', '_' and '-'")
    return name


def build(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The manifest document for ``body``: version, kind, body, creation time, checksum."""
    doc = {"schema_version": MANIFEST_VERSION, "kind": kind, **body, "created": utc_now()}
    doc = json.loads(json.dumps(doc, default=str))  # what a reader will see (tuples -> lists)
    doc["checksum"] = checksum(doc)
    return doc


def write_manifest(uri: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write a manifest atomically (the commit point of whatever it describes); returns it."""
    doc = build(kind, body)
    storage.write_json(uri, doc)
    return doc


def check(doc: Any, *, source: str, kind: str | None = None) -> dict[str, Any]:
    """Refuse a manifest of another version or kind, or whose checksum does not match."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: not a manifest (a JSON object was expected)")
    schemas.check_manifest_version(doc, source=source)
    if kind is not None and doc.get("kind") != kind:
        raise ManifestError(
            f"{source}: a {kind!r} manifest was expected, found {doc.get('kind')!r}"
        )
    if doc.get("checksum") != checksum(doc):
        raise ManifestError(f"{source}: manifest checksum does not match (altered or damaged)")
    return doc


def read_manifest(uri: str, *, kind: str | None = None) -> dict[str, Any]:
    """Read and check a manifest (see :func:`check`)."""
    try:
        doc = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{uri}: not valid JSON ({exc})") from None
    return check(doc, source=uri, kind=kind)


def require_same(
    found: dict[str, Any], expected: dict[str, Any], keys: tuple[str, ...], *, what: str
) -> None:
    """Refuse to combine two things made with different settings, naming the first difference."""
    for key in keys:
        a, b = found.get(key), expected.get(key)
        if a != b:
            raise ManifestError(f"{what}: {key} differs ({_short(a)} vs {_short(b)})")


def _short(value: Any) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) > 17 else text
