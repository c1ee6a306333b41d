"""Merging IVF codes file to file gives exactly the bytes faiss writes for the merged lists."""

from __future__ import annotations

import io
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.index import codes as codes_io

D, NLIST = 8, 64


@pytest.fixture(scope="module")
def trained() -> faiss.Index:
    rng = np.random.default_rng(0)
    index = faiss.index_factory(D, f"IVF{NLIST},PQ4")
    index.train(rng.standard_normal((4_000, D)).astype(np.float32))
    return index


def _lists_file(index: faiss.Index, n: int, first_id: int, seed: int, path: Path) -> Path:
    part = faiss.clone_index(index)
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    part.add_with_ids(x, np.arange(first_id, first_id + n, dtype=np.int64))
    faiss.write_InvertedLists(faiss.extract_index_ivf(part).invlists, faiss.FileIOWriter(str(path)))
    return path


# 5 vectors fill at most 5 of 64 lists: faiss writes a sparse table; 3,000 fill them all: full.
@pytest.mark.parametrize("sizes", [(5, 3), (3_000, 2_000), (5, 3_000, 0)], ids=str)
def test_merged_lists_equal_faiss_merge_from(trained, tmp_path, sizes):
    paths, first = [], 0
    for i, n in enumerate(sizes):
        paths.append(_lists_file(trained, n, first, seed=i, path=tmp_path / f"in-{i}.codes"))
        first += n
    layouts = [codes_io.read_lists_layout(str(p)) for p in paths]
    assert [lists.ntotal for lists in layouts] == list(sizes)

    out = io.BytesIO()
    assert codes_io.write_merged_lists(out, layouts) == sum(sizes)

    expected = faiss.ArrayInvertedLists(NLIST, trained.code_size)
    for p in paths:
        expected.merge_from(faiss.read_InvertedLists(faiss.FileIOReader(str(p))), 0)
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(expected, writer)
    assert out.getvalue() == faiss.vector_to_array(writer.data).tobytes()


def test_merged_on_disk_lists_equal_merge_ondisk(trained, tmp_path):
    from faiss.contrib.ondisk import merge_ondisk

    parts, layouts, first = [], [], 0
    for i, n in enumerate((700, 0, 1_300)):
        path = _lists_file(trained, n, first, seed=i, path=tmp_path / f"in-{i}.codes")
        layouts.append(codes_io.read_lists_layout(str(path)))
        part = faiss.clone_index(trained)
        codes_io.fold_codes(part, str(path), codes_io.INVLISTS)
        parts.append(str(tmp_path / f"part-{i}.faissindex"))
        faiss.write_index(part, parts[-1])
        first += n
    reference = faiss.clone_index(trained)
    merge_ondisk(reference, parts, str(tmp_path / "reference.ivfdata"))
    faiss.write_index(reference, str(tmp_path / "reference.faissindex"))

    data = io.BytesIO()
    codes_io.write_merged_lists_data(data, layouts)
    assert data.getvalue() == (tmp_path / "reference.ivfdata").read_bytes()
    sizes = codes_io.merged_sizes(layouts)
    header = codes_io.index_prefix(trained, int(sizes.sum())) + codes_io.ondisk_lists_bytes(
        sizes, trained.code_size, str(tmp_path / "reference.ivfdata")
    )
    assert header == (tmp_path / "reference.faissindex").read_bytes()


def test_index_prefix_leaves_the_codebook_empty(trained):
    prefix = codes_io.index_prefix(trained, 123)
    assert prefix is not None and trained.ntotal == 0
    assert codes_io.index_prefix(faiss.IndexFlatL2(D), 0) is None  # no inverted lists


def test_damaged_lists_file_is_refused(trained, tmp_path):
    path = _lists_file(trained, 500, 0, seed=1, path=tmp_path / "in.codes")
    data = path.read_bytes()
    (tmp_path / "short.codes").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header describes"):
        codes_io.read_lists_layout(str(tmp_path / "short.codes"))
    (tmp_path / "other.codes").write_bytes(b"ilod" + data[4:])
    with pytest.raises(ValueError, match="not a faiss inverted lists file"):
        codes_io.read_lists_layout(str(tmp_path / "other.codes"))
    (tmp_path / "mixed.codes").write_bytes(data)
    other = faiss.index_factory(D, f"IVF{NLIST * 2},PQ4")
    other.train(np.random.default_rng(2).standard_normal((4_000, D)).astype(np.float32))
    wide = _lists_file(other, 10, 500, seed=3, path=tmp_path / "wide.codes")
    layouts = [codes_io.read_lists_layout(str(p)) for p in (tmp_path / "mixed.codes", wide)]
    with pytest.raises(ValueError, match="do not fit"):
        codes_io.write_merged_lists(io.BytesIO(), layouts)
