"""`retrieval learn` mines matching pairs without labels and learns a whitening, on a folder of
real photos that has no ground truth at all; `retrieval whiten` + `search` then apply it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import OXFORD_IMAGES

from pipelines import cli
from retrieval.learning.mining import MiningConfig, propose_pairs

# Two buildings seen twice or more, and two photos of other places (names only pick the files;
# nothing here tells the code which photos match).
PHOTOS = [
    "radcliffe_camera_000093",
    "radcliffe_camera_000171",
    "radcliffe_camera_000085",
    "radcliffe_camera_000340",
    "christ_church_000179",
    "christ_church_000311",
    "all_souls_000183",
    "oriel_000072",
]


@pytest.fixture(scope="module")
def unlabelled_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name in PHOTOS:
        source = OXFORD_IMAGES / f"{name}.jpg"
        if not source.exists():
            pytest.skip(f"{source} not available")
        shutil.copy(source, folder / f"{name}.jpg")  # a temporary copy, outside the repository
    assert not (folder / "gt.json").exists()
    work = tmp_path_factory.mktemp("work")
    assert (
        cli.main(
            [
                "extract",
                "--input",
                str(folder),
                "--output",
                str(work / "descriptors"),
                "--local-output",
                str(work / "local"),
                "--runner",
                "local",
            ]
        )
        == 0
    )
    return folder, work


def test_extract_writes_local_features_in_the_same_pass(unlabelled_corpus):
    _, work = unlabelled_corpus
    summary = json.loads((work / "descriptors" / "summary.json").read_text())
    local = summary["local_features"]
    assert summary["inputs"] == summary["indexed"] == len(PHOTOS)
    assert local["rows"] == len(PHOTOS) and local["failed"] == 0
    assert 300 < local["features_per_image"] <= 1000
    assert local["bytes_per_image"] > 100 * 56  # int8 codes of hundreds of features
    assert local["model"]["id"] == "rootsift-pca56@448x1000"


def test_learn_mines_pairs_without_labels_and_whitening_applies_at_search(
    unlabelled_corpus, tmp_path
):
    folder, work = unlabelled_corpus
    model = tmp_path / "model"
    args = ["--descriptors", str(work / "descriptors"), "--local", str(work / "local")]
    settings = ["--mine-neighbours", "3", "--mine-min-pairs", "2", "--whitening-dim", "4"]
    assert cli.main(["learn", *args, "--output", str(model), *settings]) == 0
    record = json.loads((model / "whitening.json").read_text())
    mining = record["mining"]
    assert mining["verified_pairs"] >= 2
    assert mining["proposed_pairs"] >= mining["verified_pairs"]
    assert mining["mining_s"] > 0 and mining["ms_per_sampled_image"] > 0
    assert record["dim"] == 4 and record["base_model"]["id"].startswith(
        "gem-p3/efficientnet-lite0@362"
    )
    assert not (folder / "gt.json").exists()

    whitened = tmp_path / "whitened"
    assert (
        cli.main(
            [
                "whiten",
                "--descriptors",
                str(work / "descriptors"),
                "--whitening",
                str(model),
                "--output",
                str(whitened),
            ]
        )
        == 0
    )
    for stage in (
        ["train", "--descriptors", str(whitened), "--output", str(tmp_path / "cb")],
        [
            "index",
            "--descriptors",
            str(whitened),
            "--codebook",
            str(tmp_path / "cb"),
            "--output",
            str(tmp_path / "shards"),
            "--runner",
            "local",
        ],
        ["merge", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "index")],
        # raw query descriptors: search whitens them with the index's whitening
        [
            "search",
            "--index",
            str(tmp_path / "index"),
            "--queries",
            str(work / "descriptors"),
            "--output",
            str(tmp_path / "results"),
            "--k",
            "3",
            "--local",
            str(work / "local"),
        ],
    ):
        assert cli.main(stage) == 0, stage
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["whitening"]["sha256"] == record["sha256"]
    assert summary["rerank_stats"]["pairs_verified"] > 0
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "results" / "results.parquet").to_pylist()
    top = {r["query_id"]: r["id"] for r in rows if r["rank"] == 0}
    assert top == {q: q for q in top}  # each photo finds itself first
    assert any(r["inliers"] >= 20 for r in rows if r["id"] != r["query_id"])


def test_learn_refuses_a_corpus_with_too_few_verified_pairs(unlabelled_corpus, tmp_path, capsys):
    _, work = unlabelled_corpus
    code = cli.main(
        [
            "learn",
            "--descriptors",
            str(work / "descriptors"),
            "--local",
            str(work / "local"),
            "--output",
            str(tmp_path / "m"),
            "--mine-min-pairs",
            "1000",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("retrieval: error: ") and "verified pairs" in err
    assert "Traceback" not in err


def test_mining_samples_with_a_seed():
    vectors = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    config = MiningConfig(neighbours=3, sample_size=20, seed=1)
    a, b = propose_pairs(vectors, config), propose_pairs(vectors, config)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 0] < a[:, 1]).all() and len(a) <= 20 * 3
    other = propose_pairs(vectors, MiningConfig(neighbours=3, sample_size=20, seed=2))
    assert not np.array_equal(a, other)
