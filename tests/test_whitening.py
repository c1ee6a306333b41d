"""Learned whitening against a plain NumPy reference, its properties, and its artefact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.learning.whitening import (
    learn_whitening,
    load_whitening,
    query_whitening,
    save_whitening,
    whitened_model_info,
)


def _reference(x: np.ndarray, pairs: np.ndarray, dim: int, shrinkage: float) -> np.ndarray:
    """Radenović et al.'s learned whitening written out step by step (PCA, pair-difference
    whitening by Cholesky, rotation): the projection applied to (x - mean)."""
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(cov)
    pca = vectors[:, np.argsort(values)[::-1][:dim]].T  # (dim, d)
    z = (x - mean) @ pca.T
    diffs = np.stack([z[i] - z[j] for i, j in pairs])
    within = sum(np.outer(v, v) for v in diffs) / len(diffs)
    within = (1 - shrinkage) * within + shrinkage * np.trace(within) / dim * np.eye(dim)
    whiten = np.linalg.inv(np.linalg.cholesky(within))  # any W with W S W^T = I
    zw = z @ whiten.T
    values, vectors = np.linalg.eigh(np.cov(zw, rowvar=False, bias=True))
    rotation = vectors[:, np.argsort(values)[::-1]].T
    return rotation @ whiten @ pca


def _data(seed: int = 0, n: int = 120, d: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d)) * rng.uniform(0.2, 3.0, size=d)
    labels = np.repeat(np.arange(30), n // 30)
    x = centres[labels] + rng.normal(size=(n, d)) * rng.uniform(0.1, 1.0, size=d)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]])
    return x, pairs


@pytest.mark.parametrize(("dim", "shrinkage"), [(24, 0.0), (12, 0.0), (12, 0.3), (8, 1.0)])
def test_whitening_matches_the_numpy_reference(dim, shrinkage):
    x, pairs = _data()
    learned = learn_whitening(x, pairs, dim=dim, shrinkage=shrinkage)
    reference = _reference(x, pairs, dim, shrinkage)
    assert learned.projection.shape == (dim, x.shape[1])
    # Eigenvectors are defined up to sign: compare rows up to sign.
    signs = np.sign(np.sum(learned.projection * reference, axis=1, keepdims=True))
    np.testing.assert_allclose(learned.projection, signs * reference, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(learned.mean, x.mean(axis=0))


def test_unshrunk_whitening_makes_pair_differences_identity_covariance():
    x, pairs = _data(1)
    learned = learn_whitening(x, pairs, dim=24, shrinkage=0.0)
    y = (x - learned.mean) @ learned.projection.T
    diffs = y[pairs[:, 0]] - y[pairs[:, 1]]
    np.testing.assert_allclose(diffs.T @ diffs / len(diffs), np.eye(24), atol=1e-8)


def test_whitening_brings_matching_descriptors_closer_than_others():
    x, pairs = _data(2)
    learned = learn_whitening(x, pairs, dim=16, shrinkage=0.1)
    y = learned.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)

    def separation(v):  # mean similarity of matching pairs minus that of all pairs
        sims = v @ v.T
        return sims[pairs[:, 0], pairs[:, 1]].mean() - sims.mean()

    assert separation(y) > separation(raw)


def test_dim_is_capped_by_the_number_of_images():
    x, pairs = _data()
    few = pairs[(pairs < 20).all(axis=1)]  # 20 images: a PCA of them has 19 components
    assert learn_whitening(x[:20], few, dim=512).dim == 19


def test_artefact_round_trip_and_fingerprint(tmp_path):
    x, pairs = _data()
    learned = learn_whitening(x, pairs, dim=10)
    record = save_whitening(learned, str(tmp_path), mining={"verified_pairs": len(pairs)})
    back = load_whitening(str(tmp_path))
    np.testing.assert_array_equal(back.projection, learned.projection)
    np.testing.assert_array_equal(back.apply(x), learned.apply(x))
    assert record["sha256"] == learned.sha256 and record["dim"] == 10

    base = {"id": "gem", "config_hash": "a" * 16, "weights_sha256": "b" * 64, "dim": 24}
    info = whitened_model_info(base, record, str(tmp_path))
    assert info["config_hash"] != base["config_hash"] and info["dim"] == 10
    assert info["id"].startswith("gem+lw10-")
    # Raw queries of the base model are whitened at query time; whitened ones are not.
    assert query_whitening(info, [base]).sha256 == learned.sha256
    assert query_whitening(info, [info]) is None


def test_altered_or_foreign_artefacts_are_refused(tmp_path):
    x, pairs = _data()
    save_whitening(learn_whitening(x, pairs, dim=10), str(tmp_path))
    record = json.loads((tmp_path / "whitening.json").read_text())
    (tmp_path / "whitening.json").write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_whitening(str(tmp_path))
    (tmp_path / "whitening.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    with pytest.raises(OSError, match="checksum"):
        load_whitening(str(tmp_path))


def test_no_pairs_is_an_error():
    x, _ = _data()
    with pytest.raises(ValueError, match="pair"):
        learn_whitening(x, np.zeros((0, 2), int))
