"""Reading and writing URIs (local paths, gs://, s3://, anything fsspec knows), with retries.

Everything in the project that touches storage goes through these few functions, so runners and
stages never care where data lives. Object stores are flaky at scale, so this module is the one
retry layer: transient errors (connection resets, timeouts, 5xx / 429 answers, short reads) are
retried with exponential backoff and full jitter, a bounded number of times; permanent errors
("not found", "permission denied", over the size limit, a full disk or quota, a read-only file
system, a symbolic link loop, a local path that is not a regular file) and programming errors
(``TypeError``, ``KeyError``, ...) are raised at once, because waiting does not fix them. The
clients' own retry loops are turned off (gcsfs) or down to a single attempt (s3fs, botocore), so
attempts do not multiply (5 here x 6 in gcsfs x ... was up to ~30 attempts per read). A write
that the storage refuses for good (disk full, ...) raises :class:`StorageRefusedError`, which
names the URI and leaves no temporary file behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import posixpath
import random
import shutil
import stat
import time
import types
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

import schemas
from retrieval import checksums
from retrieval.redaction import has_credentials, redact

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that retrying cannot fix (checked before anything else).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
# Client-library error classes (by name, so this module imports none of the clients) that mean
# the request may succeed if sent again.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ClientPayloadError",  # aiohttp: body shorter than announced, broken chunked encoding
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ChecksumError",  # gcsfs: the bytes read do not match the object's checksum
        "EndpointConnectionError",  # botocore
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ProtocolError",  # urllib3
    }
)
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# OS errors that end the run instead of being retried: waiting frees no disk, grants no
# permission and unties no link loop. (Python raises most of these as a plain OSError, which
# would otherwise count as transient below.) errno -> how a person reads it.
FINAL_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "symbolic link loop",
}
_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "503"}
)
DEFAULT_ATTEMPTS = 5


def is_transient(exc: BaseException) -> bool:
    """True if sending the same request again may succeed (see the module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (*PERMANENT_ERRORS, FileTooLargeError, NotARegularFileError)):
            # fsspec's HTTP filesystem reports every failed request as "not found"
            # (``raise FileNotFoundError(url) from exc``): a refused connection or a 503 would
            # become a permanent miss. Its explicit cause decides (a real 404 has none, or a
            # 404 answer as its cause).
            cause = current.__cause__
            missing = isinstance(current, FileNotFoundError)
            return missing and cause is not None and is_transient(cause)
        if isinstance(current, OSError) and current.errno in FINAL_ERRNOS:
            return False
        if isinstance(current, ConnectionError | TimeoutError | asyncio.TimeoutError):
            return True
        if isinstance(current, http.client.IncompleteRead | http.client.RemoteDisconnected):
            return True
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & _TRANSIENT_CLASS_NAMES:
            return True
        status = None
        if names & {"HttpError", "ClientResponseError"}:
            status = getattr(current, "status", None) or getattr(current, "code", None)
        if isinstance(status, int):
            return status in _TRANSIENT_STATUS
        if "ClientError" in names and hasattr(current, "response"):  # botocore
            code = str(current.response.get("Error", {}).get("Code", ""))
            return code in _TRANSIENT_S3_CODES
        if type(current) is OSError:  # s3fs turns unknown service errors into plain EIO
            return True
        current = current.__cause__ or current.__context__
    return False


