"""The whole pipeline on s3:// against a real S3 server (moto), with and without faults.

A proxy in front of the server fails 10% of requests (503 answers, connection resets, stalls
the client must time out on, short reads). The job (extract on Beam, train, index, merge,
search, and an `evaluate` report written to s3://) must complete, account for every image, and
produce the same descriptors, search results and scores as a fault-free run. Also: one retry
layer (attempts do not multiply with the client's own), stalled requests time out, and a re-run
retries shards that hold transient errors.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import (
    FaultyProxy,
    moto_s3,
    pattern_images,
    run_pipeline,
    save_tiny_saved_model,
    write_tiny_benchmark,
)

from pipelines import stages
from pipelines.config import RunConfig
from retrieval import storage
from retrieval.descriptors.gem import GeMConfig

N_IMAGES = 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto on a free port, and a function pointing s3fs at an endpoint (the server or a proxy)."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as (endpoint, use):
        yield endpoint, use


@pytest.fixture
def proxy(s3, monkeypatch):
    endpoint, use = s3
    monkeypatch.setenv(storage.TIMEOUT_ENV, "2")  # a stalled request fails after 2 s
    faulty = FaultyProxy(endpoint, rate=0.0, seed=1)
    use(faulty.endpoint)
    yield faulty
    use(endpoint)
    faulty.close()


@pytest.fixture(scope="module")
def corpus(s3) -> str:
    """s3://BUCKET/corpus: N_IMAGES small random-pattern images (PNG and JPEG)."""
    import s3fs

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    for name, data in pattern_images(N_IMAGES).items():
        fs.pipe(f"{bucket}/corpus/{name}", data)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A benchmark folder over the same images, for `evaluate` (its report goes to s3://)."""
    return write_tiny_benchmark(tmp_path_factory.mktemp("benchmark") / "tiny", pattern_images(6))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> RunConfig:
    model = save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")
    return RunConfig(
        runner="local",
        workers=2,
        threads_per_worker=1,
        shard_size=4,
        gem=GeMConfig(backbone=f"savedmodel:{model}", image_size=64),
    )


@pytest.fixture(scope="module")
def fault_free(s3, corpus, config, benchmark) -> dict:
    return run_pipeline(f"{corpus}/corpus", f"{corpus}/clean", config, benchmark)


def test_pipeline_on_s3(fault_free):
    extract = fault_free["summaries"]["extract"]
    assert (extract["inputs"], extract["indexed"], extract["failed"]) == (N_IMAGES, N_IMAGES, 0)
    assert fault_free["ids"] == sorted(
        f"img{i:02d}.{'png' if i % 2 else 'jpeg'}" for i in range(N_IMAGES)
    )
    assert fault_free["summaries"]["merge"]["ntotal"] == N_IMAGES
    top1 = {r["query_id"]: r["id"] for r in fault_free["results"] if r["rank"] == 0}
    assert top1 == {i: i for i in fault_free["ids"]}


def test_ten_percent_faults_change_nothing(
    proxy, corpus, config, benchmark, fault_free, monkeypatch
):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # backoff is tested elsewhere
    proxy.rate = 0.1
    # Extraction on Beam with 2 worker processes (they reach S3 through the proxy too).
    faulty = run_pipeline(
        f"{corpus}/corpus", f"{corpus}/faulty", replace(config, runner="beam"), benchmark
    )
    proxy.rate = 0.0
    assert sum(proxy.faults.values()) >= 10, proxy.faults  # faults of every kind happened
    assert all(proxy.faults.values()), proxy.faults
    extract = faulty["summaries"]["extract"]
    assert (extract["inputs"], extract["indexed"], extract["failed"]) == (N_IMAGES, N_IMAGES, 0)
    assert faulty["ids"] == fault_free["ids"]
    np.testing.assert_allclose(faulty["vectors"], fault_free["vectors"], atol=1e-5)
    key = lambda r: (r["query_id"], r["rank"])  # noqa: E731
    assert [(r["query_id"], r["rank"], r["id"]) for r in sorted(faulty["results"], key=key)] == [
        (r["query_id"], r["rank"], r["id"]) for r in sorted(fault_free["results"], key=key)
    ]
    assert faulty["report"]["accounting"] == fault_free["report"]["accounting"]
    scores = lambda report: [(r["name"], r["mAP"], r["mP@1"]) for r in report["results"]]  # noqa: E731
    assert scores(faulty["report"]) == scores(fault_free["report"])
    proxy.close()  # counts the last stalls the clients hung up on
    assert proxy.abandoned == proxy.faults["timeout"]  # the client timed out on every stall


def test_stalled_requests_time_out_and_are_retried(proxy, corpus, monkeypatch, caplog):
    """A request that gets no answer fails after the storage timeout (botocore hangs up, it
    does not wait for the server) and counts as transient: DEFAULT_ATTEMPTS tries in all."""
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setenv(storage.TIMEOUT_ENV, "0.5")
    bucket = corpus.removeprefix("s3://")
    path = f"/{bucket}/corpus/img01.png"
    proxy.stall_paths = {path}
    with pytest.raises(Exception) as raised, caplog.at_level("WARNING"):
        storage.read_bytes(f"{corpus}/corpus/img01.png")
    proxy.close()
    assert storage.is_transient(raised.value)
    assert caplog.text.count("retry ") == storage.DEFAULT_ATTEMPTS - 1
    assert proxy.abandoned == proxy.requests[path] == storage.DEFAULT_ATTEMPTS


def test_attempts_do_not_multiply(proxy, corpus, monkeypatch):
    """A request that always fails is sent DEFAULT_ATTEMPTS times in all, not 5 x s3fs x boto."""
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    bucket = corpus.removeprefix("s3://")
    path = f"/{bucket}/corpus/img00.jpeg"
    proxy.fail_paths = {path}
    with pytest.raises(OSError):
        storage.read_bytes(f"{corpus}/corpus/img00.jpeg")
    assert proxy.requests[path] == storage.DEFAULT_ATTEMPTS


def test_rerun_retries_shards_with_transient_errors(proxy, corpus, config, monkeypatch, caplog):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    bucket = corpus.removeprefix("s3://")
    proxy.fail_paths = {f"/{bucket}/corpus/img05.png"}  # down for the whole first run
    root = f"{corpus}/rerun"
    first = stages.extract(f"{corpus}/corpus", f"{root}/desc", config)
    assert first["failures_by_kind"] == {"read_failed": 1}
    assert first["indexed"] == N_IMAGES - 1

    proxy.fail_paths = set()
    with caplog.at_level("WARNING"):
        again = stages.extract(f"{corpus}/corpus", f"{root}/desc", config)
    assert "hold transient errors" in caplog.text
    assert again["shards_retried"] == 1 and again["shards_skipped"] == again["shards"] - 1
    assert (again["indexed"], again["failed"]) == (N_IMAGES, 0)


def test_client_retries_are_off(s3):
    fs, _ = storage.filesystem("s3://any-bucket/x")
    assert fs.retries == 1
    fs.connect()  # s3fs builds its botocore client
    config = fs.s3.meta.config
    assert config.retries["total_max_attempts"] == 1  # botocore: no retries
    assert config.read_timeout == config.connect_timeout == storage.DEFAULT_REQUEST_TIMEOUT_S


def test_programming_errors_are_not_retried(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: pytest.fail("must not wait"))
    for error in (TypeError("bug"), KeyError("k"), AttributeError("a"), ValueError("v")):
        calls = []

        def broken(error=error, calls=calls) -> None:
            calls.append(1)
            raise error

        with pytest.raises(type(error)):
            storage.with_retries(broken, what="test")
        assert len(calls) == 1


class HttpError(Exception):  # named like gcsfs's
    def __init__(self, code: int) -> None:
        super().__init__(f"HTTP {code}")
        self.code = code


class ClientPayloadError(Exception):  # named like aiohttp's short-read error
    pass


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("timed out"), True),
        (HttpError(503), True),
        (HttpError(429), True),
        (HttpError(403), False),
        (ClientPayloadError("Response payload is not completed"), True),
        (OSError(5, "EIO from s3fs"), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (storage.FileTooLargeError("big"), False),
        (TypeError("bug"), False),
        (RuntimeError("unknown"), False),
    ],
)
def test_error_classification(error, transient):
    assert storage.is_transient(error) is transient


def test_cause_chain_is_classified():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert storage.is_transient(outer)


def test_write_then_read_through_faults(proxy, corpus, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    proxy.rate = 0.3
    payloads = {f"{corpus}/rw/{i}.bin": bytes([i]) * (1000 + i) for i in range(20)}
    for uri, data in payloads.items():
        storage.write_bytes(uri, data)
    for uri, data in payloads.items():
        assert storage.read_bytes(uri) == data
    proxy.rate = 0.0
    assert sum(proxy.faults.values()) > 0
    proxy.close()  # counts the last stalls the client hung up on
    assert proxy.abandoned == proxy.faults["timeout"]


def test_storage_errors_in_rows_are_redacted(tmp_path: Path):
    from retrieval.corpus import ImageRef
    from retrieval.extraction import load_image
    from retrieval.images import DecodeLimits

    ref = ImageRef("x.jpg", "https://user:hunter2@127.0.0.1:1/x.jpg?X-Amz-Signature=s3cr3t")
    row = load_image(ref, max_side=64, limits=DecodeLimits())
    assert row.error_kind in ("read_failed", "missing")
    assert "hunter2" not in row.uri + row.message and "s3cr3t" not in row.uri + row.message
