"""Metrics against hand-computed rankings and the shared benchmarks' ground truth.

Hand computations use the trapezoidal rule of revisitop's compute_ap: for each retrieved
positive i (0-based count) at rank r (0-based, after removing junk and the query),
precision_0 = i / r if r > 0 else 1, precision_1 = (i + 1) / (r + 1),
ap += (precision_0 + precision_1) / 2 / nrel, with nrel = number of positives.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import benchmarks_dir
from retrieval.evaluation.ground_truth import Benchmark, Query, load_benchmark
from retrieval.evaluation.metrics import (
    RECALL_LEVELS,
    average_precision,
    evaluate_rankings,
    pr_curve,
    precision_at_k,
    ukbench_ns_score,
)

BENCHMARKS = benchmarks_dir()


# --------------------------------------------------------------------------- AP


def test_ap_all_positives_first_is_one() -> None:
    # a: i=0, r=0 -> (1 + 1/1)/2 = 1;  b: i=1, r=1 -> (1/1 + 2/2)/2 = 1;  ap = (1 + 1)/2 = 1
    assert average_precision(["a", "b", "x", "y"], {"a", "b"}) == pytest.approx(1.0)


def test_ap_junk_interleaved_is_removed() -> None:
    # ranking j1 a x j2 b y -> without junk: a x b y
    # a: i=0, r=0 -> (1 + 1/1)/2 = 1
    # b: i=1, r=2 -> (1/2 + 2/3)/2 = 7/12
    # ap = (1 + 7/12) / 2 = 19/24
    ranking = ["j1", "a", "x", "j2", "b", "y"]
    assert average_precision(ranking, {"a", "b"}, junk={"j1", "j2"}) == pytest.approx(19 / 24)
    # Junk left in place would be penalised: a at r=1 -> (0 + 1/2)/2, b at r=4 -> (1/4 + 2/5)/2
    assert average_precision(ranking, {"a", "b"}) == pytest.approx((0.25 + 0.325) / 2)


def test_ap_query_at_rank_one_is_removed() -> None:
    # ranking q x a b with query_id=q -> x a b
    # a: i=0, r=1 -> (0/1 + 1/2)/2 = 1/4
    # b: i=1, r=2 -> (1/2 + 2/3)/2 = 7/12
    # ap = (1/4 + 7/12) / 2 = 5/12
    ap = average_precision(["q", "x", "a", "b"], {"a", "b"}, query_id="q")
    assert ap == pytest.approx(5 / 12)


def test_ap_missing_positive_counts_as_not_retrieved() -> None:
    # ranking x a y, positives {a, b, c}: nrel = 3 even though b and c never appear
    # a: i=0, r=1 -> (0/1 + 1/2)/2 = 1/4;  ap = (1/4) / 3 = 1/12
    assert average_precision(["x", "a", "y"], {"a", "b", "c"}) == pytest.approx(1 / 12)
    # a first, b and c missing: a: (1 + 1)/2 = 1; ap = 1/3
    assert average_precision(["a"], {"a", "b", "c"}) == pytest.approx(1 / 3)


def test_ap_edge_cases() -> None:
    assert math.isnan(average_precision(["a", "b"], set()))
    assert average_precision([], {"a"}) == 0.0
    assert average_precision(["x", "y"], {"a"}) == 0.0
    # a repeated positive is counted once: a at r=0 -> 1, nrel=2 -> 1/2
    assert average_precision(["a", "a", "x"], {"a", "b"}) == pytest.approx(0.5)


def _revisitop_ap(ranking: list[str], ok: set[str], junk: set[str]) -> float:
    """Straight port of compute_map's per-query part + compute_ap from revisitop."""
    ids = np.array(ranking)
    pos = np.arange(len(ids))[np.isin(ids, list(ok))]
    junk_pos = np.arange(len(ids))[np.isin(ids, list(junk))]
    k = ij = 0
    for ip in range(len(pos)):
        while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
            k += 1
            ij += 1
        pos[ip] -= k
    ap = 0.0
    for j, rank in enumerate(pos):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / len(ok) / 2.0
    return ap


def test_ap_matches_revisitop_reference_on_random_rankings() -> None:
    rng = random.Random(7)
    ids = [f"img{i:03d}" for i in range(60)]
    for _ in range(200):
        shuffled = rng.sample(ids, len(ids))
        positives = set(shuffled[: rng.randint(1, 10)])
        junk = set(shuffled[15 : 15 + rng.randint(0, 8)])
        ranking = rng.sample(ids, rng.randint(10, 60))  # may miss some positives
        expected = _revisitop_ap(ranking, positives, junk)
        assert average_precision(ranking, positives, junk) == pytest.approx(expected)


# --------------------------------------------------------------------------- P@k, PR


