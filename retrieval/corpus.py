"""What to index: listing a corpus into image references and cutting it into shards.

Image ids are stable across runs and machines: the path relative to the corpus root, extension
included, with '/' separators (or the id column of a manifest). Keeping the extension makes ids
unique by construction: ``photo.webp`` and ``photo.tiff`` in one folder are two images. Shards are
cut from the id-sorted listing, so the same listing always maps to the same shard ids, and a
shard's ``input_digest`` says whether a committed shard still describes the same inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from dataclasses import dataclass

from retrieval import storage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class ImageRef:
    """One input image. ``problem`` is set when the listing itself rejects it (duplicate id)."""

    id: str
    uri: str
    problem: str | None = None


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
    return posixpath.relpath(
        _strip_scheme(uri).replace("\\", "/"),
        _strip_scheme(root).replace("\\", "/").rstrip("/") or "/",
    )


def list_corpus(source: str) -> list[ImageRef]:
    """The images of a corpus, sorted by id.

    ``source`` is either a prefix (local folder, ``gs://bucket/dir``, ``s3://bucket/dir``) listed
    recursively for image files, or a manifest file (CSV with a ``uri`` column and an optional
    ``id`` column, or Parquet with the same columns). Relative URIs in a manifest are resolved
    against the manifest's folder and must stay inside it (see :func:`resolve_manifest_uri`).
    Two inputs with the same id cannot both be indexed: every one
    after the first (in URI order) is kept with a ``duplicate_id`` problem so it is reported, not
    dropped.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_dir(source):
        refs = _read_manifest(source)
    else:
        if not storage.exists(source):
            raise FileNotFoundError(f"{source}: no such folder or prefix")
        uris = storage.list_files(source, suffixes=IMAGE_SUFFIXES)
        refs = [ImageRef(image_id(u, source), u) for u in uris]
    return _mark_duplicates(refs)


def _read_manifest(uri: str) -> list[ImageRef]:
    if uri.lower().endswith(".parquet"):
        rows = storage.read_parquet(uri).to_pylist()
    else:
        text = storage.read_bytes(uri).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return []
    if "uri" not in rows[0]:
        raise ValueError(f"{uri}: a manifest needs a 'uri' column (found {sorted(rows[0])})")
    base = posixpath.dirname(uri) if "://" in uri else storage.filesystem(uri)[1].rsplit("/", 1)[0]
    remote = "://" in uri and not uri.startswith("file://")
    refs = []
    for row in rows:
        written = str(row["uri"] or "").strip()
        image_uri, problem = resolve_manifest_uri(written, base, remote=remote)
        given = row.get("id")
        ref_id = str(given).strip() if given not in (None, "") else image_id(image_uri, base)
        refs.append(ImageRef(ref_id, image_uri, problem))
    return refs


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


def _mark_duplicates(refs: list[ImageRef]) -> list[ImageRef]:
    refs = sorted(refs, key=lambda r: (r.id, r.uri))
    out: list[ImageRef] = []
    for ref in refs:
        if out and out[-1].id == ref.id:
            ref = ImageRef(
                ref.id, ref.uri, problem=f"duplicate_id: id {ref.id!r} is also {out[-1].uri}"
            )
        out.append(ref)
    return out


def plan_shards(refs: list[ImageRef], shard_size: int) -> list[ShardSpec]:
    """Cut the id-sorted listing into shards of at most ``shard_size`` inputs."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    return [
        ShardSpec(f"part-{i // shard_size:05d}", tuple(refs[i : i + shard_size]))
        for i in range(0, len(refs), shard_size)
    ]
