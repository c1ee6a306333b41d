"""What to index: listing a corpus into image references and cutting it into shards.

Image ids are stable across runs and machines: the path relative to the corpus root, extension
included, with '/' separators (or the id column of a manifest). Keeping the extension makes ids
unique by construction: ``photo.webp`` and ``photo.tiff`` in one folder are two images. An id
never climbs (no ``..`` segment): an input outside the root (an absolute path elsewhere, another
bucket or store) gets its path within its own store (``/data/x.jpg``, ``bucket/photos/x.jpg``);
an ``http(s)://`` input's id leaves out the query string (signatures, expiry times: none of it
names the image). Shards are cut from the id-sorted listing, so the same listing always maps to
the same shard ids, and a shard's ``input_digest`` says whether a committed shard still describes
the same inputs.

A manifest row the listing refuses (an empty or unsafe ``uri``, a reserved or climbing ``id``)
claims no image id: it is kept, so it is accounted for as an error row, under the id
``!refused/row-N`` (N: its row number in the manifest, from 1, header not counted). Ids that
start with ``!refused/`` are themselves refused, so these ids can never be a real image's, and
a valid row is never reported as a duplicate of a refused one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from retrieval import storage
from retrieval.external_sort import sort_refs
from retrieval.image_refs import ImageRef, listed_ref
from retrieval.redaction import SealError, has_credentials, unseal

REFUSED_ID_PREFIX = "!refused/"  # ids of refused manifest rows (see the module doc)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".csv", ".parquet")
MANIFEST_BATCH_ROWS = 8_192  # manifest rows read at a time
# A manifest column of URIs sealed by this run (``retrieval reindex`` hands the images it
# re-extracts to ``extract`` in a manifest, their secrets sealed, never in clear).
SEALED_COLUMN = "sealed_uri"


@dataclass(frozen=True)
class ShardSpec:
    """A unit of work: a deterministic shard id and the inputs it owns."""

    shard_id: str
    refs: tuple[ImageRef, ...]

    @property
    def input_digest(self) -> str:
        """SHA-256 over the (id, uri) pairs; a committed shard with another digest is stale."""
        h = hashlib.sha256()
        for ref in self.refs:
            h.update(f"{ref.id}\t{ref.uri}\n".encode())
        return h.hexdigest()


def _id_path(uri: str) -> str:
    """The path an id is made of: ``uri`` without its scheme, with '/' separators; for
    ``http(s)://``, also without user info, query string or fragment (signatures, expiry times
    and cache keys change while the image does not)."""
    if "://" not in uri:
        return uri.replace("\\", "/")
    scheme, rest = uri.split("://", 1)
    if scheme.lower() in _WEB_SCHEMES:
        rest = rest.split("#", 1)[0].split("?", 1)[0]
        authority, slash, tail = rest.partition("/")
        rest = authority.rpartition("@")[2] + slash + tail
    return rest.replace("\\", "/")


_WEB_SCHEMES = ("http", "https")


def without_query(uri: str) -> str:
    """``uri`` less the query string and fragment of an ``http(s)://`` URL (a signed URL's
    signature); other URIs as given (``?`` may be part of an object key or a file name)."""
    if "://" in uri and uri.split("://", 1)[0].lower() in _WEB_SCHEMES:
        return uri.split("#", 1)[0].split("?", 1)[0]
    return uri


def image_id(uri: str, root: str) -> str:
    """Path of ``uri`` relative to ``root``, extension included, with '/' separators; for an
    input outside ``root``, its path within its own store (never a climbing ``../`` path)."""
    path = _id_path(uri)
    root_store, root_path, prefix = _root_prefix(root)
    store = _store(uri)
    if store != root_store:
        # ``gs://b/x.jpg`` in a local manifest: relpath between a bucket path and a local one
        # would go through the current folder, giving ids that change with the folder the
        # launcher runs in; the id is the path within its own store.
        return _store_path(path, store)
    # Fast path, the usual case (a listing or manifest of paths under the root): the path is the
    # root's prefix followed by an already-normal relative path, which is what relpath would
    # return. relpath itself costs ~40 us an entry (two abspath calls, each a getcwd): 40 s of
    # the 1M-entry planning.
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        if rest and rest[0] != "/" and posixpath.normpath(rest) == rest and not _climbs(rest):
            return rest
    relative = posixpath.relpath(path, root_path)
    # Outside the root: a climbing id (``../../etc/x.jpg``) would change with where the root
    # is and could meet an id inside it; the input's own path cannot.
    return _store_path(path, store) if _climbs(relative) else relative


def _store_path(path: str, store: str) -> str:
    """``path`` as an id within its store, with no ``.`` or ``..`` segment: a bucket key
    (``..`` cannot climb above the bucket) or an absolute local path."""
    if store:
        return posixpath.normpath("/" + path).lstrip("/")
    if not _is_absolute_local(path):
        path = posixpath.abspath(path)  # only direct callers pass relative paths; listings don't
    return posixpath.normpath(path)


def _is_absolute_local(path: str) -> bool:
    return path.startswith("/") or (len(path) > 1 and path[1] == ":")  # also C:/...


@functools.lru_cache(maxsize=64)
def _root_prefix(root: str) -> tuple[str, str, str]:
    """``root``'s store, its path as :func:`posixpath.relpath` is given it, and the prefix of
    its entries."""
    root_path = _id_path(root).rstrip("/") or "/"
    normal = posixpath.normpath(root_path)
    return _store(root), root_path, normal if normal.endswith("/") else normal + "/"


def _store(uri: str) -> str:
    """The URI's scheme (``gs``, ``s3``), or "" for the local disk (a path or ``file://``)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return "" if scheme == "file" else scheme


