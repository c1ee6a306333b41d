"""gs:// end to end against the GCS emulator: listing, storage helpers, models, extraction.

gcsfs needs three things against ``gcp-storage-emulator`` (STACK.md pitfall 4):
``STORAGE_EMULATOR_HOST`` (read on every request), anonymous credentials (set through fsspec's
config, so ``url_to_fs("gs://...")`` in library code picks them up), and the plain
``gcsfs.core.GCSFileSystem``: with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` unset when gcsfs is first
imported, ``gcsfs.GCSFileSystem`` is the experimental class, which asks the bucket's type over
gRPC and hangs 60 s per call. Setting the variable after that import changes nothing, so the
fixture also registers the plain class for ``gs``/``gcs`` in fsspec itself; that works whether or
not gcsfs was imported earlier in the session.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.registry import _registry as fsspec_registry
from support import free_port, save_tiny_saved_model, stop_server, wait_until_answering

from pipelines.config import RunConfig
from pipelines.stages import extract
from retrieval import storage
from retrieval.corpus import list_corpus
from retrieval.descriptors.backbones import load_backbone
from retrieval.descriptors.gem import GeMConfig
from retrieval.shards import descriptor_shards

BUCKET = "cbir-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator with bucket ``cbir-test``; yields the gcsfs filesystem that talks to it."""
    emulator = Path(sys.executable).parent / "gcp-storage-emulator"
    if not emulator.exists():
        pytest.fail("gcp-storage-emulator is not installed (the GCS tests need it)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(emulator),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--default-bucket",
            BUCKET,
            "--in-memory",
            "--quiet",
        ],
        cwd=tmp_path_factory.mktemp("gcs-emulator"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_answering(endpoint, server, "gcp-storage-emulator")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", endpoint)
            env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # for a first import
            import gcsfs.core

            plain = gcsfs.core.GCSFileSystem
            for protocol in ("gs", "gcs"):  # in case gcsfs was imported before (see docstring)
                env.setitem(fsspec_registry, protocol, plain)
            env.setitem(fsspec.config.conf, "gs", {"token": "anon"})
            plain.clear_instance_cache()
            try:
                fs, _ = storage.filesystem(f"gs://{BUCKET}")
                assert type(fs) is plain and fs.credentials.method == "anon"
                yield fs
            finally:
                plain.clear_instance_cache()
    finally:
        stop_server(server)


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
