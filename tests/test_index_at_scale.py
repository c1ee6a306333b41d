"""The default index for more than 20,000 vectors (OPQ-IVF-PQ), built the scalable way.

Trained on a uniform sample, encoded in index tasks over groups of shards, merged in rounds of
fan-in 2 (into one index, into 2 pieces, and on disk), searched with α-query expansion: every
variant must answer exactly what a single-shot build (one task, one index) answers.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from support import D, write_descriptors

from retrieval.index import factory as factories
from retrieval.index.codebook import train_codebook
from retrieval.index.group_index import build_index_groups
from retrieval.index.merge import merge_index_groups, plan_merge
from retrieval.index.search import load_index
from retrieval.rerank.query_expansion import QueryExpansion

N_SHARDS, SHARD = 6, 3_700  # 22,200 vectors: past the exact-search limit
EXPANSION = QueryExpansion(n=3, alpha=3.0)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 300 centres, like descriptors of many views of fewer places."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((300, d))
    x = centres[rng.integers(0, 300, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("scale")
    vectors = _clustered(N_SHARDS * SHARD, D, seed=5)
    write_descriptors(root / "desc", [SHARD] * N_SHARDS, vectors=vectors)
    # A smaller sample than faiss recommends keeps OPQ training to seconds; equality of the
    # build paths does not depend on the codebook's quality.
    codebook = train_codebook(str(root / "desc"), str(root / "cb"), sample_size=6_000, seed=0)
    assert codebook["factory"] == factories.default_factory(len(vectors), vectors.shape[1])
    assert codebook["factory"].startswith("OPQ") and ",IVF" in codebook["factory"]
    # The reference: one task over every shard, one index.
    build_index_groups(
        str(root / "desc"), str(root / "cb"), str(root / "one-group"), group_vectors=10**9
    )
    merge_index_groups(str(root / "one-group"), str(root / "single"))
    # The scalable way: one task per shard, merged with fan-in 2.
    summary = build_index_groups(
        str(root / "desc"), str(root / "cb"), str(root / "groups"), group_vectors=SHARD
    )
    assert summary["groups"] == N_SHARDS
    return root, vectors


def _answers(index_dir: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = load_index(str(index_dir), nprobe=16)
    return index.search_expanded(queries, 10, EXPANSION)


@pytest.mark.parametrize(
    ("pieces", "on_disk"), [(1, False), (2, False), (1, True)], ids=["one", "pieces2", "ondisk"]
)
def test_tree_merge_equals_single_shot_build(built, pieces, on_disk):
    root, vectors = built
    out = root / f"merged-{pieces}-{on_disk}"
    rounds = plan_merge(str(root / "groups"), str(out), fan_in=2, pieces=pieces, on_disk=on_disk)
    assert len(rounds) >= 2  # a real tree: intermediate rounds before the final one
    assert all(len(t.inputs) <= 2 for r in rounds for t in r)
    manifest = merge_index_groups(
        str(root / "groups"), str(out), fan_in=2, pieces=pieces, on_disk=on_disk
    )
    assert len(manifest["pieces"]) == pieces and manifest["ntotal"] == len(vectors)
    assert manifest["on_disk"] == on_disk
    if on_disk:
        assert (out / "index.ivfdata").exists()
    if pieces == 1 and not on_disk:  # the same bytes as the single-shot build's index
        assert (out / "index.faissindex").read_bytes() == (
            root / "single" / "index.faissindex"
        ).read_bytes()

    queries = vectors[::97]
    expected_scores, expected = _answers(root / "single", queries)
    scores, found = _answers(out, queries)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    # and the index really is the compressed default, not exact search
    single = load_index(str(root / "single"))
    assert isinstance(faiss.downcast_index(single.pieces[0]), faiss.IndexPreTransform)


def test_group_outputs_carry_no_codebook(built):
    root, _ = built
    codebook_bytes = (root / "cb" / "codebook.faissindex").stat().st_size
    codes = sorted((root / "groups").glob("group-*.codes"))
    assert len(codes) == N_SHARDS
    # codes + ids of 3,700 vectors at 8 bytes + 8 bytes id, plus list headers; no codebook copy
    for path in codes:
        assert path.stat().st_size < SHARD * 16 + 64 * 1024
    assert codebook_bytes > 0


@pytest.mark.parametrize("on_disk", [False, True], ids=["ram", "ondisk"])
def test_streamed_merge_writes_what_folding_in_memory_writes(built, on_disk):
    """The merge copies codes file to file; folding every input into one in-memory index (the
    plain faiss way) must give the same files, byte for byte."""
    root, _ = built
    outs = [root / f"{name}-{on_disk}" for name in ("streamed", "inmemory")]  # same length
    for out, stream in zip(outs, (True, False), strict=True):
        merge_index_groups(
            str(root / "groups"), str(out), fan_in=2, on_disk=on_disk, stream_codes=stream
        )
    names = sorted(p.name for p in outs[1].iterdir() if p.suffix in (".faissindex", ".ivfdata"))
    assert names == (["index.faissindex", "index.ivfdata"] if on_disk else ["index.faissindex"])
    for name in names:
        # an on-disk index names its data file by path: the folders differ only by name
        streamed = (outs[0] / name).read_bytes().replace(bytes(outs[0]), bytes(outs[1]))
        assert streamed == (outs[1] / name).read_bytes()
