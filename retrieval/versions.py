"""Versioned index folders under one root, a ``CURRENT`` pointer moved atomically, rollback.

    ROOT/
      CURRENT                 the name of the live version (one line), replaced atomically
      versions/v000001/       one complete re-index: state, descriptors, codebook, index, summary
      versions/v000002/

A new version is written completely first; only then does ``CURRENT`` move to it (one atomic
object write: a rename on local disks, a single PUT on object stores), so readers see the old
version or the new one, never a half-built index. The last ``keep`` versions stay for rollback.
"""

from __future__ import annotations

import re

from retrieval import storage

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
INDEX_DIR = "index"
# Data a run extracted once and later versions share (read through their version.json's
# ``uses``): ROOT/data/<the version that extracted it>.
DATA_DIR = "data"
_NAME = re.compile(r"^v\d{6}$")


def version_dir(root: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{root}: {name!r} is not a version name (v000001, ...)")
    return storage.join(root, VERSIONS_DIR, name)


def current(root: str) -> str | None:
    """The live version's name, or None before the first one."""
    uri = storage.join(root, CURRENT_FILE)
    if not storage.exists(uri):
        return None
    name = storage.read_bytes(uri).decode().strip()
    version_dir(root, name)  # refuse anything but a version name
    return name


def _names(root: str) -> list[str]:
    uri = storage.join(root, VERSIONS_DIR)
    fs, path = storage.filesystem(uri)
    if not storage.exists(uri):
        return []
    listed = storage.with_retries(lambda: fs.ls(path, detail=False), what=f"list {uri}")
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
    return sorted(n for n in names if _NAME.fullmatch(n))


def versions(root: str) -> list[str]:
    """The complete versions under ``root`` (with a committed ``version.json``), oldest first."""
    return [
        n
        for n in _names(root)
        if storage.exists(storage.join(version_dir(root, n), "version.json"))
    ]


def next_name(root: str) -> str:
    """A fresh version name, after every folder present (complete or not)."""
    taken = [int(n[1:]) for n in _names(root)]
    return f"v{max(taken, default=0) + 1:06d}"


def set_current(root: str, name: str) -> None:
    """Point ``CURRENT`` at ``name`` (atomically)."""
    if name not in versions(root):
        raise ValueError(f"{root}: version {name} is not complete")
    storage.write_bytes(storage.join(root, CURRENT_FILE), f"{name}\n".encode())


def rollback(root: str) -> str:
    """Move ``CURRENT`` back to the version before it; returns that version's name."""
    live, complete = current(root), versions(root)
    if live is None:
        raise ValueError(f"{root}: no CURRENT version to roll back from")
    older = [v for v in complete if v < live]
    if not older:
        raise ValueError(f"{root}: no version older than {live} is kept")
    set_current(root, older[-1])
    return older[-1]


def prune(root: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the live one), then the shared data
    batches (ROOT/data/NAME) that no kept version uses; returns the deleted versions."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    live = current(root)
    doomed = [v for v in versions(root)[:-keep] if v != live]
    for name in doomed:
        storage.remove(version_dir(root, name), recursive=True)
    kept = [v for v in versions(root) if v not in doomed]
    used = set()
    for name in kept:
        used.update(
            storage.read_json(storage.join(version_dir(root, name), "version.json")).get("uses", [])
        )
    data = storage.join(root, DATA_DIR)
    if storage.exists(data):
        fs, path = storage.filesystem(data)
        listed = storage.with_retries(lambda: fs.ls(path, detail=False), what=f"list {data}")
        newest = max((int(n[1:]) for n in _names(root)), default=0)
        for entry in listed:
            batch = entry.rstrip("/").rsplit("/", 1)[-1]
            # A batch newer than every version folder belongs to a run still in progress.
            if _NAME.fullmatch(batch) and batch not in used and int(batch[1:]) <= newest:
                storage.remove(storage.join(data, batch), recursive=True)
    return doomed


def resolve_index(uri: str) -> str:
    """``uri`` itself for an index folder; for a versioned root, the live version's index."""
    name = current(uri)
    return uri if name is None else storage.join(version_dir(uri, name), INDEX_DIR)