def test_precision_at_k_removes_junk_and_query() -> None:
    # q a j x b y, query q, junk j -> a x b y
    ranking = ["q", "a", "j", "x", "b", "y"]
    kwargs = {"junk": {"j"}, "query_id": "q"}
    assert precision_at_k(ranking, {"a", "b"}, 1, **kwargs) == 1.0
    assert precision_at_k(ranking, {"a", "b"}, 2, **kwargs) == 0.5
    assert precision_at_k(ranking, {"a", "b"}, 3, **kwargs) == pytest.approx(2 / 3)
    # Only 4 results after clean-up: the 5th place is a miss -> 2/5
    assert precision_at_k(ranking, {"a", "b"}, 5, **kwargs) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        precision_at_k(ranking, {"a"}, 0)


def test_pr_curve_interpolated() -> None:
    # a x b: a gives (recall 1/2, precision 1), b gives (recall 1, precision 2/3)
    curve = pr_curve(["a", "x", "b"], {"a", "b"})
    assert curve.shape == RECALL_LEVELS.shape == (101,)
    assert curve[0] == curve[50] == 1.0
    assert curve[51] == curve[100] == pytest.approx(2 / 3)
    # b never retrieved: nothing reaches recall > 1/2
    curve = pr_curve(["a", "x"], {"a", "b"})
    assert curve[50] == 1.0 and curve[51] == curve[100] == 0.0
    assert np.isnan(pr_curve(["a"], set())).all()


# --------------------------------------------------------------------------- N-S


def test_ukbench_ns_score_two_groups() -> None:
    a = ["a1", "a2", "a3", "a4"]
    b = ["b1", "b2", "b3", "b4"]
    rankings = {
        "a1": ["a1", "a2", "a3", "a4", "b1"],  # 4 (query counted)
        "a2": ["a2", "b1", "a1", "a3", "a4"],  # 3: a4 is 5th
        "a3": ["b1", "b2", "b3", "b4", "a3"],  # 0
        "a4": ["a4", "a1", "b1", "a2"],  # 3
        **{q: [q, *(x for x in b if x != q)] for q in b},  # 4 each
    }
    # (4 + 3 + 0 + 3 + 4 * 4) / 8 = 26 / 8
    assert ukbench_ns_score(rankings, [set(a), set(b)]) == pytest.approx(3.25)
    del rankings["b3"]
    with pytest.raises(KeyError, match="b3"):
        ukbench_ns_score(rankings, [set(a), set(b)])


# --------------------------------------------------------------------------- evaluate


def _two_landmark_benchmark() -> Benchmark:
    def q(qid: str, landmark: str, *positives: str) -> Query:
        return Query(qid, landmark, frozenset(positives), frozenset())

    return Benchmark(
        name="toy",
        images=["a1", "a2", "a3", "b1", "b2", "c1", "x"],
        queries=[
            q("a1", "A", "a2", "a3"),
            q("a2", "A", "a1", "a3"),
            q("a3", "A", "a1", "a2"),
            q("b1", "B", "b2"),
            q("c1", "C"),  # no positives: skipped everywhere
        ],
    )


def test_evaluate_rankings_landmark_map() -> None:
    rankings = {
        "a1": ["a1", "a2", "a3", "x"],  # AP 1
        "a2": ["a2", "a1", "a3"],  # AP 1
        "a3": ["a3", "x", "a1", "a2"],  # -> x a1 a2: (1/4 + 7/12) / 2 = 5/12
        "b1": ["b1", "x", "b2"],  # -> x b2: (0 + 1/2) / 2 / 1 = 1/4
        "c1": ["x"],
        "extra": ["x"],  # not a query: ignored
    }
    metrics = evaluate_rankings(rankings, _two_landmark_benchmark())
    # A: (1 + 1 + 5/12) / 3 = 29/36;  B: 1/4;  landmark mAP = (29/36 + 9/36) / 2 = 19/36
    assert metrics.per_landmark_ap == pytest.approx({"A": 29 / 36, "B": 1 / 4})
    assert metrics.landmark_mean_ap == pytest.approx(19 / 36)
    # mAP over queries: (1 + 1 + 5/12 + 1/4) / 4 = 2/3
    assert metrics.mean_ap == pytest.approx(2 / 3)
    # P@1: a1 a2 hit, a3 (x) and b1 (x) miss -> 1/2
    assert metrics.mean_precision_at[1] == pytest.approx(0.5)
    assert metrics.skipped_queries == ["c1"]
    assert metrics.ns_score is None

    d = metrics.as_dict()
    assert list(d) == [
        "mAP",
        "landmark_mAP",
        "mP@1",
        "mP@5",
        "mP@10",
        "ns_score",
        "per_landmark",
        "per_query",
        "pr_curve",
    ]
    assert d["mAP"] == pytest.approx(200 / 3)
    assert d["landmark_mAP"] == pytest.approx(1900 / 36)
    assert d["per_query"]["c1"] is None
    assert len(d["pr_curve"]) == 101
    json.dumps(d, allow_nan=False)  # strictly JSON-serialisable


def test_evaluate_rankings_missing_query_is_an_error() -> None:
    with pytest.raises(KeyError, match="a2"):
        evaluate_rankings({"a1": [], "a3": [], "b1": [], "c1": []}, _two_landmark_benchmark())


# --------------------------------------------------------------------------- ground truth


