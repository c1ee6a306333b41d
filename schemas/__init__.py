"""Versioned table schemas of the project, defined once as JSON next to this file.

The JSON files are the contract (readable from any language); this module turns them into
Arrow schemas and checks what readers are handed. Every Parquet file we write carries
``cbir.schema`` and ``cbir.schema_version`` in its metadata so a reader can refuse a file it does
not understand, naming the mismatch, instead of misreading it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_DIR = Path(__file__).resolve().parent
METADATA_NAME = b"cbir.schema"
METADATA_VERSION = b"cbir.schema_version"
METADATA_DIM = b"cbir.descriptor_dim"

# The versions this code writes.
CURRENT_VERSIONS = {
    "descriptors": 2,
    "errors": 1,
    "idmap": 1,
    "manifest": 2,
    "plan_refs": 2,
    "plan_shards": 1,
    "local_features": 2,
}

# Older versions this code still reads (each is a subset of the current one: readers of an
# older file see the columns it has; ``descriptors`` v1 has no ``notes``, ``plan_refs`` v1 no
# ``sealed``; ``local_features`` v1 is Parquet whose descriptors are float16 or float32).
OLDER_READABLE_VERSIONS = {"descriptors": (1,), "plan_refs": (1,), "local_features": (1,)}


def readable_versions(name: str) -> tuple[int, ...]:
    return (*OLDER_READABLE_VERSIONS.get(name, ()), CURRENT_VERSIONS[name])


class SchemaMismatchError(ValueError):
    """A table or manifest does not match the schema version this code understands."""


@cache
def definition(name: str, version: int | None = None) -> dict[str, Any]:
    """The JSON definition of schema ``name`` (current version unless given)."""
    version = CURRENT_VERSIONS[name] if version is None else version
    path = SCHEMA_DIR / f"{name}.v{version}.json"
    if not path.exists():
        raise SchemaMismatchError(f"unknown schema {name!r} version {version}")
    return json.loads(path.read_text())


_SIMPLE_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
}


_LIST_TYPES = {"list<float32>": pa.list_(pa.float32())}
_DESCRIPTOR_ELEMENTS = {
    "float16": pa.float16(),
    "float32": pa.float32(),
    "q15": pa.uint8(),
    "int8": pa.int8(),
}
# Local descriptor column types (by schema version) -> the stored dtypes they hold.
_ELEMENT_CHOICES = {
    "list<float16|float32>": ("float16", "float32"),
    "list<float16|float32|uint8|int8>": ("float16", "float32", "q15", "int8"),
}


def _arrow_type(field: dict[str, Any], dim: int | None, element: str | None = None) -> pa.DataType:
    if field["type"] in _LIST_TYPES:
        return _LIST_TYPES[field["type"]]
    if field["type"] in _ELEMENT_CHOICES:
        if element not in _ELEMENT_CHOICES[field["type"]]:
            raise ValueError(
                f"schema field {field['name']!r} of type {field['type']} cannot hold {element}"
            )
        return pa.list_(_DESCRIPTOR_ELEMENTS[element])
    if field["type"] == "fixed_size_list<float32>":
        if dim is None:
            raise ValueError(f"schema field {field['name']!r} needs the descriptor dimension")
        return pa.list_(pa.float32(), dim)
    return _SIMPLE_TYPES[field["type"]]


def arrow_schema(
    name: str, *, dim: int | None = None, element: str | None = None, version: int | None = None
) -> pa.Schema:
    """The Arrow schema of table ``name`` at its current version or ``version`` (``dim`` for
    descriptors; also ``element``, float16 or float32, for local features)."""
    spec = definition(name, version)
    fields = [
        pa.field(f["name"], _arrow_type(f, dim, element), nullable=f["nullable"])
        for f in spec["fields"]
    ]
    metadata = {METADATA_NAME: name.encode(), METADATA_VERSION: str(spec["version"]).encode()}
    if dim is not None:
        metadata[METADATA_DIM] = str(dim).encode()
    return pa.schema(fields, metadata=metadata)


def descriptor_dim(schema: pa.Schema) -> int:
    """Descriptor dimension recorded in a descriptors table's schema."""
    field = schema.field("descriptor")
    if not pa.types.is_fixed_size_list(field.type):
        raise SchemaMismatchError(
            f"descriptor column has type {field.type}, expected a fixed-size list"
        )
    return field.type.list_size


def local_descriptor_element(schema: pa.Schema) -> str:
    """float16, float32, q15 or int8: the stored dtype of a local-feature descriptors column."""
    field_type = schema.field("descriptors").type
    if pa.types.is_list(field_type):
        for name, arrow in _DESCRIPTOR_ELEMENTS.items():
            if field_type.value_type.equals(arrow):
                return name
    raise SchemaMismatchError(
        f"local descriptors column has type {field_type}, expected a list of float16, float32, "
        "uint8 or int8"
    )


def check_schema(name: str, schema: pa.Schema, *, source: str = "table") -> None:
    """Raise :class:`SchemaMismatchError` unless ``schema`` is a version of ``name`` we read."""
    meta = schema.metadata or {}
    found_name = meta.get(METADATA_NAME, b"").decode() or None
    found_version = meta.get(METADATA_VERSION, b"").decode() or None
    if found_name != name:
        raise SchemaMismatchError(
            f"{source}: expected a {name!r} table, found schema {found_name!r}"
        )
    readable = readable_versions(name)
    if found_version not in {str(v) for v in readable}:
        raise SchemaMismatchError(
            f"{source}: {name!r} schema version {found_version} is not supported "
            f"(this code reads version{'s' if len(readable) > 1 else ''} "
            f"{', '.join(map(str, readable))})"
        )
    dim = descriptor_dim(schema) if name == "descriptors" else None
    element = local_descriptor_element(schema) if name == "local_features" else None
    if name == "local_features":
        dim = int((schema.metadata or {}).get(METADATA_DIM, b"0"))
    expected = arrow_schema(name, dim=dim, element=element, version=int(found_version))
    for field in expected:
        if field.name not in schema.names:
            raise SchemaMismatchError(f"{source}: missing column {field.name!r}")
        if not schema.field(field.name).type.equals(field.type):
            raise SchemaMismatchError(
                f"{source}: column {field.name!r} has type {schema.field(field.name).type}, "
                f"expected {field.type}"
            )


def check_manifest_version(manifest: dict[str, Any], *, source: str = "manifest") -> None:
    """Refuse a manifest written by an incompatible version of the code."""
    version = manifest.get("schema_version")
    if version != CURRENT_VERSIONS["manifest"]:
        raise SchemaMismatchError(
            f"{source}: manifest schema version {version!r} is not supported "
            f"(this code reads version {CURRENT_VERSIONS['manifest']})"
        )
