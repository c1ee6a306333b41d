"""One writer at a time per output folder or re-index root: a lease in storage.

Two runs writing one place race: two ``retrieval extract`` of different corpora into one
folder overwrite each other's plan and shards, two ``retrieval reindex`` on one root name their
versions alike and move ``CURRENT`` past each other. A writer therefore takes the place's lease
first; a second writer waits for it (up to ``--lease-wait`` seconds) or stops with one line
naming the holder.

    PLACE/_lease/lease-000000000007.json    the newest record is the lease: owner, host, pid,
                                            what, expires_at (renewed), or released

The only atomic operation needed is "create this object unless it exists"
(:func:`create_exclusive`): a hard link of a complete temporary file on a local disk,
``ifGenerationMatch=0`` on GCS, ``If-None-Match: *`` on S3, each of which fails for every
writer but one. To take the lease, a
run reads the newest record N: if there is none, or it was released, or it expired (its holder
was killed: not renewed for ``ttl_s``), the run creates record N+1; if two runs try at once, one
create fails and that run reads again. Records are never reused: a holder knows it lost its
lease (taken over after it failed to renew in time, e.g. a paused machine) when a newer record
exists, and :meth:`Lease.check` refuses to go on before a commit. A heartbeat thread renews the
record every ``ttl_s / 4`` seconds; releasing marks it released and deletes older records, so
one small record stays behind.

Expiry compares the holder's clock (``expires_at``, when it last renewed) with the reader's:
clocks must agree to well within ``ttl_s`` (default 120 s, ``RETRIEVAL_LEASE_TTL_S``). A holder
on the reader's own machine (same host, boot and pid namespace) whose process is gone was
killed: its lease is taken over at once instead of after its expiry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from retrieval import storage

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
KIND = "lease"
DEFAULT_TTL_S = 120.0
TTL_ENV = "RETRIEVAL_LEASE_TTL_S"
_RECORD = re.compile(r"^lease-(\d{12})\.json$")
# Protocols whose "create unless it exists" is atomic on the server (see create_exclusive).
_ATOMIC_CREATE = frozenset({"file", "local", "gs", "gcs", "s3", "s3a", "memory"})


class LeaseError(RuntimeError):
    """A place another run writes to (one line, exit status 2)."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease, and waiting for it did not help."""


class LeaseLostError(LeaseError):
    """This run's lease was taken over (it was not renewed in time): stop before committing."""


def ttl_s() -> float:
    value = os.environ.get(TTL_ENV)
    return float(value) if value else DEFAULT_TTL_S


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def lease_dir(place: str) -> str:
    return storage.join(place, LEASE_DIR)


def _record_uri(place: str, seq: int) -> str:
    return storage.join(lease_dir(place), f"lease-{seq:012d}.json")


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists (then False); atomic against every other
    writer: a hard link of a complete temporary file on a local disk (readers never see it
    half-written), a conditional PUT on GCS (``ifGenerationMatch=0``) and S3
    (``If-None-Match: *``). A create that succeeded although its answer was lost (and the retry
    found the object) counts as created when the object holds ``data``."""
    fs, path = storage.filesystem(uri)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        # A hard link of a complete file: readers never see it half-written. A full disk is
        # final and names the lease (one line); the temporary file never stays.
        with storage.refused_for_good(uri):
            try:
                storage.publish_local(path, lambda f: f.write(data), publish=os.link)
                return True
            except FileExistsError:
                return False
    if protocol not in _ATOMIC_CREATE:
        log.warning("%s: no atomic create on %s://, the lease is best effort", uri, protocol)
    try:
        storage.with_retries(lambda: fs.pipe_file(path, data, mode="create"), what=f"create {uri}")
        return True
    except FileExistsError:
        fs.invalidate_cache(path)
        try:
            return storage.read_bytes(uri) == data
        except FileNotFoundError:
            return False


def _records(place: str) -> list[tuple[int, str]]:
    """(sequence number, uri) of the lease records, oldest first."""
    folder = lease_dir(place)
    found = []
    for uri in storage.list_files(folder) if storage.exists(folder) else []:
        match = _RECORD.fullmatch(uri.rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def _read_record(uri: str) -> dict[str, Any] | None:
    try:
        record = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None  # deleted by a newer holder since it was listed
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # not written by this module: treated as expired
    return record if isinstance(record, dict) else {}


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _machine() -> dict[str, Any]:
    """Where this process runs, precisely enough to tell that a pid is one of this machine's
    processes: the host name, the boot (Linux's boot id) and the pid namespace (a container
    sharing the host's name has its own pids)."""
    try:
        pid_ns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
    }


