"""Revisited Oxford/Paris protocols checked against the revisitop reference computation.

``_revisitop_reference`` re-derives what revisitop's ``compute_map`` computes (evaluate.py in
filipradenovic/revisitop), written independently here as the oracle: positions of the positives
in each ranking column, each moved up by the number of junk images ranked before it, AP by
trapezoids over those positions, and mP@k with the cut-off min(k, position of the last
positive). The example is revisitop's own (example_evaluate.py): ``ranks = argsort(-X.T @ Q)``
over database and query descriptors, scored under Easy, Medium and Hard.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines import cli
from retrieval.datasets.formats import revisitop_to_gt
from retrieval.evaluation import protocols
from retrieval.evaluation.ground_truth import parse_benchmark
from retrieval.evaluation.metrics import evaluate_rankings, revisitop_precision_at_k

KS = (1, 5, 10)


def _revisitop_reference(ranks: np.ndarray, gnd: list[dict], kappas=KS):
    """mAP, per-query AP, mP@k, per-query P@k as revisitop's compute_map (fractions)."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok = np.asarray(g["ok"], dtype=int)
        if ok.size == 0:
            aps.append(math.nan)
            prs.append([math.nan] * len(kappas))
            continue
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk = np.flatnonzero(np.isin(column, np.asarray(g["junk"], dtype=int)))
        pos = pos - np.searchsorted(junk, pos)  # junk ranked before each positive
        j = np.arange(pos.size)
        p0 = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
        p1 = (j + 1) / (pos + 1)
        aps.append(float(np.sum((p0 + p1) / 2) / ok.size))
        one_based = pos + 1
        prs.append(
            [np.sum(one_based <= min(one_based.max(), k)) / min(one_based.max(), k) for k in kappas]
        )
    aps_arr, prs_arr = np.array(aps), np.array(prs)
    return np.nanmean(aps_arr), aps_arr, np.nanmean(prs_arr, axis=0), prs_arr


def _setup(gnd_entry: dict, setup: str) -> dict:
    easy, hard, junk = gnd_entry["easy"], gnd_entry["hard"], gnd_entry["junk"]
    return {
        "easy": {"ok": easy, "junk": junk + hard},
        "medium": {"ok": easy + hard, "junk": junk},
        "hard": {"ok": hard, "junk": junk + easy},
    }[setup]