def _climbs(relative: str) -> bool:
    return relative == ".." or relative.startswith("../")


def list_corpus(source: str) -> list[ImageRef]:
    """The images of a corpus, sorted by id, as one list (see :func:`iter_corpus`).

    For small corpora and callers that need random access (the calibration sample); planning an
    extraction streams with :func:`iter_corpus` instead.
    """
    return list(iter_corpus(source))


def iter_corpus(source: str, *, scratch: str | None = None) -> Iterator[ImageRef]:
    """The images of a corpus, sorted by id (then URI), streamed in bounded memory.

    ``source`` is either a prefix (local folder, ``gs://bucket/dir``, ``s3://bucket/dir``) listed
    recursively for image files, or a manifest file (CSV with a ``uri`` column and an optional
    ``id`` column, or Parquet with the same columns). Relative URIs in a manifest are resolved
    against the manifest's folder and must stay inside it (see :func:`resolve_manifest_uri`).
    Two inputs with the same id cannot both be indexed: every one
    after the first (in URI order) is kept with a ``duplicate_id`` problem so it is reported, not
    dropped.

    Neither the listing nor the manifest is held whole: entries are read in batches and sorted
    with an external sort (:mod:`retrieval.external_sort`, spilling to ``scratch``), and
    duplicates are found between neighbours of the sorted stream.
    """
    return mark_duplicates(sort_refs(iter_listing(source), scratch=scratch))


def iter_listing(source: str) -> Iterator[ImageRef]:
    """The corpus's image references in no particular order (one listing pass, streamed)."""
    if is_manifest(source) and not storage.is_dir(source):
        return _iter_manifest(source)
    if not storage.exists(source):
        raise FileNotFoundError(f"{source}: no such folder or prefix")
    return (listed_ref(image_id(u, source), u) for u in storage.iter_files(source, IMAGE_SUFFIXES))


def is_manifest(source: str) -> bool:
    """Whether ``source`` names a manifest file (by its suffix; a signed URL's query aside)."""
    return without_query(source).lower().endswith(MANIFEST_SUFFIXES)


