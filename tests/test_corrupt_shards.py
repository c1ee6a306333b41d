"""A committed shard whose bytes changed is not trusted: a re-run of ``extract`` checks what it
would skip (size, then SHA-256 of the manifest's files) and extracts a damaged shard again,
descriptor or local-feature shard; and ``train`` / ``search`` reading damaged data end in one
line naming the file and what to do (exit status 2), not a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import pattern_images, save_tiny_saved_model

from pipelines import cli, stages
from pipelines.config import build_config
from retrieval.shards import descriptor_shards, local_feature_shards
from retrieval.shards.local_feature_shards import LocalFeatureStore


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def config(model):
    return build_config(
        {
            "backbone": f"savedmodel:{model}",
            "image_size": 64,
            "runner": "local",
            "workers": 1,
            "shard_size": 4,
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, data in pattern_images(10).items():
        (folder / name).write_bytes(data)
    return folder


def _flip(path: Path) -> None:
    """One byte changed in place: the same size, other bytes (what bit rot or a stray write
    leaves; only the checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("retrieval: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_rerun_extracts_a_damaged_descriptor_shard_again(tmp_path: Path, corpus, config):
    out, local = tmp_path / "desc", tmp_path / "local"
    first = stages.extract(str(corpus), str(out), config, local_output=str(local))
    assert (first["shards"], first["failed"]) == (3, 0)
    ids, _, vectors = descriptor_shards.read_all(str(out))
    _flip(out / "part-00001.parquet")

    again = stages.extract(str(corpus), str(out), config, local_output=str(local))
    assert again["shards_skipped"] == 2 and again.get("shards_repaired") == 1
    assert again["inputs"] == again["indexed"] == 10
    ids_after, _, vectors_after = descriptor_shards.read_all(str(out))  # checksums hold again
    assert ids_after == ids
    np.testing.assert_allclose(vectors_after, vectors, atol=1e-6)
    third = stages.extract(str(corpus), str(out), config, local_output=str(local))
    assert third["shards_repaired"] == 0 and third["shards_skipped"] == 3  # repaired for good


def test_a_rerun_extracts_a_damaged_local_feature_shard_again(tmp_path: Path, corpus, config):
    out, local = tmp_path / "desc", tmp_path / "local"
    stages.extract(str(corpus), str(out), config, local_output=str(local))
    data = local / "part-00002.arrow"
    data.write_bytes(data.read_bytes()[:-10])  # cut short: the size tells, nothing is read

    again = stages.extract(str(corpus), str(out), config, local_output=str(local))
    assert again["shards_skipped"] == 2 and again.get("shards_repaired") == 1
    store = LocalFeatureStore(str(local))
    manifest = local_feature_shards.list_shards(str(local))[2]
    assert all(store.get(i) is not None for i in manifest["ids"])


def test_train_and_search_name_a_damaged_file_in_one_line(tmp_path: Path, corpus, model, capsys):
    flags = ["--backbone", f"savedmodel:{model}", "--image-size", "64", "--runner", "local"]
    flags += ["--workers", "1", "--shard-size", "4"]
    desc, queries = tmp_path / "desc", tmp_path / "queries"
    assert cli.main(["extract", "--input", str(corpus), "--output", str(desc), *flags]) == 0
    assert cli.main(["extract", "--input", str(corpus), "--output", str(queries), *flags]) == 0
    cb, groups, index = tmp_path / "cb", tmp_path / "groups", tmp_path / "index"
    assert cli.main(["train", "--descriptors", str(desc), "--output", str(cb)]) == 0
    build = ["index", "--descriptors", str(desc), "--codebook", str(cb), "--output", str(groups)]
    assert cli.main(build) == 0
    assert cli.main(["merge", "--shards", str(groups), "--output", str(index)]) == 0
    capsys.readouterr()

    _flip(desc / "part-00001.parquet")
    assert cli.main(["train", "--descriptors", str(desc), "--output", str(tmp_path / "cb2")]) == 2
    line = _error_line(capsys)
    assert str(desc / "part-00001.parquet") in line and "retrieval extract" in line

    search = ["search", "--index", str(index), "--queries", str(queries), "--qe", "0"]
    search += ["--output", str(tmp_path / "results")]
    _flip(queries / "part-00000.parquet")
    assert cli.main(search) == 2
    line = _error_line(capsys)
    assert str(queries / "part-00000.parquet") in line and "retrieval extract" in line

    index_file = next(p for p in index.iterdir() if p.suffix == ".faissindex")
    _flip(index_file)
    # the queries repaired by a re-run (the line said so); now the damaged index file
    assert cli.main(["extract", "--input", str(corpus), "--output", str(queries), *flags]) == 0
    capsys.readouterr()
    assert cli.main(search) == 2
    line = _error_line(capsys)
    assert str(index_file) in line and "build the index again" in line