def _dead_here(record: dict[str, Any]) -> bool:
    """True when the holder ran on this machine, in this pid namespace, since this boot, and
    its process is gone (or a zombie): a killed run's lease need not wait for its expiry."""
    here = _machine()
    if here["boot_id"] is None or here["pid_ns"] is None:
        return False  # not Linux: only the expiry tells
    if any(record.get(key) != value for key, value in here.items()):
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    stat = _read_text(f"/proc/{pid}/stat") or ""
    return stat.rpartition(")")[2].split()[:1] == ["Z"]  # killed, not yet reaped


def is_live(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """A record whose holder still holds it: not released, not expired, and not a process of
    this machine that is gone (killed)."""
    if not record or record.get("released"):
        return False
    if float(record.get("expires_at", 0)) <= (time.time() if now is None else now):
        return False
    return not _dead_here(record)


def describe(record: dict[str, Any]) -> str:
    """Who holds a lease, in words (for the one line a waiting run ends with)."""
    left = float(record.get("expires_at", 0)) - time.time()
    return (
        f"{record.get('what', 'a run')} (host {record.get('host')}, pid {record.get('pid')}, "
        f"since {record.get('acquired')}; its lease expires in {max(left, 0):.0f} s unless "
        "renewed)"
    )


def holder(place: str) -> dict[str, Any] | None:
    """The live lease record of ``place``, or None when no run holds it."""
    records = _records(place)
    if not records:
        return None
    record = _read_record(records[-1][1])
    return record if is_live(record) else None


@dataclass
class Lease:
    """A held lease (see the module doc): renewed by a heartbeat thread until released."""

    place: str
    seq: int
    record: dict[str, Any]
    ttl_s: float
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def owner(self) -> str:
        return self.record["owner"]

    @property
    def uri(self) -> str:
        return _record_uri(self.place, self.seq)

    def _newer(self) -> dict[str, Any] | None:
        """The record of a run that took this lease over, if one did."""
        for seq, uri in reversed(_records(self.place)):
            if seq > self.seq:
                return _read_record(uri) or {}
        return None

    def renew(self) -> None:
        """Push the expiry ``ttl_s`` ahead, unless the lease was taken over (then it is lost)."""
        newer = self._newer()
        if newer is not None:
            self._lost = f"taken over by {describe(newer)}"
            return
        record = {
            **self.record,
            "renewed": _now_iso(),
            "expires_at": time.time() + self.ttl_s,
        }
        storage.write_bytes(self.uri, _encode(record))
        self.record = record

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as exc:  # storage down: keep trying until the lease runs out
                log.warning("%s: lease not renewed (%s: %s)", self.place, type(exc).__name__, exc)
                if time.time() > float(self.record["expires_at"]):
                    self._lost = f"not renewed for {self.ttl_s:.0f} s ({exc})"
            if self._lost:
                log.error("%s: this run's lease was lost: %s", self.place, self._lost)
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.place}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds the lease (call it before
        a commit that another writer must not see twice: a plan, a version, ``CURRENT``)."""
        if self._lost is None:
            newer = self._newer()
            if newer is not None:
                self._lost = f"taken over by {describe(newer)}"
        if self._lost is not None:
            raise LeaseLostError(
                f"{self.place}: this run's lease was lost ({self._lost}); it stopped before "
                "committing: run it again"
            )

    def release(self) -> None:
        """Stop renewing; mark the record released (unless the lease was lost) and delete the
        records before it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._lost is not None or self._newer() is not None:
                return
            released = {**self.record, "released": True, "released_at": _now_iso()}
            storage.write_bytes(self.uri, _encode(released))
            for seq, uri in _records(self.place):
                if seq < self.seq:
                    storage.remove(uri)
        except Exception as exc:  # the run's own outcome matters more: the lease expires
            log.warning(
                "%s: lease not released (%s: %s); it expires in %.0f s",
                self.place,
                type(exc).__name__,
                exc,
                float(self.record["expires_at"]) - time.time(),
            )


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def acquire(
    place: str,
    *,
    what: str,
    wait_s: float = 0.0,
    ttl: float | None = None,
    poll_s: float = 1.0,
) -> Lease:
    """Take ``place``'s lease for ``what`` (e.g. "retrieval reindex"), waiting up to ``wait_s``
    seconds for another holder to release it or let it expire; raises :class:`LeaseHeldError`
    naming the holder after that. The heartbeat starts at once; release it (:func:`hold`)."""
    ttl = ttl_s() if ttl is None else ttl
    deadline = time.monotonic() + max(wait_s, 0.0)
    owner = uuid.uuid4().hex
    waited = False
    while True:
        records = _records(place)
        top, record = (records[-1][0], _read_record(records[-1][1])) if records else (0, None)
        if record is None and records:
            continue  # the newest record was just replaced: list again
        if not is_live(record):
            if record and not record.get("released"):
                log.warning("%s: taking over the expired lease of %s", place, describe(record))
            mine = {
                "kind": KIND,
                "seq": top + 1,
                "owner": owner,
                "what": what,
                "place": place,
                **_machine(),
                "pid": os.getpid(),
                "acquired": _now_iso(),
                "renewed": _now_iso(),
                "expires_at": time.time() + ttl,
                "ttl_s": ttl,
                "released": False,
            }
            if create_exclusive(_record_uri(place, top + 1), _encode(mine)):
                lease = Lease(place, top + 1, mine, ttl)
                for seq, uri in records:  # the records before this one are history
                    if seq < top:
                        storage.remove(uri)
                lease.start()
                if waited:
                    log.warning("%s: lease taken after waiting", place)
                return lease
            continue  # another run created it first: read again
        left = deadline - time.monotonic()
        if left <= 0:
            raise LeaseHeldError(
                f"{place} is being written by another run: {describe(record or {})}; "
                "wait for it to finish, or give --lease-wait SECONDS to wait for it"
                + (f" (waited {wait_s:.0f} s)" if wait_s > 0 else "")
            )
        if not waited:
            log.warning("%s: waiting up to %.0f s for %s", place, wait_s, describe(record or {}))
            waited = True
        time.sleep(min(poll_s, left))