def _manifest_rows(uri: str, local_path: str) -> Iterator[dict]:
    """The rows of a manifest file (a local copy of ``uri``), a batch at a time."""
    if without_query(uri).lower().endswith(".parquet"):
        # One row group at a time, not pre-buffered: pre-buffering reads every row group's
        # column chunks up front (memory growing with the manifest). A row group is decoded
        # whole, so memory is bounded by the manifest's largest row group.
        parquet = pq.ParquetFile(local_path, pre_buffer=False)
        names = parquet.schema_arrow.names
        columns = [c for c in ("uri", "id", SEALED_COLUMN) if c in names]
        if parquet.metadata.num_rows and "uri" not in names:
            raise ValueError(f"{uri}: a manifest needs a 'uri' column (found {sorted(names)})")
        for group in range(parquet.metadata.num_row_groups):
            batches = parquet.iter_batches(
                MANIFEST_BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False
            )
            for batch in batches:
                yield from batch.to_pylist()
        return
    with open(local_path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if "uri" not in row:
                    raise ValueError(
                        f"{uri}: a manifest needs a 'uri' column (found {sorted(row)})"
                    )
                yield row
        except csv.Error as exc:
            # A field over the csv module's limit (128 KiB), a NUL byte, ...: the reader stops
            # inside a row it cannot delimit, and what follows (the rest of an unterminated
            # quoted field, a binary file) would be read as invented rows. No URI is that long:
            # the file is not a manifest, or is damaged, so the listing stops with its line.
            # line_num counts the lines of the rows read whole: the failing row starts next.
            raise ValueError(f"{uri}: line {reader.line_num + 1}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{uri}: line {reader.line_num + 1}: not UTF-8 text ({exc.reason})"
            ) from None


def _iter_manifest(uri: str) -> Iterator[ImageRef]:
    remote = "://" in uri and not uri.lower().startswith("file://")
    if remote:  # a signed manifest URL: its folder is the URL's path, not its query string
        base = posixpath.dirname(without_query(uri))
    else:
        base = storage.filesystem(uri)[1].rsplit("/", 1)[0]
    # A remote manifest is copied to local scratch first (with retries: a storage hiccup
    # mid-read must not end the listing), then streamed from there.
    with tempfile.TemporaryDirectory(prefix="retrieval-manifest-") as scratch:
        local_path = storage.local_copy(uri, scratch)
        for number, row in enumerate(_manifest_rows(uri, local_path), start=1):
            yield manifest_ref(row, number, base, remote=remote)


def refused_id(row: int) -> str:
    """The id of manifest row ``row`` (from 1) when the listing refuses it (see the module
    doc): unique within the manifest, and never a real image's."""
    return f"{REFUSED_ID_PREFIX}row-{row}"


def manifest_ref(row: dict, number: int, base: str, *, remote: bool) -> ImageRef:
    """The reference of manifest row ``number`` (``uri`` and optional ``id`` columns), with
    its URI resolved against the manifest's folder ``base``; a refused row gets the reserved
    id :func:`refused_id` and its problem, naming the row and the id it gave."""
    written = str(row.get("uri") or "").strip()
    given = row.get("id")
    given = "" if given is None else str(given).strip()
    problem = None
    if row.get(SEALED_COLUMN):
        try:
            written = unseal(row[SEALED_COLUMN])
        except SealError as exc:
            problem = f"unsafe_uri: {exc}"
    image_uri = written
    if problem is None:
        image_uri, problem = resolve_manifest_uri(written, base, remote=remote)
    ref_id = ""
    if problem is None:
        ref_id = given or image_id(image_uri, base)
        problem = _id_problem(ref_id)
    if problem is not None:
        where = f"row {number}" + (f", id {given!r}" if given else "")
        return listed_ref(refused_id(number), written, f"{problem} ({where})")
    return listed_ref(ref_id, image_uri)


def _id_problem(ref_id: str) -> str | None:
    if ref_id.startswith(REFUSED_ID_PREFIX):
        return f"unsafe_id: ids starting with {REFUSED_ID_PREFIX!r} are those of refused rows"
    if ".." in ref_id.replace("\\", "/").split("/"):
        return "unsafe_id: an id with a '..' segment"
    return None


def resolve_manifest_uri(written: str, base: str, *, remote: bool) -> tuple[str, str | None]:
    """Where a manifest entry points, or why it is refused (an ``unsafe_uri`` problem).

    One rule for every scheme:

    - a local path, bare or ``file://`` (``file://`` is only another spelling of a path):
      a relative one is resolved against the manifest's folder and must stay inside it
      (``../`` cannot climb out; ``file://../x.jpg`` is ``../x.jpg``); an absolute one
      (``/data/x.jpg``, ``file:///data/x.jpg``) is a path on the machine that runs the job,
      accepted in a local manifest, refused in one from object storage (a manifest in a bucket
      must not make workers read their own disks);
    - a URI of another scheme (``gs://``, ``s3://``, ``https://``) names its store and is taken
      as written, unless its path has a ``..`` segment (object stores would read the key
      literally, HTTP clients resolve it: neither reads what the entry seems to name);
    - no URI may carry credentials (``user:password@``): they would be copied into the plan,
      the shards and the logs (see :mod:`retrieval.redaction`); a signed URL's signature is
      fine (the listing seals it).
    """
    if not written:
        return written, "unsafe_uri: empty uri"
    if has_credentials(written):
        return written, (
            "unsafe_uri: credentials in the URI (user:password@); pass them through the "
            "environment or fsspec's configuration instead"
        )
    scheme = written.split("://", 1)[0].lower() if "://" in written else ""
    if scheme and scheme != "file":
        if _climbs_in_uri(written):
            return written, "unsafe_uri: a '..' segment in the URI's path"
        return written, None
    path = (written[len("file://") :] if scheme else written).replace("\\", "/")
    if _is_absolute_local(path):
        if remote:
            return written, "unsafe_uri: a local absolute path in a manifest from object storage"
        return written, None  # as written: file:///x.jpg and /x.jpg are read alike
    if remote and scheme:
        return written, "unsafe_uri: a file:// URI in a manifest from object storage"
    normal = posixpath.normpath(path)
    if _climbs(normal):
        return written, "unsafe_uri: a relative path that leaves the manifest's folder"
    return storage.join(base, normal), None


def _climbs_in_uri(uri: str) -> bool:
    """Whether the path of a ``scheme://authority/path`` URI has a ``..`` segment."""
    rest = uri.split("://", 1)[1].split("#", 1)[0].split("?", 1)[0]
    return ".." in rest.replace("\\", "/").split("/")[1:]


def mark_duplicates(refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
    """Give every input after the first with the same id a ``duplicate_id`` problem; ``refs``
    must be sorted by (id, uri), so same-id inputs are neighbours. A reference the listing
    refused never claims its id (a valid input with that id is not its duplicate)."""
    previous: ImageRef | None = None
    for ref in refs:
        if previous is not None and previous.id == ref.id and ref.problem is None:
            problem = f"duplicate_id: id {ref.id!r} is also {previous.uri}"
            ref = dataclasses.replace(ref, problem=problem, sealed=None)
        yield ref
        if ref.problem is None or ref.problem.startswith("duplicate_id:"):
            previous = ref


def iter_shards(refs: Iterable[ImageRef], shard_size: int) -> Iterator[ShardSpec]:
    """Cut the id-sorted listing into shards of at most ``shard_size`` inputs, streamed."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    batch: list[ImageRef] = []
    count = 0
    for ref in refs:
        batch.append(ref)
        if len(batch) == shard_size:
            yield ShardSpec(f"part-{count:05d}", tuple(batch))
            batch, count = [], count + 1
    if batch:
        yield ShardSpec(f"part-{count:05d}", tuple(batch))


def plan_shards(refs: list[ImageRef], shard_size: int) -> list[ShardSpec]:
    """Cut the id-sorted listing into shards of at most ``shard_size`` inputs."""
    return list(iter_shards(refs, shard_size))