def _random_revisited(seed: int, n_db: int = 300, n_q: int = 20, dim: int = 32):
    """Descriptors and a gnd in revisitop's structure (indices into imlist); one query has no
    hard positives, so Hard must skip it as revisitop does."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(dim, n_db))
    Q = rng.normal(size=(dim, n_q))
    gnd = []
    for i in range(n_q):
        chosen = rng.choice(n_db, size=rng.integers(3, 25), replace=False)
        cut1, cut2 = sorted(rng.integers(1, len(chosen), size=2))
        easy, hard, junk = chosen[:cut1], chosen[cut1:cut2], chosen[cut2:]
        # make some positives similar to the query so the APs are not all tiny
        X[:, easy[:2]] += 2 * Q[:, [i]]
        if i == 0:
            easy, hard = np.concatenate([easy, hard]), np.array([], dtype=int)
        gnd.append(
            {
                "bbx": [0.0, 0.0, 10.0, 10.0],
                "easy": [int(v) for v in easy],
                "hard": [int(v) for v in hard],
                "junk": [int(v) for v in junk],
            }
        )
    cfg = {
        "imlist": [f"db_{i:04d}" for i in range(n_db)],
        "qimlist": [f"q_{i:03d}" for i in range(n_q)],
        "gnd": gnd,
    }
    return X, Q, cfg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_easy_medium_hard_equal_the_revisitop_reference(seed):
    X, Q, cfg = _random_revisited(seed)
    ranks = np.argsort(-(X.T @ Q), axis=0)  # revisitop's example: db_size x n_queries
    rankings = {q: [cfg["imlist"][r] for r in ranks[:, i]] for i, q in enumerate(cfg["qimlist"])}
    benchmark = parse_benchmark(revisitop_to_gt(cfg, "test"), name="rtest")
    for setup in protocols.REVISITED_SETUPS:
        ref_map, ref_aps, ref_mpr, _ = _revisitop_reference(
            ranks, [_setup(g, setup) for g in cfg["gnd"]]
        )
        ours = evaluate_rankings(rankings, protocols.apply(benchmark, f"revisited-{setup}"))
        assert ours.mean_ap == pytest.approx(ref_map, abs=1e-12), setup
        for i, q in enumerate(cfg["qimlist"]):
            if math.isnan(ref_aps[i]):
                assert math.isnan(ours.per_query_ap[q])
            else:
                assert ours.per_query_ap[q] == pytest.approx(ref_aps[i], abs=1e-12)
        for k, ref in zip(KS, ref_mpr, strict=True):
            assert ours.mean_precision_at[k] == pytest.approx(ref, abs=1e-12), (setup, k)
    hard = protocols.apply(benchmark, "revisited-hard")
    assert "q_000" in evaluate_rankings(rankings, hard).skipped_queries


def test_revisitop_precision_by_hand():
    # cleaned ranking: p n p n n ... ; 2 positives, the last at rank 3
    ranking = ["p1", "j", "n1", "p2", "n2", "n3"]
    assert revisitop_precision_at_k(ranking, {"p1", "p2"}, 1, junk={"j"}) == 1.0
    # cut-off min(3, 5) = 3: 2 hits / 3
    assert revisitop_precision_at_k(ranking, {"p1", "p2"}, 5, junk={"j"}) == pytest.approx(2 / 3)
    assert revisitop_precision_at_k(ranking, {"p9"}, 5) == 0.0


def test_protocol_names():
    assert protocols.expand("roxford") == [f"revisited-{s}" for s in ("easy", "medium", "hard")]
    assert protocols.expand("rparis-hard,roxford-hard") == ["revisited-hard"]
    assert protocols.expand(None) == ["default"]
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.expand("oxford-ultra")
    plain = parse_benchmark(
        {"images": ["a", "b"], "queries": [{"id": "a", "landmark": "x", "positives": ["b"]}]},
        name="plain",
    )
    with pytest.raises(ValueError, match="needs Revisited ground truth"):
        protocols.apply(plain, "revisited-easy")


def _textured(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def test_evaluate_cli_on_a_revisited_benchmark_matches_the_reference(tmp_path):
    """`retrieval evaluate --protocol roxford` on a Revisited-format folder: the crops are
    described, and the no-expansion exact row equals revisitop's computation on the same
    descriptors (ranks = argsort(-X.T Q))."""
    root = tmp_path / "rbench"
    (root / "images").mkdir(parents=True)
    (root / "queries").mkdir()
    n_db, n_q = 20, 3
    for i in range(n_db):
        _textured(i).save(root / "images" / f"db_{i:04d}.jpg", quality=90)
    for i in range(n_q):
        _textured(i).save(root / "queries" / f"q_{i:03d}.jpg", quality=90)  # near-duplicates
    gnd = [
        {"bbx": [10.2, 8.7, 150.4, 110.0], "easy": [0, 5], "hard": [9], "junk": [3]},
        {"bbx": [0.0, 0.0, 80.0, 60.0], "easy": [1], "hard": [2, 7], "junk": []},
        {"bbx": [30.0, 20.0, 159.0, 119.0], "easy": [2, 11], "hard": [], "junk": [12, 13]},
    ]
    cfg = {
        "imlist": [f"db_{i:04d}" for i in range(n_db)],
        "qimlist": [f"q_{i:03d}" for i in range(n_q)],
        "gnd": gnd,
    }
    (root / "gt.json").write_text(json.dumps(revisitop_to_gt(cfg, "test")))
    out = tmp_path / "out"
    code = cli.main(
        [
            "evaluate",
            "--benchmark",
            str(root),
            "--out",
            str(out),
            "--protocol",
            "roxford",
            "--runner",
            "local",
            "--image-size",
            "128",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert {"gem+exact+qe [E]", "gem+exact [M]", "gem+pq [H]"} <= rows.keys()

    crop = Image.open(out / "query_inputs" / "q_000.png")
    assert crop.size == (150 - 10, 110 - 9)  # PIL rounds the float box, as revisitop's crop

    from retrieval.shards import descriptor_shards

    db_ids, _, X = descriptor_shards.read_all(str(out / "descriptors"))
    q_ids, _, Q = descriptor_shards.read_all(str(out / "query_descriptors"))
    X = X[np.argsort(db_ids)]
    Q = Q[np.argsort(q_ids)]
    ranks = np.argsort(-(X @ Q.T), axis=0, kind="stable")
    for setup, tag in (("easy", "E"), ("medium", "M"), ("hard", "H")):
        ref_map, _, ref_mpr, _ = _revisitop_reference(ranks, [_setup(g, setup) for g in gnd])
        row = rows[f"gem+exact [{tag}]"]
        assert row["protocol"] == f"revisited-{setup}"
        assert row["mAP"] == pytest.approx(100 * ref_map, abs=1e-6), setup
        for k, ref in zip(KS, ref_mpr, strict=True):
            assert row[f"mP@{k}"] == pytest.approx(100 * ref, abs=1e-6), (setup, k)