def _write_gt(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gt.json").write_text(json.dumps(data))
    return folder


def test_load_benchmark_validates_ids(tmp_path: Path) -> None:
    good = {
        "images": ["a", "b", "c"],
        "queries": [{"id": "a", "landmark": "L", "positives": ["b"], "junk": ["c"]}],
    }
    bench = load_benchmark(_write_gt(tmp_path / "mini", good))
    assert bench.name == "mini" and bench.root == tmp_path / "mini"
    assert bench.queries == [Query("a", "L", frozenset({"b"}), frozenset({"c"}))]

    bad_positive = json.loads(json.dumps(good))
    bad_positive["queries"][0]["positives"] = ["b", "zzz"]
    with pytest.raises(ValueError, match="zzz"):
        load_benchmark(_write_gt(tmp_path / "bad1", bad_positive))

    bad_query = json.loads(json.dumps(good))
    bad_query["queries"][0]["id"] = "nope"
    with pytest.raises(ValueError, match="nope"):
        load_benchmark(_write_gt(tmp_path / "bad2", bad_query))

    bad_junk = json.loads(json.dumps(good))
    bad_junk["queries"][0]["junk"] = ["ghost"]
    with pytest.raises(ValueError, match="ghost"):
        load_benchmark(_write_gt(tmp_path / "bad3", bad_junk))

    with pytest.raises(ValueError, match="images"):
        load_benchmark(_write_gt(tmp_path / "bad4", {"queries": []}))


def test_same_image_may_be_a_query_of_two_landmarks(tmp_path: Path) -> None:
    q1 = {"id": "a", "landmark": "L", "positives": ["b"], "junk": []}
    q2 = {"id": "a", "landmark": "M", "positives": ["c"], "junk": []}
    bench = load_benchmark(
        _write_gt(tmp_path / "two", {"images": ["a", "b", "c"], "queries": [q1, q2]})
    )
    assert list(bench.query_keys()) == ["a@L", "a@M"]
    metrics = evaluate_rankings({"a": ["a", "b", "c"]}, bench)
    # a@L: b at r=0 -> 1;  a@M: c at r=1 -> (0 + 1/2)/2 = 1/4
    assert metrics.per_query_ap == pytest.approx({"a@L": 1.0, "a@M": 0.25})
    with pytest.raises(ValueError, match="duplicate query"):
        load_benchmark(
            _write_gt(tmp_path / "dup", {"images": ["a", "b", "c"], "queries": [q1, q1]})
        )


def test_image_path_finds_other_extensions(tmp_path: Path) -> None:
    data = {"images": ["a", "b"], "queries": []}
    bench = load_benchmark(_write_gt(tmp_path / "b", data))
    (tmp_path / "b" / "images").mkdir()
    (tmp_path / "b" / "images" / "b.png").write_bytes(b"")
    assert bench.image_path("a") == tmp_path / "b" / "images" / "a.jpg"
    assert bench.image_path("b") == tmp_path / "b" / "images" / "b.png"
    with pytest.raises(KeyError):
        bench.image_path("c")


# --------------------------------------------------------------------------- real benchmarks


def _load_shared(name: str) -> Benchmark:
    if not (BENCHMARKS / name / "gt.json").is_file():
        pytest.skip(f"shared benchmark {name} not available at {BENCHMARKS}")
    return load_benchmark(BENCHMARKS / name)


def _perfect_rankings(bench: Benchmark, junk_first: bool = False) -> dict[str, list[str]]:
    rankings = {}
    for q in bench.queries:
        head = [q.id, *sorted(q.positives)]
        if junk_first:
            head = [*sorted(q.junk), *head]
        rankings[q.id] = head + [i for i in bench.images if i not in set(head)]
    return rankings


def test_ukbench_perfect_rankings() -> None:
    bench = _load_shared("ukbench-56")
    groups = bench.ukbench_groups()
    assert groups is not None and len(groups) == 14
    d = evaluate_rankings(_perfect_rankings(bench), bench).as_dict()
    assert d["mAP"] == pytest.approx(100.0)
    assert d["landmark_mAP"] == pytest.approx(100.0)
    assert d["mP@1"] == pytest.approx(100.0)
    assert d["ns_score"] == pytest.approx(4.0)


def test_oxford_dev_loads_and_junk_is_ignored() -> None:
    bench = _load_shared("oxford-dev")
    assert bench.ukbench_groups() is None
    assert len(bench.images) == 502 and len(bench.queries) == 54
    # all_souls_000183 shows two landmarks: it is a query of both, scored under two keys
    keys = bench.query_keys()
    assert len(keys) == 54
    assert {"all_souls_000183@all_souls", "all_souls_000183@radcliffe_camera"} <= set(keys)

    metrics = evaluate_rankings(_perfect_rankings(bench, junk_first=True), bench)
    # One ranking per image cannot be perfect for both landmarks of all_souls_000183; every
    # other query, with its junk ranked first, must still score exactly 1.
    imperfect = {k for k, ap in metrics.per_query_ap.items() if ap != pytest.approx(1.0)}
    assert imperfect <= {"all_souls_000183@all_souls", "all_souls_000183@radcliffe_camera"}
    assert metrics.ns_score is None
