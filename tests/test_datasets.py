"""`retrieval datasets fetch` against a local HTTP server serving small archives in each
benchmark's official layout: download, resume, SHA-256 checks, unpacking, conversion."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from official_layouts import (
    ServedFiles,
    gldv2_files,
    holidays_files,
    http_server,
    oxford_files,
    paris_files,
    revisitop_gnd,
    roxford_files,
    ukbench_files,
)

from pipelines.cli import main
from retrieval.datasets import registry
from retrieval.datasets.fetch import FetchError, download, fetch_dataset, read_sums, unpack
from retrieval.datasets.formats import (
    FormatError,
    UnsafePickleError,
    holidays_queries,
    read_revisitop_gnd,
    safe_load_pickle,
    ukbench_queries,
)
from retrieval.evaluation.ground_truth import load_benchmark


def _fetch(name: str, files: dict[str, bytes], to: Path, **kwargs) -> dict:
    served = ServedFiles(files)
    with http_server(served) as url:
        return fetch_dataset(registry.get(name), to, mirror=url, progress=False, **kwargs)


def test_every_known_dataset_has_a_converter_and_publisher_urls():
    from retrieval.datasets.formats import CONVERTERS

    for spec in registry.DATASETS.values():
        assert spec.converter in CONVERTERS
        assert all(f.url.startswith(("https://", "http://", "ftp://")) for f in spec.files)
        assert spec.citation and spec.licence
        # No digest is invented: none of these publishers publishes SHA-256 digests.
        assert all(f.sha256 is None for f in spec.files)


def test_oxford5k_fetch_converts_with_query_crops(tmp_path):
    record = _fetch("oxford5k", oxford_files(), tmp_path / "ox")
    assert record["images"] == 12 and record["queries"] == 4
    bench = load_benchmark(tmp_path / "ox")
    assert bench.query_in_ranking
    query = next(q for q in bench.queries if q.id == "all_souls_000001")
    assert query.bbox == (4.5, 3.2, 50.7, 40.0)
    assert query.landmark == "all_souls"
    assert query.positives == {
        "all_souls_000000",
        "all_souls_000001",
        "all_souls_000002",
        "all_souls_000003",
    }
    assert query.junk == {"all_souls_000004"}
    assert (tmp_path / "ox" / "images" / "all_souls_000005.jpg").is_file()
    assert not (tmp_path / "ox" / "raw").exists()
    # digests recorded on first download (none published), and in dataset.json
    sums = read_sums(tmp_path / "ox" / "downloads")
    expected = hashlib.sha256(oxford_files()["gt_files_170407.tgz"]).hexdigest()
    assert sums["gt_files_170407.tgz"] == expected
    # a second fetch finds it done and downloads nothing
    served = ServedFiles(oxford_files())
    with http_server(served) as url:
        again = fetch_dataset(registry.get("oxford5k"), tmp_path / "ox", mirror=url, progress=False)
    assert again["already_fetched"] and served.requests == []


def test_paris6k_nested_archives(tmp_path):
    record = _fetch("paris6k", paris_files(), tmp_path / "pa")
    bench = load_benchmark(tmp_path / "pa")
    assert record["images"] == 8 and len(bench.queries) == 2
    assert {q.landmark for q in bench.queries} == {"defense", "eiffel"}
    assert record["warnings"] == ["converted 2 queries; the published paris6k has 55"]


def test_roxford5k_keeps_queries_out_of_the_database(tmp_path):
    _fetch("roxford5k", roxford_files(), tmp_path / "rox")
    bench = load_benchmark(tmp_path / "rox")
    assert len(bench.images) == 8 and len(bench.query_images) == 4
    assert not set(bench.images) & set(bench.query_images)
    assert (tmp_path / "rox" / "queries" / "all_souls_000001.jpg").is_file()
    assert bench.image_path("all_souls_000001").parent.name == "queries"
    q = next(q for q in bench.queries if q.id == "all_souls_000002")
    assert q.easy == {"all_souls_000000"} and q.hard == {"all_souls_000003"}
    assert q.junk == {"all_souls_000004"} and q.bbox == (4.5, 3.2, 48.7, 40.0)


def test_holidays_and_ukbench_groups(tmp_path):
    _fetch("holidays", holidays_files(), tmp_path / "hol")
    bench = load_benchmark(tmp_path / "hol")
    assert [q.id for q in bench.queries] == ["100000", "100100", "100200"]
    assert bench.queries[2].positives == {"100201", "100202"}
    assert not bench.query_in_ranking

    _fetch("ukbench", ukbench_files(), tmp_path / "ukb")
    bench = load_benchmark(tmp_path / "ukb")
    assert len(bench.queries) == 8
    assert bench.ukbench_groups() is not None and len(bench.ukbench_groups()) == 2


def test_gldv2_lists_without_images(tmp_path):
    record = _fetch("gldv2-retrieval", gldv2_files(), tmp_path / "gld")
    bench = load_benchmark(tmp_path / "gld")
    assert record["queries"] == 2  # the "Ignored" row has no ground truth
    assert bench.query_images == ["bbbb000000000001", "bbbb000000000002"]
    q = bench.queries[0]
    assert q.positives == {"aaaa000000000001", "aaaa000000000002"} and q.landmark == "7"


def test_interrupted_download_resumes_with_range(tmp_path):
    files = oxford_files()
    served = ServedFiles(files, cut_after=1000)
    with http_server(served) as url:
        record = fetch_dataset(
            registry.get("oxford5k"), tmp_path / "ox", mirror=url, progress=False
        )
    archive = (tmp_path / "ox" / "downloads" / "oxbuild_images-v1.tgz").read_bytes()
    assert archive == files["oxbuild_images-v1.tgz"]
    assert ("oxbuild_images-v1.tgz", "bytes=1000-") in served.requests
    assert record["images"] == 12


def test_existing_partial_file_is_resumed(tmp_path):
    data = oxford_files()["oxbuild_images-v1.tgz"]
    dest = tmp_path / "gt.tgz"
    (tmp_path / "gt.tgz.part").write_bytes(data[:2000])
    served = ServedFiles({"gt.tgz": data})
    with http_server(served) as url:
        download(f"{url}/gt.tgz", dest, progress=False)
    assert dest.read_bytes() == data
    assert served.requests == [("gt.tgz", "bytes=2000-")]


def test_digest_mismatch_is_refused(tmp_path):
    files = holidays_files()
    spec = registry.get("holidays")
    wrong = dataclasses.replace(spec.files[0], sha256="0" * 64)
    bad_spec = dataclasses.replace(spec, files=(wrong, spec.files[1]))
    with http_server(ServedFiles(files)) as url, pytest.raises(FetchError, match="SHA-256"):
        fetch_dataset(bad_spec, tmp_path / "h", mirror=url, progress=False)
    # the right registry digest passes
    right = dataclasses.replace(wrong, sha256=hashlib.sha256(files["jpg1.tar.gz"]).hexdigest())
    good_spec = dataclasses.replace(spec, files=(right, spec.files[1]))
    with http_server(ServedFiles(files)) as url:
        record = fetch_dataset(good_spec, tmp_path / "h2", mirror=url, progress=False)
    assert record["files"][0]["check"] == "matches the registry digest"


def test_recorded_digest_guards_a_later_download(tmp_path):
    files = holidays_files()
    _fetch("holidays", files, tmp_path / "h")
    (tmp_path / "h" / "dataset.json").unlink()
    (tmp_path / "h" / "downloads" / "jpg2.tar.gz").unlink()
    changed = {**files, "jpg2.tar.gz": files["jpg2.tar.gz"] + b"tampered"}
    with pytest.raises(FetchError, match="SHA256SUMS"):
        _fetch("holidays", changed, tmp_path / "h")


def test_missing_file_on_server_is_one_clear_error(tmp_path):
    files = oxford_files()
    del files["gt_files_170407.tgz"]
    with pytest.raises(FetchError, match="HTTP 404"):
        _fetch("oxford5k", files, tmp_path / "ox")


def test_archive_escaping_its_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(FetchError, match="refused"):
        unpack(archive, tmp_path / "into")
    assert not (tmp_path / "evil.txt").exists()


# --------------------------------------------------------------------------- formats


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_reads_gnd_and_refuses_code(tmp_path):
    for protocol in (2, 4, 5):
        data = pickle.dumps(revisitop_gnd(), protocol=protocol)
        cfg = safe_load_pickle(data)
        assert cfg["imlist"][0] == "all_souls_000000"
        np.testing.assert_array_equal(cfg["gnd"][0]["hard"], [1])
    with pytest.raises(UnsafePickleError, match=r"refused (posix|os)\.system"):
        safe_load_pickle(pickle.dumps({"gnd": [_Boom()]}))
    objects = np.array([{"a": 1}], dtype=object)
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(pickle.dumps(objects))
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Boom()]}))
    with pytest.raises(FormatError, match="refused"):
        read_revisitop_gnd(path)


def test_gnd_indices_out_of_range_are_refused(tmp_path):
    gnd = revisitop_gnd()
    gnd["gnd"][0]["easy"] = [99]
    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(pickle.dumps(gnd))
    with pytest.raises(FormatError, match="out of range"):
        read_revisitop_gnd(path)


def test_group_readers_refuse_malformed_names():
    with pytest.raises(FormatError, match="single image"):
        holidays_queries(["100000", "100100", "100101"])
    with pytest.raises(FormatError, match="3 images"):
        ukbench_queries([f"ukbench{i:05d}" for i in range(3)])


# --------------------------------------------------------------------------- CLI


def test_cli_list_and_fetch(tmp_path, capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "oxford5k",
        "paris6k",
        "roxford5k",
        "rparis6k",
        "holidays",
        "ukbench",
        "gldv2-retrieval",
    ):
        assert f"{name}: " in out
    with http_server(ServedFiles(ukbench_files())) as url:
        code = main(
            [
                "datasets",
                "fetch",
                "ukbench",
                "--to",
                str(tmp_path / "u"),
                "--mirror",
                url,
                "--no-progress",
            ]
        )
    assert code == 0
    assert "ukbench fetched: 8 images, 8 queries" in capsys.readouterr().out
    gt = json.loads((tmp_path / "u" / "gt.json").read_text())
    assert len(gt["images"]) == 8


def test_cli_fetch_errors_are_one_line(tmp_path, capsys):
    assert main(["datasets", "fetch", "nope", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrieval: error: unknown dataset 'nope'") and err.count("\n") == 1
