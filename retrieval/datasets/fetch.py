"""Download, verify and unpack a benchmark, then convert it to ``images/`` + ``gt.json``.

    <DIR>/downloads/<file>        the publisher's files, kept (a re-run verifies, not re-downloads)
    <DIR>/downloads/<file>.part   an interrupted download, resumed with an HTTP Range request
    <DIR>/downloads/SHA256SUMS    digests: the registry's, or recorded on first download
    <DIR>/images/, queries/       the benchmark's images (queries/ only where queries are not
                                  database images, as in Revisited Oxford/Paris)
    <DIR>/gt.json                 the ground truth in the project's format
    <DIR>/dataset.json            written last: what was fetched, digests, counts

``mirror`` replaces the publisher's host: every file is fetched from ``<mirror>/<file name>``
(a local copy of the archives, or the test server).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from retrieval.datasets.registry import DatasetSpec, RemoteFile
from retrieval.redaction import redact

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
ATTEMPTS = 5
SUMS_FILENAME = "SHA256SUMS"
MARKER_FILENAME = "dataset.json"
USER_AGENT = "cbir-retrieval-datasets/1"


class FetchError(RuntimeError):
    """A download or verification failed; the message says which file and why."""


# --------------------------------------------------------------------------- digests


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_sums(folder: Path) -> dict[str, str]:
    """``SHA256SUMS`` (sha256sum format: "<hex>  <name>") as name -> digest."""
    path = folder / SUMS_FILENAME
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest.lower()
    return sums


def _write_sums(folder: Path, sums: dict[str, str]) -> None:
    lines = [f"{digest}  {name}\n" for name, digest in sorted(sums.items())]
    (folder / SUMS_FILENAME).write_text("".join(lines), encoding="utf-8")


def verify(path: Path, expected: str | None, recorded: str | None) -> tuple[str, str]:
    """Check a complete file against the registry digest (``expected``) or, failing that, the
    digest recorded when it was first downloaded. Returns (digest, how it was checked)."""
    digest = sha256_of(path)
    for reference, source in ((expected, "registry"), (recorded, SUMS_FILENAME)):
        if reference:
            if digest != reference.lower():
                raise FetchError(
                    f"{path.name}: SHA-256 {digest} does not match the {source} digest "
                    f"{reference}; delete the file to download it again"
                )
            return digest, f"matches the {source} digest"
    return digest, "no published digest: recorded on first download"


# --------------------------------------------------------------------------- download


def download(
    url: str,
    dest: Path,
    *,
    progress: bool = True,
    attempts: int = ATTEMPTS,
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming an interrupted download
    with an HTTP Range request (retries up to ``attempts`` times, backing off).

    A server that ignores Range (status 200) restarts the file; one that announces a length
    and sends fewer bytes is resumed; the finished size must equal the announced total.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(attempts):
        try:
            _download_once(url, part, progress=progress, opener=opener)
            part.replace(dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (403, 404, 410):
                raise FetchError(f"{redact(url)}: HTTP {exc.code} {exc.reason}") from None
            last_error = exc
            # A mirror may be a signed URL: the warning names it masked, its error too.
            log.warning("download of %s interrupted (%s); resuming", redact(url), redact(str(exc)))
            time.sleep(min(2**attempt * 0.2, 5))
    raise FetchError(
        f"{redact(url)}: failed after {attempts} attempts: {redact(str(last_error))}"
    ) from None


def _download_once(url: str, part: Path, *, progress: bool, opener: Callable[..., Any]) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    resumable = url.startswith(("http://", "https://"))
    if offset and resumable:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # "range not satisfiable": the part is already whole
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return
            part.unlink()
        raise
    with response:
        status = getattr(response, "status", 200)
        if status == 206:
            total = _total_from_content_range(response.headers.get("Content-Range"))
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise FetchError(
                    f"{redact(url)}: asked for bytes from {offset}, server sent from {start}"
                )
            mode = "ab"
        else:  # 200 (or FTP): the whole file from the start
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            offset, mode = 0, "wb"
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            leave=False,
        )
        written = offset
        with part.open(mode) as f, bar:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:
        raise http.client.IncompleteRead(b"", total - written)


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/200" or "bytes */200"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _start_from_content_range(value: str | None) -> int | None:
    if not value:
        return None
    span = value.split()[-1].split("/")[0]
    start = span.split("-")[0]
    return int(start) if start.isdigit() else None


# --------------------------------------------------------------------------- unpack


def is_archive(path: Path) -> bool:
    return path.name.endswith((".tgz", ".tar.gz", ".tar", ".zip"))


def unpack(archive: Path, into: Path) -> None:
    """Extract a tar(.gz) or zip archive into ``into``, refusing members that would land outside
    it (absolute paths, "..", links pointing out), so a hostile archive cannot write elsewhere."""
    into.mkdir(parents=True, exist_ok=True)
    root = into.resolve()
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if not target.is_relative_to(root):
                    raise FetchError(f"{archive.name}: member {member!r} escapes the folder")
            zf.extractall(root)
        return
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(root, filter="data")
    except tarfile.FilterError as exc:
        raise FetchError(f"{archive.name}: refused member: {exc}") from exc
    except tarfile.TarError as exc:
        raise FetchError(f"{archive.name}: not a readable tar archive: {exc}") from exc


# --------------------------------------------------------------------------- the whole fetch


def source_url(remote: RemoteFile, mirror: str | None) -> str:
    return f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url


def fetch_dataset(
    spec: DatasetSpec,
    to: str | Path,
    *,
    mirror: str | None = None,
    with_optional: bool = False,
    progress: bool = True,
    keep_archives: bool = True,
) -> dict[str, Any]:
    """Download, verify, unpack and convert ``spec`` into ``to``; returns what dataset.json
    records. A folder whose dataset.json is present is left as it is (already fetched)."""
    from retrieval.datasets.formats import convert

    out = Path(to)
    marker = out / MARKER_FILENAME
    if marker.exists():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("name") == spec.name:
            return {**recorded, "already_fetched": True}
        raise FetchError(f"{out} already holds {recorded.get('name')!r}, not {spec.name!r}")

    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sums = read_sums(downloads)
    wanted = [f for f in spec.files if with_optional or not f.optional]
    files: list[dict[str, Any]] = []
    for remote in wanted:
        url = source_url(remote, mirror)
        path = download(url, downloads / remote.filename, progress=progress)
        digest, check = verify(path, remote.sha256, sums.get(remote.filename))
        sums[remote.filename] = digest
        _write_sums(downloads, sums)
        files.append(
            {"file": remote.filename, "url": redact(url), "sha256": digest, "check": check}
        )
        log.info("%s: %s (%s)", remote.filename, digest, check)

    raw = out / "raw"
    if raw.exists():
        shutil.rmtree(raw)  # an interrupted earlier conversion: start it over
    raw.mkdir()
    for remote in wanted:
        path = downloads / remote.filename
        if is_archive(path):
            unpack(path, raw)
        else:
            shutil.copyfile(path, raw / remote.filename)

    counts = convert(spec.converter, raw, out)
    # A count that differs from the published set is reported, not fatal: a partial local
    # mirror is a legitimate source, and the converters already refused broken structure.
    warnings = [
        f"converted {counts[key]} {key}; the published {spec.name} has {expected}"
        for key, expected in (("images", spec.expected_images), ("queries", spec.expected_queries))
        if expected is not None and counts[key] != expected
    ]
    for warning in warnings:
        log.warning("%s: %s", spec.name, warning)
    shutil.rmtree(raw)
    if not keep_archives:
        for remote in wanted:
            (downloads / remote.filename).unlink(missing_ok=True)

    record = {
        "name": spec.name,
        "title": spec.title,
        "files": files,
        **counts,
        "warnings": warnings,
    }
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(marker)
    return record
