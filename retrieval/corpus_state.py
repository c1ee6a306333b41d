"""What a corpus holds right now, and how it differs from what was indexed.

Each image gets a content key: the object store's own version where it has one (GCS
``generation`` + size, S3 ``ETag`` + size: no bytes read), else (local disks, other stores) the
SHA-256 of the bytes, since a modification time says nothing about content. Comparing the keys
with the last indexed state sorts every image into new, changed, deleted or unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from retrieval import storage
from retrieval.corpus import ImageRef

STATE_FILE = "state.parquet"


def content_key(uri: str, info: dict | None = None) -> str:
    """A string that changes whenever the object's content does (see module doc)."""
    fs, path = storage.filesystem(uri)
    info = info if info is not None else storage.with_retries(lambda: fs.info(path), what=uri)
    size = info.get("size")
    if info.get("generation"):
        return f"gcs-generation:{info['generation']}:{size}"
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{size}"
    return f"sha256:{storage.sha256_file(uri)}"


def content_keys(refs: Iterable[ImageRef]) -> dict[str, str]:
    """Content key per image id (listing problems such as duplicate ids are skipped)."""
    return {r.id: content_key(r.uri) for r in refs if not r.problem}


@dataclass
class CorpusChanges:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def to_extract(self) -> list[str]:
        return sorted(self.new + self.changed)


def diff(previous: dict[str, tuple[str, str]], now: dict[str, tuple[str, str]]) -> CorpusChanges:
    """Compare ``{id: (uri, content key)}`` maps: the last indexed state and the corpus now."""
    changes = CorpusChanges()
    for image_id in sorted(now):
        if image_id not in previous:
            changes.new.append(image_id)
        elif previous[image_id] != now[image_id]:
            changes.changed.append(image_id)
        else:
            changes.unchanged.append(image_id)
    changes.deleted = sorted(set(previous) - set(now))
    return changes


def state_table(state: dict[str, tuple[str, str]]) -> pa.Table:
    ids = sorted(state)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([state[i][0] for i in ids], pa.string()),
            "content_key": pa.array([state[i][1] for i in ids], pa.string()),
        }
    )


def read_state(directory: str) -> dict[str, tuple[str, str]]:
    uri = storage.join(directory, STATE_FILE)
    if not storage.exists(uri):
        return {}
    table = storage.read_parquet(uri)
    return {
        i: (u, k)
        for i, u, k in zip(
            table.column("id").to_pylist(),
            table.column("uri").to_pylist(),
            table.column("content_key").to_pylist(),
            strict=True,
        )
    }


def write_state(directory: str, state: dict[str, tuple[str, str]]) -> None:
    storage.write_parquet(storage.join(directory, STATE_FILE), state_table(state))