@contextlib.contextmanager
def hold(
    place: str, *, what: str, wait_s: float = 0.0, ttl: float | None = None
) -> Iterator[Lease]:
    """``place``'s lease for the ``with`` block (released on the way out, also on errors). A
    run that fails before writing anything to a place that did not exist leaves nothing
    behind (a mistyped input must not leave an output folder holding a lease)."""
    existed = storage.exists(place)
    lease = acquire(place, what=what, wait_s=wait_s, ttl=ttl)
    try:
        yield lease
    except BaseException:
        lease.release()
        if not existed and _only_leases(place):
            storage.remove(place, recursive=True)
        raise
    lease.release()


def _only_leases(place: str) -> bool:
    fs, path = storage.filesystem(place)
    prefix = storage.filesystem(lease_dir(place))[1].rstrip("/") + "/"
    try:
        fs.invalidate_cache(path)
        found = fs.find(path)
    except Exception:  # best effort: the error being raised matters more
        return False
    return all(p.startswith(prefix) for p in found)


@contextlib.contextmanager
def hold_all(
    places: Iterable[str | None], *, what: str, wait_s: float = 0.0
) -> Iterator[list[Lease]]:
    """The leases of several places (None skipped), taken in sorted order so that two runs
    wanting the same ones never each hold one and wait for the other."""
    with contextlib.ExitStack() as stack:
        wanted = sorted({p for p in places if p})
        yield [stack.enter_context(hold(p, what=what, wait_s=wait_s)) for p in wanted]