def final_reason(exc: BaseException) -> str | None:
    """How a person reads an OS error that ends the run (disk full, quota, read-only, ...), or
    None for any other error."""
    if isinstance(exc, OSError) and exc.errno in FINAL_ERRNOS:
        return f"{FINAL_ERRNOS[exc.errno]} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return None


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = DEFAULT_ATTEMPTS,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> T:
    """Call ``fn``; retry it on transient errors, up to ``attempts`` calls in all, waiting
    ``base * 2**n`` seconds (capped at ``max_delay_s``, with full jitter) in between."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                redact(what),
                type(exc).__name__,
                redact(str(exc))[:300],
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# Seconds a request may wait to connect, or wait for its next bytes, before it fails as a
# timeout (transient: retried here). Without it a stalled connection holds a worker for minutes
# (aiohttp's 5-minute total under gcsfs). It bounds stalls, not transfers: a large upload that
# keeps moving is never cut. RETRIEVAL_STORAGE_TIMEOUT_S overrides it (slow links, tests).
DEFAULT_REQUEST_TIMEOUT_S = 60.0
TIMEOUT_ENV = "RETRIEVAL_STORAGE_TIMEOUT_S"


def request_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    return float(value) if value else DEFAULT_REQUEST_TIMEOUT_S


def _client_options(protocol: str) -> dict[str, Any]:
    """Options that make each client try a request once (retrying is this module's job;
    botocore's legacy mode counts retries: 0 = a single attempt, its standard mode still sent
    two here) and give up on a stalled request after :func:`request_timeout_s`."""
    timeout = request_timeout_s()
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "retries": {"max_attempts": 0, "mode": "legacy"},
                "connect_timeout": timeout,
                "read_timeout": timeout,
            }
        }
    if protocol in ("gs", "gcs"):
        import aiohttp  # gcsfs's HTTP client

        return {
            "requests_timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=timeout, sock_read=timeout
            )
        }
    if protocol in ("http", "https"):
        import aiohttp  # fsspec's HTTP client

        stalls = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        # Given here, client_kwargs replaces the whole dict of fsspec's configuration
        # (FSSPEC_HTTP: where users put their Authorization header), so that one is kept.
        configured = fsspec.config.conf.get(protocol, {}).get("client_kwargs", {})
        return {"client_kwargs": {**configured, "timeout": stalls}}
    return {}


_GCSFS_RETRYING_METHODS = ("_request", "_get_file_request", "_get_file_concurrent")


def _single_attempt(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """Turn off the client's own retry loop on this (cached) instance.

    s3fs reads its attempt count from the instance (botocore's is set by ``config_kwargs``).
    gcsfs wraps its request methods in a retry decorator (6 attempts) whose count is fixed when
    the class is defined; the undecorated methods are kept as ``__wrapped__``.
    """
    module = type(fs).__module__
    if module.startswith("s3fs"):
        fs.retries = 1
    if module.startswith("gcsfs") and not getattr(fs, "_cbir_single_attempt", False):
        for name in _GCSFS_RETRYING_METHODS:
            method = getattr(type(fs), name, None)
            inner = getattr(method, "__wrapped__", None)
            if inner is not None:
                setattr(fs, name, types.MethodType(inner, fs))
        fs._cbir_single_attempt = True
    return fs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` (client retries off, stall timeout set) and the path
    within it."""
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if has_credentials(uri):
        raise CredentialsInURIError(
            f"{redact(uri)}: credentials in a URI are refused (they would be copied into plans, "
            "shards, results and logs); give them to the store's client instead: AWS_* / "
            "GOOGLE_APPLICATION_CREDENTIALS and profiles for s3:// and gs://, fsspec's "
            "configuration for http(s):// (README, Failure handling: secrets)"
        )
    try:
        fs, path = url_to_fs(uri, **_client_options(protocol))
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ValueError) and "Protocol not known" not in str(exc):
            raise
        raise UnsupportedURIError(
            f"{redact(uri)}: unknown or unavailable URI scheme {protocol + '://'!r} ({exc}); "
            "use a local path, gs://, s3:// or another installed fsspec protocol"
        ) from None
    return _single_attempt(fs), path


class UnsupportedURIError(ValueError):
    """A URI whose scheme no installed filesystem handles."""


class CredentialsInURIError(ValueError):
    """A URI with user info (``scheme://user:password@...``): see ``retrieval.redaction``."""


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
    """Read a whole object. With ``max_bytes``, raise ``FileTooLargeError`` beyond that size.

    A local path must be a regular file (:func:`open_local`): a FIFO would block forever.
    """

    def read() -> bytes:
        fs, path = filesystem(uri)
        opened = open_local(path) if _is_local_fs(fs) else fs.open(path, "rb")
        with opened as f:
            if max_bytes is None:
                return f.read()
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise FileTooLargeError(f"{uri}: larger than the {max_bytes}-byte limit")
            return data

    return with_retries(read, what=f"read {uri}")


