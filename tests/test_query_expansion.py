"""α-query expansion: the formula, and search with expansion on a real (exact) index."""

from __future__ import annotations

import numpy as np
import pytest
from support import MODEL_INFO, write_descriptors

from retrieval.descriptors.pooling import l2_normalize
from retrieval.index.codebook import train_codebook
from retrieval.index.group_index import build_index_groups
from retrieval.index.merge import merge_index_groups
from retrieval.index.search import NO_EXPANSION, load_index
from retrieval.rerank.query_expansion import QueryExpansion, alpha_query_expansion
from retrieval.shards import descriptor_shards


def test_alpha_query_expansion_by_hand():
    q = np.array([[1.0, 0.0, 0.0]])
    neighbours = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    similarities = np.array([[0.5, -0.2]])  # negative similarity: weight 0
    expanded = alpha_query_expansion(q, neighbours, similarities, alpha=2.0)
    # q + 0.5^2 * e2 + 0 * e3 = (1, 0.25, 0), normalized
    np.testing.assert_allclose(expanded, l2_normalize(np.array([[1.0, 0.25, 0.0]])), atol=1e-6)
    assert expanded.dtype == np.float32


def test_alpha_zero_is_average_query_expansion():
    q = np.array([[1.0, 0.0]])
    neighbours = np.array([[[0.0, 1.0], [0.6, 0.8]]])
    expanded = alpha_query_expansion(q, neighbours, np.array([[0.1, 0.9]]), alpha=0.0)
    np.testing.assert_allclose(expanded, l2_normalize(np.array([[1.6, 1.8]])), atol=1e-6)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        QueryExpansion(n=-1)


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("qe")
    desc = root / "desc"
    ids, vectors = write_descriptors(desc, [20, 20, 20], seed=3)
    train_codebook(str(desc), str(root / "cb"), factory="IDMap2,Flat")
    build_index_groups(str(desc), str(root / "cb"), str(root / "shards"), group_vectors=20)
    merge_index_groups(str(root / "shards"), str(root / "index"), fan_in=2)
    return load_index(str(root / "index")), ids, vectors


def test_search_with_expansion_matches_a_hand_expanded_query(exact_index):
    index, ids, vectors = exact_index
    query, query_id = vectors[:1], ids[0]
    sims = vectors @ query[0]
    order = [i for i in np.argsort(-sims) if ids[i] != query_id][:2]  # self is skipped
    expanded = l2_normalize(query[0] + sum(sims[i] ** 3 * vectors[i] for i in order))
    expected = np.argsort(-(vectors @ expanded))[:10]
    _, found = index.search_expanded(query, 10, QueryExpansion(n=2, alpha=3.0), [query_id])
    assert list(found[0]) == list(expected)


def test_no_expansion_is_plain_search(exact_index):
    index, ids, vectors = exact_index
    plain = index.search(vectors[:5], 7)
    same = index.search_expanded(vectors[:5], 7, NO_EXPANSION, ids[:5])
    np.testing.assert_array_equal(plain[1], same[1])


def test_reconstruct_returns_stored_vectors_and_zeros_for_padding(exact_index):
    index, _, vectors = exact_index
    got = index.reconstruct(np.array([[0, 5, -1]]))
    np.testing.assert_allclose(got[0, :2], vectors[[0, 5]], atol=1e-6)
    assert not got[0, 2].any()


def test_queries_from_another_model_are_refused(exact_index, tmp_path):
    index, _, _ = exact_index
    other_model = {**MODEL_INFO, "id": "gem-other", "config_hash": "e" * 16}
    write_descriptors(tmp_path / "queries", [3], model_info=other_model)
    with pytest.raises(ValueError, match="gem-other"):
        index.check_query_model(descriptor_shards.list_shards(str(tmp_path / "queries")))
    write_descriptors(tmp_path / "same", [3])
    index.check_query_model(descriptor_shards.list_shards(str(tmp_path / "same")))
