"""One writer per place (``retrieval/leases.py``), on a local disk, on S3 (moto) and on GCS (the
emulator, taught GCS's ``ifGenerationMatch=0`` answer): only one of many runs creates a lease
record, a second writer stops naming the holder or waits for it, a heartbeat keeps a long run's
lease, and a killed run's lease expires and is taken over (its holder then refuses to commit)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import moto_s3, start_gcs_emulator, stop_server, use_gcs_emulator

from retrieval import leases, storage


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")):
        import s3fs

        s3fs.S3FileSystem().mkdir("leases")
        yield "s3://leases"


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gcs")
    server, endpoint = start_gcs_emulator(folder, "leases", preconditions=True)
    try:
        with pytest.MonkeyPatch.context() as env:
            plain = use_gcs_emulator(env, endpoint)
            yield "gs://leases"
            plain.clear_instance_cache()
    finally:
        stop_server(server)


@pytest.fixture(params=["local", "s3", "gcs"])
def place(request, tmp_path: Path) -> str:
    """A fresh place to write to, on each backend."""
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue(f"{request.param}_bucket")
    return f"{bucket}/{uuid.uuid4().hex[:8]}/out"


def test_exactly_one_of_many_creates_a_record(place: str):
    uri = storage.join(place, "claim")
    with ThreadPoolExecutor(6) as pool:
        won = list(pool.map(lambda i: leases.create_exclusive(uri, f"{i}".encode()), range(6)))
    assert sum(won) == 1
    assert storage.read_bytes(uri) == str(won.index(True)).encode()
    with ThreadPoolExecutor(4) as pool:  # four runs at once: one lease, three stopped
        runs = [pool.submit(leases.acquire, place, what=f"run {i}", ttl=30) for i in range(4)]
        outcomes = [f.exception() or f.result() for f in runs]
    taken = [o for o in outcomes if isinstance(o, leases.Lease)]
    assert len(taken) == 1
    assert all(isinstance(o, leases.LeaseHeldError) for o in outcomes if o not in taken)
    assert leases.holder(place)["owner"] == taken[0].owner
    taken[0].release()
    assert leases.holder(place) is None


def test_a_second_writer_stops_naming_the_holder_or_waits(place: str):
    first = leases.acquire(place, what="retrieval reindex", ttl=30)
    with pytest.raises(leases.LeaseHeldError) as held:
        leases.acquire(place, what="retrieval extract", wait_s=0)
    message = str(held.value)
    assert message.startswith(f"{place} is being written by another run: retrieval reindex")
    assert f"pid {first.record['pid']}" in message and "--lease-wait" in message

    threading.Timer(0.5, first.release).start()
    second = leases.acquire(place, what="retrieval extract", wait_s=60, poll_s=0.1)
    assert second.seq == first.seq + 1
    assert leases.holder(place)["what"] == "retrieval extract"
    second.check()
    second.release()
    left = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(leases.lease_dir(place))]
    assert left == [f"lease-{second.seq:012d}.json"]  # one released record stays


def test_a_heartbeat_keeps_a_long_run_s_lease(place: str):
    with leases.hold(place, what="long run", ttl=0.8) as lease:
        time.sleep(2.0)  # more than twice its time to live: renewed meanwhile
        with pytest.raises(leases.LeaseHeldError):
            leases.acquire(place, what="rival", wait_s=0)
        lease.check()


def test_a_killed_run_s_lease_expires_and_is_taken_over(place: str):
    killed = leases.acquire(place, what="killed run", ttl=0.8)
    killed._stop.set()  # its heartbeat dies with the process: never renewed, never released
    with pytest.raises(leases.LeaseHeldError, match="killed run"):
        leases.acquire(place, what="next run", wait_s=0)
    taker = leases.acquire(place, what="next run", wait_s=30, poll_s=0.1)
    assert taker.seq == killed.seq + 1
    with pytest.raises(leases.LeaseLostError, match="taken over by next run"):
        killed.check()  # were it only paused, it would stop before committing
    killed.release()  # a lost lease is left alone
    assert leases.holder(place)["owner"] == taker.owner
    taker.release()


def test_a_lease_of_a_killed_process_of_this_machine_is_taken_over_at_once(tmp_path: Path):
    """kill -9 leaves the lease unreleased; on the same machine (host, boot, pid namespace) the
    next run sees its process is gone and need not wait for the expiry."""
    place = str(tmp_path / "out")
    code = (
        "import os, signal; from retrieval import leases; "
        f"leases.acquire({place!r}, what='killed run', ttl=3600); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr
    record = json.loads(next((tmp_path / "out" / "_lease").glob("lease-*.json")).read_text())
    assert not record["released"] and record["expires_at"] > time.time() + 3000
    lease = leases.acquire(place, what="next run", wait_s=0)
    assert lease.seq == record["seq"] + 1
    lease.release()


def test_a_run_failing_before_it_writes_leaves_no_folder(tmp_path: Path):
    place = tmp_path / "new-output"
    with pytest.raises(ValueError, match="mistyped"), leases.hold(str(place), what="run"):
        raise ValueError("a mistyped input")
    assert not place.exists()  # the lease was its only file: nothing is left behind
    (place / "data").mkdir(parents=True)
    with pytest.raises(ValueError), leases.hold(str(place), what="run"):
        raise ValueError("a later failure")
    assert (place / "data").is_dir() and (place / "_lease").is_dir()  # a folder in use stays
