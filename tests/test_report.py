"""Report rendering: the three files, JSON round trip, Markdown table, embedded HTML images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retrieval.evaluation.ground_truth import Benchmark, load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.evaluation.report import render_html, render_markdown, write_report

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "gray", "white"]


@pytest.fixture
def tiny_benchmark(tmp_path: Path) -> Benchmark:
    """Two landmarks of 3 images, plus 2 distractors; small solid-colour images."""
    folder = tmp_path / "tiny"
    (folder / "images").mkdir(parents=True)
    images = ["a1", "a2", "a3", "b1", "b2", "b3", "d1", "d2"]
    for image_id, colour in zip(images, COLOURS, strict=True):
        Image.new("RGB", (40, 30), colour).save(folder / "images" / f"{image_id}.jpg")
    queries = []
    for group in (["a1", "a2", "a3"], ["b1", "b2", "b3"]):
        for q in group:
            queries.append(
                {
                    "id": q,
                    "landmark": q[0],
                    "positives": [p for p in group if p != q],
                    "junk": ["d2"] if q == "a1" else [],
                }
            )
    (folder / "gt.json").write_text(json.dumps({"images": images, "queries": queries}))
    return load_benchmark(folder)


def _rankings(bench: Benchmark) -> dict[str, list[str]]:
    """Deterministic, imperfect rankings: everything in reverse image order, query first."""
    return {q.id: [q.id, *(i for i in reversed(bench.images) if i != q.id)] for q in bench.queries}


def _report(bench: Benchmark, rankings: dict[str, list[str]]) -> dict[str, Any]:
    result = {"name": "gem+flat", "index": "Flat", **evaluate_rankings(rankings, bench).as_dict()}
    return {
        "benchmark": bench.name,
        "images": len(bench.images),
        "queries": len(bench.queries),
        "accounting": {"inputs": 9, "indexed": 8, "failed": 1},
        "results": [result],
        "model": {"id": "gem-r50", "weights_sha256": "abc123", "preprocessing": {"size": 512}},
        "timings": {"extract_s": 1.234, "search_s": 0.5},
        "failures": [
            {
                "id": "broken",
                "uri": "file:///x/broken.jpg",
                "stage": "decode",
                "error_kind": "UnidentifiedImageError",
                "message": "cannot identify <image>",
            }
        ],
        "created": "2025-01-01T00:00:00Z",
        "config": {"k": 100},
        "notes": "an unknown key",
    }


def test_write_report_files(tiny_benchmark: Benchmark, tmp_path: Path) -> None:
    rankings = _rankings(tiny_benchmark)
    report = _report(tiny_benchmark, rankings)
    uris = write_report(
        report, tmp_path / "out", benchmark=tiny_benchmark, rankings={"gem+flat": rankings}
    )
    paths = {key: Path(uri) for key, uri in uris.items()}
    assert set(paths) == {"json", "markdown", "html", "rankings"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())

    assert json.loads(paths["json"].read_text()) == report

    markdown = paths["markdown"].read_text()
    r = report["results"][0]
    row = (
        f"| gem+flat | Flat | {r['mAP']:.2f} | {r['landmark_mAP']:.2f} | {r['mP@1']:.2f} "
        f"| {r['mP@5']:.2f} | {r['mP@10']:.2f} | – |"
    )
    assert row in markdown
    assert "9 inputs = 8 indexed + 1 failed" in markdown
    assert "| a |" in markdown  # per-landmark table
    assert "UnidentifiedImageError" in markdown

    page = paths["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 3  # per-query, PR, per-landmark
    # 4 example rows: a query thumbnail + its 7 results each
    assert page.count('<img src="data:image/jpeg;base64,') == 4 * 8
    assert 'class="junk"' in page and 'class="pos"' in page and 'class="neg"' in page
    assert "cannot identify &lt;image&gt;" in page
    assert "an unknown key" in page


def test_render_without_thumbnails_and_missing_values() -> None:
    report = {
        "benchmark": "<b>x</b>",
        "images": 3,
        "queries": 0,
        "accounting": {"inputs": 5, "indexed": 3, "failed": 1},
        "results": [{"name": "r", "index": None, "mAP": None, "ns_score": 3.5}],
        "failures": [{"id": f"f{i}", "stage": "decode"} for i in range(25)],
    }
    page = render_html(report)
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "data:image/jpeg" not in page
    assert "does NOT add up" in page
    markdown = render_markdown(report)
    assert "| r | – | – | – | – | – | – | 3.50 |" in markdown
    assert "f19" in markdown and "f20" not in markdown and "5 more" in markdown
