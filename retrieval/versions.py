"""Versioned index folders under one root, a ``CURRENT`` pointer moved atomically, rollback.

    ROOT/
      CURRENT                 the name of the live version (one line), replaced atomically
      _lease/                 the lease of the run writing this root (retrieval/leases.py)
      versions/v000001/       one complete re-index: state, descriptors, codebook, index, summary
      versions/v000002/       claim.json first (the name, taken atomically), version.json last
      data/v000002/           the data that run extracted, shared by later versions

A new version is written completely first; only then does ``CURRENT`` move to it (one atomic
object write: a rename on local disks, a single PUT on object stores), so readers see the old
version or the new one, never a half-built index. The last ``keep`` versions stay for rollback.

Writers hold the root's lease (a re-index, a rollback), and besides: a version's name is
claimed by creating its ``claim.json`` exclusively (:func:`claim`), so two runs never build one
version; ``CURRENT`` only moves forward, to a newer complete version, except by
:func:`rollback`; and a version folder without ``version.json`` that no live run holds (an
interrupted re-index) is removed by the next run (:func:`remove_incomplete`).
"""

from __future__ import annotations

import json
import os
import re
import socket

from retrieval import leases, storage

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
INDEX_DIR = "index"
CLAIM_FILE = "claim.json"
VERSION_FILE = "version.json"
# Data a run extracted once and later versions share (read through their version.json's
# ``uses``): ROOT/data/<the version that extracted it>.
DATA_DIR = "data"
_NAME = re.compile(r"^v\d{6}$")
# What an incomplete version that was removed leaves: ROOT/versions/vNNNNNN.removed, so that
# its name is never given again (a run that lost its lease could still be writing there).
REMOVED = ".removed"
_TAKEN = re.compile(r"^v(\d{6})(\.removed)?$")


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


def _entries(root: str) -> list[str]:
    uri = storage.join(root, VERSIONS_DIR)
    fs, path = storage.filesystem(uri)
    if not storage.exists(uri):
        return []
    fs.invalidate_cache(path)  # another run's claim since the last listing must show
    listed = storage.with_retries(lambda: fs.ls(path, detail=False), what=f"list {uri}")
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]


def _names(root: str) -> list[str]:
    return sorted(n for n in _entries(root) if _NAME.fullmatch(n))


def versions(root: str) -> list[str]:
    """The complete versions under ``root`` (with a committed ``version.json``), oldest first."""
    return [
        n for n in _names(root) if storage.exists(storage.join(version_dir(root, n), VERSION_FILE))
    ]


def next_name(root: str) -> str:
    """A fresh version name, after every folder present (complete or not) and every removed
    incomplete one."""
    taken = [int(m.group(1)) for m in map(_TAKEN.fullmatch, _entries(root)) if m]
    return f"v{max(taken, default=0) + 1:06d}"


def claim(root: str, owner: str) -> str:
    """A fresh version name, taken for ``owner`` (a lease owner): its folder's ``claim.json``
    is created exclusively, so of two runs asking at once each gets its own name."""
    record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid()}
    while True:
        name = next_name(root)
        uri = storage.join(version_dir(root, name), CLAIM_FILE)
        if leases.create_exclusive(uri, (json.dumps(record) + "\n").encode()):
            return name


def claim_owner(root: str, name: str) -> str | None:
    """The lease owner that claimed version ``name`` (None for versions before claims)."""
    uri = storage.join(version_dir(root, name), CLAIM_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri)).get("owner")
    except (json.JSONDecodeError, AttributeError):
        return None


def set_current(root: str, name: str, *, rollback: bool = False) -> None:
    """Point ``CURRENT`` at ``name`` (atomically). It only moves forward, to a newer version
    than the live one, unless this is a ``rollback``: a run that finished after a newer version
    went live never takes ``CURRENT`` back."""
    if name not in versions(root):
        raise ValueError(f"{root}: version {name} is not complete")
    live = current(root)
    if live is not None and name < live and not rollback:
        raise ValueError(
            f"{root}: CURRENT is {live}, newer than {name}: it only moves forward "
            "(`retrieval rollback` moves it back)"
        )
    storage.write_bytes(storage.join(root, CURRENT_FILE), f"{name}\n".encode())


def rollback(root: str, *, lease_wait: float = 0.0) -> str:
    """Move ``CURRENT`` back to the version before it; returns that version's name. Holds the
    root's lease, so it never runs beside a re-index that would move ``CURRENT`` on."""
    with leases.hold(root, what="retrieval rollback", wait_s=lease_wait) as lease:
        live, complete = current(root), versions(root)
        if live is None:
            raise ValueError(f"{root}: no CURRENT version to roll back from")
        older = [v for v in complete if v < live]
        if not older:
            raise ValueError(f"{root}: no version older than {live} is kept")
        lease.check()
        set_current(root, older[-1], rollback=True)
        return older[-1]


def remove_incomplete(root: str, lease: leases.Lease) -> list[str]:
    """Remove the version folders without ``version.json`` (interrupted re-indexes) and the
    data they extracted, unless a kept version uses it; only under the root's ``lease`` (so no
    live run holds them) and never the lease holder's own claim. Returns the removed names."""
    lease.check()
    complete = set(versions(root))
    used = _used_batches(root, complete)
    removed = []
    for name in _names(root):
        if name in complete or claim_owner(root, name) == lease.owner:
            continue
        storage.write_bytes(
            storage.join(root, VERSIONS_DIR, name + REMOVED),
            (json.dumps({"removed_by": lease.owner}) + "\n").encode(),
        )  # first: the name stays taken even if the removal is cut short
        storage.remove(version_dir(root, name), recursive=True)
        if name not in used:
            storage.remove(storage.join(root, DATA_DIR, name), recursive=True)
        removed.append(name)
    return removed


def _used_batches(root: str, names: set[str] | list[str]) -> set[str]:
    """The data batches (ROOT/data/NAME) that the versions ``names`` read."""
    used: set[str] = set()
    for name in names:
        uri = storage.join(version_dir(root, name), VERSION_FILE)
        used.update(storage.read_json(uri).get("uses", []))
    return used


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
    used = _used_batches(root, kept)
    data = storage.join(root, DATA_DIR)
    if storage.exists(data):
        fs, path = storage.filesystem(data)
        listed = storage.with_retries(lambda: fs.ls(path, detail=False), what=f"list {data}")
        last = max((int(n[1:]) for n in _names(root)), default=0)
        for entry in listed:
            batch = entry.rstrip("/").rsplit("/", 1)[-1]
            # A batch newer than every version folder belongs to a run still in progress.
            if _NAME.fullmatch(batch) and batch not in used and int(batch[1:]) <= last:
                storage.remove(storage.join(data, batch), recursive=True)
    # Names of removed versions older than a complete one cannot be given again anyway.
    newest = max(kept, default=None)
    for entry in _entries(root):
        if entry.endswith(REMOVED) and newest and entry[: -len(REMOVED)] < newest:
            storage.remove(storage.join(root, VERSIONS_DIR, entry))
    return doomed


def resolve_index(uri: str) -> str:
    """``uri`` itself for an index folder; for a versioned root, the live version's index."""
    name = current(uri)
    return uri if name is None else storage.join(version_dir(uri, name), INDEX_DIR)