class NotARegularFileError(OSError):
    """A local path that is a FIFO, a device, a socket or a folder, not a regular file."""


def open_local(path: str) -> IO[bytes]:
    """Open a local regular file for reading; anything else raises
    :class:`NotARegularFileError` without blocking.

    Opening a FIFO waits for a writer (forever, in a corpus) and a device may act on being
    opened, so the type is checked before opening (symbolic links followed: a link to a FIFO
    is a FIFO), and again on the open descriptor, opened non-blocking, in case the path was
    swapped in between. A symbolic link loop raises ``OSError(ELOOP)`` (final, not retried).
    """
    kind = _file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotARegularFileError(f"{path}: not a regular file ({kind})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # not inherited (PEP 446)
    try:
        kind = _file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotARegularFileError(f"{path}: not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str | None:
    """None for a regular file, else what the path is, in words."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((word for test, word in kinds if test(mode)), "not a regular file")


class FileTooLargeError(ValueError):
    """An input is over the configured byte limit (checked before it is fully read)."""


class StorageRefusedError(OSError):
    """A write that storage refused for good (disk full, over quota, read-only, no permission):
    final for the run, reported in one line that names the URI (``str`` is the message)."""

    def __init__(self, uri: str, exc: OSError) -> None:
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "free some space (or write elsewhere)"
        elif code == errno.ELOOP:
            hint = "fix the symbolic link"
        else:
            hint = "fix the permissions (or write elsewhere)"
        message = (
            f"{redact(uri)}: {final_reason(exc) or exc.strerror or exc}; the run stopped, "
            f"nothing was retried: {hint} and run it again, what was committed is kept"
        )
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def refused_for_good(uri: str) -> Iterator[None]:
    """Turn an OS error that ends the run (:data:`FINAL_ERRNOS`) into a
    :class:`StorageRefusedError` naming ``uri`` (a bare ENOSPC names no file)."""
    try:
        yield
    except StorageRefusedError:
        raise
    except OSError as exc:
        if final_reason(exc) is None:
            raise
        raise StorageRefusedError(uri, exc) from exc


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of an object: one ranged request on object stores,
    a seek and a read on a local disk. A short answer (the object is smaller than expected) is
    an error, not a silently shorter result."""

    def read() -> bytes:
        fs, path = filesystem(uri)
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise checksums.ChecksumMismatchError(
                f"{uri}: bytes {start}-{end} asked, {len(data)} read (the file is shorter)"
            )
        return data

    return with_retries(read, what=f"read {uri} [{start}:{end}]")


def publish_local(
    path: str,
    fill: Callable[[IO[bytes]], Any],
    publish: Callable[[str, str], None] = os.replace,
) -> None:
    """Write a local file whole or not at all: ``fill`` writes a temporary file beside
    ``path``, which is flushed to disk and then published under ``path`` (``os.replace``, or
    ``os.link`` for a create that fails if ``path`` exists). The temporary file is removed
    whatever happens (a full disk must not fill up further)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        _remove_quietly(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically: readers see the old state or the whole new object.

    Object stores publish a PUT atomically; on a local disk we write a temporary file and rename
    it, so a crash never leaves a half-written manifest or shard that looks complete. The
    temporary file is removed whenever the write fails (a full disk must not fill up further).
    """

    def write() -> None:
        fs, path = filesystem(uri)
        if _is_local_fs(fs):
            publish_local(path, lambda f: f.write(data))
        else:
            with fs.open(path, "wb") as f:
                f.write(data)

    with refused_for_good(uri):
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
        raise checksums.mismatch(uri)
    table = pq.read_table(io.BytesIO(data))
    if schema is not None:
        schemas.check_schema(schema, table.schema, source=uri)
    return table


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), what=f"stat {uri}")


