"""What to index: listing a corpus into image references and cutting it into shards.

Image ids are stable across runs and machines: the path relative to the corpus root, extension
included, with '/' separators (or the id column of a manifest). Keeping the extension makes ids
unique by construction: ``photo.webp`` and ``photo.tiff`` in one folder are two images. Shards are
cut from the id-sorted listing, so the same listing always maps to the same shard ids, and a
shard's ``input_digest`` says whether a committed shard still describes the same inputs.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from retrieval import storage
from retrieval.external_sort import sort_refs
from retrieval.image_refs import ImageRef

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".csv", ".parquet")
MANIFEST_BATCH_ROWS = 8_192  # manifest rows read at a time


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


def _strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def image_id(uri: str, root: str) -> str:
    """Path of ``uri`` relative to ``root``, extension included, with '/' separators."""
    path = _strip_scheme(uri).replace("\\", "/")
    root_store, root_path, prefix = _root_prefix(root)
    if _store(uri) != root_store and path.startswith("/") != root_path.startswith("/"):
        # ``gs://b/x.jpg`` in a local manifest: relpath between a bucket path and a local one
        # would go through the current folder, giving ids that change with the folder the
        # launcher runs in; the id is the path within its own store.
        return posixpath.normpath(path)
    # Fast path, the usual case (a listing or manifest of paths under the root): the path is the
    # root's prefix followed by an already-normal relative path, which is what relpath would
    # return. relpath itself costs ~40 us an entry (two abspath calls, each a getcwd): 40 s of
    # the 1M-entry planning.
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        if rest and rest[0] != "/" and posixpath.normpath(rest) == rest and not _climbs(rest):
            return rest
    return posixpath.relpath(path, root_path)


@functools.lru_cache(maxsize=64)
def _root_prefix(root: str) -> tuple[str, str, str]:
    """``root``'s store, its path as :func:`posixpath.relpath` is given it, and the prefix of
    its entries."""
    root_path = _strip_scheme(root).replace("\\", "/").rstrip("/") or "/"
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
    if source.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_dir(source):
        return _iter_manifest(source)
    if not storage.exists(source):
        raise FileNotFoundError(f"{source}: no such folder or prefix")
    return (ImageRef(image_id(u, source), u) for u in storage.iter_files(source, IMAGE_SUFFIXES))


def _manifest_rows(uri: str, local_path: str) -> Iterator[dict]:
    """The rows of a manifest file (a local copy of ``uri``), a batch at a time."""
    if uri.lower().endswith(".parquet"):
        # One row group at a time, not pre-buffered: pre-buffering reads every row group's
        # column chunks up front (memory growing with the manifest). A row group is decoded
        # whole, so memory is bounded by the manifest's largest row group.
        parquet = pq.ParquetFile(local_path, pre_buffer=False)
        names = parquet.schema_arrow.names
        columns = [c for c in ("uri", "id") if c in names]
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
        for row in csv.DictReader(f):
            if "uri" not in row:
                raise ValueError(f"{uri}: a manifest needs a 'uri' column (found {sorted(row)})")
            yield row


def _iter_manifest(uri: str) -> Iterator[ImageRef]:
    base = posixpath.dirname(uri) if "://" in uri else storage.filesystem(uri)[1].rsplit("/", 1)[0]
    remote = "://" in uri and not uri.startswith("file://")
    # A remote manifest is copied to local scratch first (with retries: a storage hiccup
    # mid-read must not end the listing), then streamed from there.
    with tempfile.TemporaryDirectory(prefix="retrieval-manifest-") as scratch:
        local_path = storage.local_copy(uri, scratch)
        for row in _manifest_rows(uri, local_path):
            written = str(row["uri"] or "").strip()
            image_uri, problem = resolve_manifest_uri(written, base, remote=remote)
            given = row.get("id")
            ref_id = str(given).strip() if given not in (None, "") else image_id(image_uri, base)
            yield ImageRef(ref_id, image_uri, problem)


def resolve_manifest_uri(written: str, base: str, *, remote: bool) -> tuple[str, str | None]:
    """Where a manifest entry points, or why it is refused (an ``unsafe_uri`` problem).

    A URI with a scheme (``gs://``, ``s3://``, ``file://``) is taken as written: the manifest's
    author named the store. A relative path is resolved against the manifest's folder and must
    stay inside it (``../`` cannot climb out). A bare absolute path is a path on the machine
    that runs the job: accepted in a local manifest, refused in one from object storage (a
    manifest in a bucket must not make workers read their own disks).
    """
    if not written:
        return written, "unsafe_uri: empty uri"
    if "://" in written:
        return written, None
    path = written.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        if remote:
            return written, "unsafe_uri: a local absolute path in a manifest from object storage"
        return written, None
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        return written, "unsafe_uri: a relative path that leaves the manifest's folder"
    return storage.join(base, normal), None


def mark_duplicates(refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
    """Give every input after the first with the same id a ``duplicate_id`` problem; ``refs``
    must be sorted by (id, uri), so same-id inputs are neighbours."""
    previous: ImageRef | None = None
    for ref in refs:
        if previous is not None and previous.id == ref.id:
            ref = ImageRef(
                ref.id, ref.uri, problem=f"duplicate_id: id {ref.id!r} is also {previous.uri}"
            )
        yield ref
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
