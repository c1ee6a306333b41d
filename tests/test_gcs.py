"""gs:// end to end against the GCS emulator: listing, storage helpers, models, extraction, and
the whole pipeline (Beam extraction with 2 workers, train, index, merge, search, evaluate report)
with and without a proxy that fails 10% of requests.

How gcsfs is pointed at ``gcp-storage-emulator``: ``support.use_gcs_emulator``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from support import (
    FaultyProxy,
    pattern_images,
    point_gcs_at,
    run_pipeline,
    save_tiny_saved_model,
    start_gcs_emulator,
    stop_server,
    use_gcs_emulator,
    write_tiny_benchmark,
)

from pipelines.config import RunConfig
from pipelines.stages import extract
from retrieval import storage
from retrieval.backbones import load_backbone
from retrieval.corpus import list_corpus
from retrieval.descriptors.gem import GeMConfig
from retrieval.shards import descriptor_shards

BUCKET = "cbir-test"


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """A GCS emulator with bucket ``cbir-test``: its endpoint, and the MonkeyPatch that holds
    the gcsfs set-up (to point gcsfs at a proxy)."""
    server, endpoint = start_gcs_emulator(tmp_path_factory.mktemp("gcs-emulator"), BUCKET)
    try:
        with pytest.MonkeyPatch.context() as env:
            plain = use_gcs_emulator(env, endpoint)
            try:
                yield endpoint, env
            finally:
                plain.clear_instance_cache()
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def gcs(gcs_server):
    """The gcsfs filesystem that talks to the emulator."""
    import gcsfs.core

    fs, _ = storage.filesystem(f"gs://{BUCKET}")
    assert type(fs) is gcsfs.core.GCSFileSystem and fs.credentials.method == "anon"
    return fs


@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory) -> Path:
    return save_tiny_saved_model(tmp_path_factory.mktemp("savedmodel") / "tiny")


@pytest.fixture(scope="module")
def gcs_corpus(gcs, oxford_images) -> dict[str, bytes]:
    """gs://cbir-test/corpus: three oxford-dev photos (one in a subfolder), a text file named
    .jpg, and a .txt that is not listed. Returns {image id: bytes} for the four listed inputs."""
    a, b, c = oxford_images[:3]
    inputs = {
        a.name: a.read_bytes(),
        b.name: b.read_bytes(),
        f"sub/{c.name}": c.read_bytes(),
        "notes.jpg": b"this is not a photo\n",
    }
    for image_id, data in inputs.items():
        gcs.pipe(f"{BUCKET}/corpus/{image_id}", data)
    gcs.pipe(f"{BUCKET}/corpus/readme.txt", b"not listed")
    return inputs


def test_list_corpus_on_gcs(gcs_corpus):
    refs = list_corpus(f"gs://{BUCKET}/corpus")
    assert [r.id for r in refs] == sorted(gcs_corpus)
    assert [r.uri for r in refs] == [f"gs://{BUCKET}/corpus/{i}" for i in sorted(gcs_corpus)]
    assert all(r.problem is None for r in refs)
    assert list_corpus(f"gs://{BUCKET}/corpus/") == refs
    for ref in refs:
        assert storage.read_bytes(ref.uri) == gcs_corpus[ref.id]
    with pytest.raises(FileNotFoundError):
        list_corpus(f"gs://{BUCKET}/no-such-prefix")


def test_storage_round_trips_on_gcs(gcs):
    uri = f"gs://{BUCKET}/store/a/b.bin"
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    assert storage.read_bytes(uri, max_bytes=5) == b"hello"
    with pytest.raises(storage.FileTooLargeError):
        storage.read_bytes(uri, max_bytes=4)
    assert storage.sha256_file(uri) == storage.sha256_bytes(b"hello")
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"

    doc = {"stage": "test", "n": [1, 2.5, None], "text": "é"}
    storage.write_json(f"gs://{BUCKET}/store/doc.json", doc)
    assert storage.read_json(f"gs://{BUCKET}/store/doc.json") == doc
    assert storage.list_files(f"gs://{BUCKET}/store") == [
        f"gs://{BUCKET}/store/a/b.bin",
        f"gs://{BUCKET}/store/doc.json",
    ]
    assert storage.list_files(f"gs://{BUCKET}/store", suffixes=[".JSON"]) == [
        f"gs://{BUCKET}/store/doc.json"
    ]

    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"gs://{BUCKET}/store/missing.bin")
    assert not storage.exists(f"gs://{BUCKET}/store/missing.bin")


def test_saved_model_from_gcs(gcs, tiny_saved_model: Path, tmp_path: Path):
    gcs.put(str(tiny_saved_model), f"{BUCKET}/models/tiny", recursive=True)
    assert gcs.exists(f"{BUCKET}/models/tiny/saved_model.pb")

    copy = storage.local_copy(f"gs://{BUCKET}/models/tiny", str(tmp_path))
    assert copy == str(tmp_path / "tiny")
    local_files = {
        p.relative_to(tiny_saved_model).as_posix(): p.read_bytes()
        for p in tiny_saved_model.rglob("*")
        if p.is_file()
    }
    copied_files = {
        p.relative_to(copy).as_posix(): p.read_bytes() for p in Path(copy).rglob("*") if p.is_file()
    }
    assert copied_files == local_files

    remote = load_backbone(f"savedmodel:gs://{BUCKET}/models/tiny")
    local = load_backbone(f"savedmodel:{tiny_saved_model}")
    assert remote.dim == local.dim == 4
    assert remote.weights_sha256 == local.weights_sha256


def test_extract_to_gcs(gcs_corpus, tiny_saved_model: Path):
    config = RunConfig(
        runner="local",
        gem=GeMConfig(backbone=f"savedmodel:{tiny_saved_model}", image_size=64),
    )
    output = f"gs://{BUCKET}/out/descriptors"
    summary = extract(f"gs://{BUCKET}/corpus", output, config)
    assert (summary["inputs"], summary["indexed"], summary["failed"]) == (4, 3, 1)
    assert summary["failures_by_kind"] == {"not_an_image": 1}
    assert storage.read_json(f"{output}/summary.json")["indexed"] == 3

    ids, uris, vectors = descriptor_shards.read_all(output)
    photos = sorted(i for i in gcs_corpus if i != "notes.jpg")
    assert ids == photos
    assert uris == [f"gs://{BUCKET}/corpus/{i}" for i in photos]
    assert vectors.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    again = extract(f"gs://{BUCKET}/corpus", output, config)  # every shard already committed
    assert again["shards_skipped"] == again["shards"] == 1
    assert (again["indexed"], again["failed"]) == (3, 1)


def test_delf_model_on_gcs_is_copied_to_a_local_folder_first(gcs, tmp_path):
    """TensorFlow's own gs:// client ignores the emulator: the DELF loader copies the folder
    through gcsfs, then loads it like a local SavedModel (same features as the local copy)."""
    from support import save_tiny_delf

    from retrieval.images import DecodedImage
    from retrieval.local_features.delf_hub import DelfExtractor
    from retrieval.local_features.extractor import LocalFeatureConfig

    local = save_tiny_delf(tmp_path / "delf")
    gcs.put(str(local), f"{BUCKET}/models/delf", recursive=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    image = DecodedImage(pixels, 96, 64)
    remote = DelfExtractor(LocalFeatureConfig(method=f"delf:gs://{BUCKET}/models/delf"))
    here = DelfExtractor(LocalFeatureConfig(method=f"delf:{local}"))
    a, b = remote.extract(image), here.extract(image)
    assert len(a) > 0
    np.testing.assert_array_equal(a.locations, b.locations)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    assert remote.info()["weights_sha256"] == here.info()["weights_sha256"]


# --- the whole pipeline on gs://, with and without faults ----------------------------------------

PIPELINE_IMAGES = 8


@pytest.fixture(scope="module")
def pipeline_corpus(gcs, tmp_path_factory) -> tuple[str, Path]:
    """gs://cbir-test/pipeline/corpus: small pattern images; and a benchmark folder over the same
    images (for `evaluate`, whose report goes to gs://)."""
    images = pattern_images(PIPELINE_IMAGES)
    for name, data in images.items():
        gcs.pipe(f"{BUCKET}/pipeline/corpus/{name}", data)
    benchmark = write_tiny_benchmark(tmp_path_factory.mktemp("benchmark") / "tiny", images)
    return f"gs://{BUCKET}/pipeline", benchmark


@pytest.fixture(scope="module")
def pipeline_config(tiny_saved_model: Path) -> RunConfig:
    return RunConfig(
        runner="local",
        workers=2,
        threads_per_worker=1,
        shard_size=3,
        gem=GeMConfig(backbone=f"savedmodel:{tiny_saved_model}", image_size=64),
    )


@pytest.fixture(scope="module")
def gcs_fault_free(pipeline_corpus, pipeline_config) -> dict:
    root, benchmark = pipeline_corpus
    return run_pipeline(f"{root}/corpus", f"{root}/clean", pipeline_config, benchmark)


def _top(results: list[dict]) -> list[tuple[str, int, str]]:
    return sorted((r["query_id"], r["rank"], r["id"]) for r in results)


def _scores(report: dict) -> list[tuple]:
    return [(r["name"], r["mAP"], r["mP@1"]) for r in report["results"]]


def test_pipeline_on_gcs(pipeline_corpus, gcs_fault_free):
    root, _ = pipeline_corpus
    extract_summary = gcs_fault_free["summaries"]["extract"]
    assert (extract_summary["inputs"], extract_summary["indexed"], extract_summary["failed"]) == (
        PIPELINE_IMAGES,
        PIPELINE_IMAGES,
        0,
    )
    assert gcs_fault_free["ids"] == sorted(pattern_images(PIPELINE_IMAGES))
    assert gcs_fault_free["summaries"]["merge"]["ntotal"] == PIPELINE_IMAGES
    top1 = {r["query_id"]: r["id"] for r in gcs_fault_free["results"] if r["rank"] == 0}
    assert top1 == {i: i for i in gcs_fault_free["ids"]}
    report = gcs_fault_free["report"]
    accounting = {"inputs": PIPELINE_IMAGES, "indexed": PIPELINE_IMAGES, "failed": 0}
    assert report["accounting"] == accounting
    assert report["queries"] == 2 and report["results"][0]["mAP"] is not None
    # The cropped query went to the report's folder on gs://, not to a local folder "gs:".
    assert storage.exists(f"{root}/clean/report/query_inputs/img00.png")
    assert not (Path.cwd() / "gs:").exists()


def test_ten_percent_faults_on_gcs_change_nothing(
    gcs_server, pipeline_corpus, pipeline_config, gcs_fault_free, monkeypatch
):
    endpoint, env = gcs_server
    root, benchmark = pipeline_corpus
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # backoff is tested elsewhere
    monkeypatch.setenv(storage.TIMEOUT_ENV, "2")  # a stalled request fails after 2 s
    proxy = FaultyProxy(endpoint, rate=0.1, seed=3)
    point_gcs_at(env, proxy.endpoint)  # Beam's worker processes inherit it
    try:
        # Extraction on Beam with 2 worker processes (they reach the emulator through the proxy).
        faulty = run_pipeline(
            f"{root}/corpus", f"{root}/faulty", replace(pipeline_config, runner="beam"), benchmark
        )
    finally:
        point_gcs_at(env, endpoint)
        proxy.close()
    assert all(proxy.faults.values()), proxy.faults  # faults of every kind happened
    assert proxy.abandoned == proxy.faults["timeout"]  # the client timed out on every stall
    extract_summary = faulty["summaries"]["extract"]
    assert (extract_summary["inputs"], extract_summary["indexed"], extract_summary["failed"]) == (
        PIPELINE_IMAGES,
        PIPELINE_IMAGES,
        0,
    )
    assert faulty["ids"] == gcs_fault_free["ids"]
    np.testing.assert_allclose(faulty["vectors"], gcs_fault_free["vectors"], atol=1e-5)
    assert _top(faulty["results"]) == _top(gcs_fault_free["results"])
    assert faulty["report"]["accounting"] == gcs_fault_free["report"]["accounting"]
    assert _scores(faulty["report"]) == _scores(gcs_fault_free["report"])


def test_stalled_requests_time_out_and_are_retried(gcs_server, gcs, monkeypatch, caplog):
    """A request that gets no answer fails after the storage timeout (the client hangs up, it
    does not wait for the server) and counts as transient: DEFAULT_ATTEMPTS tries in all."""
    endpoint, env = gcs_server
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setenv(storage.TIMEOUT_ENV, "0.5")
    gcs.pipe(f"{BUCKET}/stall/a.bin", b"x")
    proxy = FaultyProxy(endpoint, rate=0.0)
    stalled = f"/storage/v1/b/{BUCKET}/o/stall%2Fa.bin"  # the object's metadata and media
    proxy.stall_paths = {stalled}
    point_gcs_at(env, proxy.endpoint)
    try:
        with pytest.raises(Exception) as raised, caplog.at_level("WARNING"):
            storage.read_bytes(f"gs://{BUCKET}/stall/a.bin")
    finally:
        point_gcs_at(env, endpoint)
        proxy.close()
    assert storage.is_transient(raised.value)
    assert caplog.text.count("retry ") == storage.DEFAULT_ATTEMPTS - 1
    assert proxy.abandoned == proxy.requests[stalled] >= storage.DEFAULT_ATTEMPTS