def is_dir(uri: str) -> bool:
    """True if ``uri`` is a folder (a prefix with objects under it, on object stores)."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.isdir(path), what=f"stat {uri}")


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if _is_local_fs(fs):
        with refused_for_good(uri):
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


def list_folders(uri: str) -> list[str]:
    """The folders (object-store prefixes) directly under ``uri``, as full URIs, sorted; none
    when ``uri`` does not exist."""
    fs, path = filesystem(uri)

    def ls() -> list[str]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True)
        return [
            e["name"]
            for e in entries
            if e["type"] == "directory" and e["name"].rstrip("/") != path.rstrip("/")
        ]

    return sorted(with_scheme(fs, p.rstrip("/")) for p in with_retries(ls, what=f"list {uri}"))


LIST_THREADS = 8  # folders (prefixes) listed at once by iter_files


def iter_files(
    prefix: str, suffixes: Iterable[str] | None = None, *, threads: int = LIST_THREADS
) -> Iterator[str]:
    """Files under ``prefix`` (recursively), as full URIs, in no particular order, streamed.

    One folder (object-store prefix) is listed per request, up to ``threads`` at a time, and its
    files are yielded before the next ones are asked for, so memory holds a few folders'
    listings, never the corpus's (:func:`list_files` holds it all, sorted). Listings are not
    kept in fsspec's listing cache, which would otherwise grow with the corpus.
    """
    fs, path = filesystem(prefix)
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    fs.invalidate_cache()

    def ls(folder: str) -> tuple[list[str], list[str]]:
        entries = with_retries(
            lambda: fs.ls(folder, detail=True), what=f"list {with_scheme(fs, folder)}"
        )
        fs.invalidate_cache(folder)
        files, folders = [], []
        for entry in entries:
            name = entry["name"]
            if entry["type"] == "directory":
                if name.rstrip("/") != folder.rstrip("/"):  # some stores list the prefix itself
                    folders.append(name)
            elif not wanted or name.lower().endswith(wanted):
                files.append(name)
        return files, folders

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="list") as pool:
        running = collections.deque([pool.submit(ls, path)])
        waiting: collections.deque[str] = collections.deque()
        while running:
            files, folders = running.popleft().result()
            waiting.extend(folders)
            while waiting and len(running) < 2 * threads:
                running.append(pool.submit(ls, waiting.popleft()))
            for name in files:
                yield with_scheme(fs, name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of an object, streamed."""
    fs, path = filesystem(uri)

    def digest() -> str:
        hashed = hashlib.sha256()
        with open_local(path) if _is_local_fs(fs) else fs.open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                hashed.update(chunk)
        return hashed.hexdigest()

    return with_retries(digest, what=f"read {uri}")


def local_copy(uri: str, directory: str) -> str:
    """Copy a file or folder to a local directory (for libraries that only read local paths)."""
    fs, path = filesystem(uri)
    if _is_local_fs(fs):
        return path
    name = posixpath.basename(path.rstrip("/"))
    if redact(name) != name:  # a signed URL's query: its signature must not name a file
        name = name.split("?", 1)[0] or "copy"
    target = os.path.join(directory, name)
    if _is_web_fs(fs):
        # An http(s) URL names one file: ``get`` would take it for a folder (a page of links)
        # and file the copy under the URL's last part, a signed URL's signature included.
        with_retries(lambda: fs.get_file(path, target), what=f"copy {uri}")
    else:
        with_retries(lambda: fs.get(path, target, recursive=True), what=f"copy {uri}")
    return target


def _is_web_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"http", "https"} & set(protocols))


def upload(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` (streamed by fsspec; atomic rename on a local disk, the
    temporary file removed if the copy fails)."""
    fs, path = filesystem(uri)
    with refused_for_good(uri):
        if not _is_local_fs(fs):
            with_retries(lambda: fs.put_file(local_path, path), what=f"upload {uri}")
            return
        with open(local_path, "rb") as src:
            publish_local(path, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))


def remove(uri: str, *, recursive: bool = False) -> None:
    """Delete an object (or a folder with ``recursive``); a missing one is not an error."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        with_retries(lambda: fs.rm(path, recursive=recursive), what=f"remove {uri}")
