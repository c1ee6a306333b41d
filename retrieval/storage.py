"""Reading and writing URIs (local paths, gs://, s3://, anything fsspec knows), with retries.

Everything in the project that touches storage goes through these few functions, so runners and
stages never care where data lives. Object stores are flaky at scale: transient errors are retried
with exponential backoff and jitter; "not found" and "permission denied" are not retried because
waiting does not fix them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

import schemas

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that retrying cannot fix.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
)


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:  # object-store clients raise many unrelated types
            if attempt == attempts:
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    return url_to_fs(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of ``base``."""
    if is_local(base) and not base.startswith("file://"):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def with_scheme(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fsspec path back into a full URI (``bucket/key`` -> ``s3://bucket/key``)."""
    return fs.unstrip_protocol(path) if not _is_local_fs(fs) else path


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
    """Read a whole object. With ``max_bytes``, raise ``FileTooLargeError`` beyond that size."""

    def read() -> bytes:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            if max_bytes is None:
                return f.read()
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise FileTooLargeError(f"{uri}: larger than the {max_bytes}-byte limit")
            return data

    return with_retries(read, what=f"read {uri}")


class FileTooLargeError(ValueError):
    """An input is over the configured byte limit (checked before it is fully read)."""


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically: readers see the old state or the whole new object.

    Object stores publish a PUT atomically; on a local disk we write a temporary file and rename
    it, so a crash never leaves a half-written manifest or shard that looks complete.
    """

    def write() -> None:
        fs, path = filesystem(uri)
        if _is_local_fs(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open(path, "wb") as f:
                f.write(data)

    with_retries(write, what=f"write {uri}")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_parquet(
    uri: str, table: pa.Table, *, compression: str = "zstd", row_group_size: int | None = None
) -> bytes:
    """Write an Arrow table as one Parquet object; returns its bytes (for manifest checksums)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size)
    data = sink.getvalue()
    write_bytes(uri, data)
    return data


def read_parquet(
    uri: str, *, schema: str | None = None, expect_sha256: str | None = None
) -> pa.Table:
    """Read one Parquet object; optionally check its checksum and its project schema."""
    data = read_bytes(uri)
    if expect_sha256 is not None and sha256_bytes(data) != expect_sha256:
        raise OSError(f"{uri}: checksum does not match its manifest (partial or altered file)")
    table = pq.read_table(io.BytesIO(data))
    if schema is not None:
        schemas.check_schema(schema, table.schema, source=uri)
    return table


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), what=f"stat {uri}")


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if _is_local_fs(fs):
        os.makedirs(path, exist_ok=True)


def list_files(prefix: str, *, suffixes: Iterable[str] | None = None) -> list[str]:
    """All files under ``prefix`` (recursively), as full URIs, sorted; optionally by suffix."""
    fs, path = filesystem(prefix)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None

    def find() -> list[str]:
        fs.invalidate_cache()
        return fs.find(path)

    found = with_retries(find, what=f"list {prefix}")
    uris = [with_scheme(fs, p) for p in found if not wanted or p.lower().endswith(wanted)]
    return sorted(uris)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of an object, streamed."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(uri: str, directory: str) -> str:
    """Copy a file or folder to a local directory (for libraries that only read local paths)."""
    fs, path = filesystem(uri)
    if _is_local_fs(fs):
        return path
    target = os.path.join(directory, posixpath.basename(path.rstrip("/")))
    with_retries(lambda: fs.get(path, target, recursive=True), what=f"copy {uri}")
    return target


def upload(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` (streamed by fsspec; atomic rename on a local disk)."""
    fs, path = filesystem(uri)
    if _is_local_fs(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.put_file(local_path, path), what=f"upload {uri}")


def remove(uri: str, *, recursive: bool = False) -> None:
    """Delete an object (or a folder with ``recursive``); a missing one is not an error."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)
