"""The HTML pages as a browser sees them: report.html and the comparison page rendered by
headless Chromium (plots and thumbnails present and decoded, no console errors, no failed
loads), plus the comparison's content and the thumbnail size budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from headless_chromium import render_page
from PIL import Image

from pipelines.cli import main
from retrieval.evaluation.compare import ReportError, compare_reports
from retrieval.evaluation.ground_truth import load_benchmark
from retrieval.evaluation.metrics import evaluate_rankings
from retrieval.evaluation.report import write_report
from retrieval.evaluation.thumbnails import Thumbnails

LANDMARKS = ("bridge", "tower", "<script>alert(1)</script>")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """3 landmarks x 5 images (one with a hostile name, to check escaping), 1 unreadable."""
    root = tmp_path_factory.mktemp("bench")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, queries = [], []
    for j, lm in enumerate(LANDMARKS):
        ids = [f"lm{j}_{i}" for i in range(5)]
        images += ids
        for i, image_id in enumerate(ids):
            pixels = rng.integers(0, 255, (60 + 10 * j, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{image_id}.jpg")
            if i < 3:
                queries.append(
                    {
                        "id": image_id,
                        "landmark": lm,
                        "positives": [x for x in ids if x != image_id],
                        "junk": [],
                    }
                )
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    images.append("broken")
    gt = {"images": images, "queries": queries}
    (root / "gt.json").write_text(json.dumps(gt))
    return root


def _run(bench: Path, out: Path, seed: int, name: str, **kwargs) -> Path:
    benchmark = load_benchmark(bench)
    rng = np.random.default_rng(seed)
    rankings = {}
    for q in benchmark.queries:
        others = [i for i in benchmark.images if i != q.id]
        rankings[q.id] = [q.id, *rng.permutation(others).tolist()]
    metrics = evaluate_rankings(rankings, benchmark)
    report = {
        "benchmark": benchmark.name,
        "benchmark_dir": str(bench),
        "images": len(benchmark.images),
        "queries": len(benchmark.queries),
        "accounting": {"inputs": 16, "indexed": 15, "failed": 1},
        "results": [{"name": name, "index": "IDMap2,Flat", **metrics.as_dict()}],
        "failures": [
            {
                "id": "broken",
                "stage": "decode",
                "error_kind": "corrupt",
                "message": "cannot identify <image>",
                "uri": "x",
            }
        ],
    }
    write_report(report, out, benchmark=benchmark, rankings={name: rankings}, **kwargs)
    return out


@pytest.fixture(scope="module")
def compared(bench, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    a = _run(bench, root / "a", 1, "gem+exact")
    b = _run(bench, root / "b", 2, "gem+exact+qe")
    out = root / "cmp"
    assert main(["compare", str(a), str(b / "report.json"), "--out", str(out)]) == 0
    return out


def test_comparison_content(compared):
    md = (compared / "compare.md").read_text()
    assert "| mAP |" in md and "Δ B−A" in md
    page = (compared / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # scatter + landmark deltas
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert 'class="pos"' in page  # thumbnails strips of changed queries
    a = json.loads((compared.parent / "a" / "report.json").read_text())["results"][0]
    b = json.loads((compared.parent / "b" / "report.json").read_text())["results"][0]
    assert f"{b['mAP'] - a['mAP']:+.2f}" in md


def test_compare_refuses_other_benchmarks(compared, tmp_path):
    other = json.loads((compared.parent / "a" / "report.json").read_text())
    other["benchmark"] = "elsewhere"
    (tmp_path / "report.json").write_text(json.dumps(other))
    with pytest.raises(ReportError, match="different benchmarks"):
        compare_reports([str(compared.parent / "a"), str(tmp_path)], tmp_path / "o")
    assert main(["compare", str(tmp_path / "none"), str(tmp_path), "--out", str(tmp_path)]) == 2


def test_thumbnails_past_the_budget_are_linked_files(bench, tmp_path):
    written = {}
    thumbs = Thumbnails(
        load_benchmark(bench),
        budget_bytes=12000,
        write_file=lambda name, data: written.setdefault(name, data),
    )
    uris = [thumbs.get(f"lm0_{i}") for i in range(5)]
    assert uris[0].startswith("data:image/jpeg;base64,")
    linked = [u for u in uris if not u.startswith("data:")]
    assert linked and all(u.startswith("thumbnails/") and u in written for u in linked)
    assert thumbs.embedded_bytes <= 12000
    assert thumbs.get("broken") is None


@pytest.mark.parametrize("page", ["a/report.html", "cmp/compare.html"])
def test_pages_render_in_headless_chromium(compared, page, tmp_path):
    path = compared.parent / page
    check = render_page(path, tmp_path / "shot.png")
    assert check.console_errors == [] and check.failed_requests == []
    broken = [i for i in check.images if not i["complete"] or i["width"] == 0]
    assert broken == [], broken
    plots = [i for i in check.images if i["src"].startswith("data:image/png")]
    thumbs = [i for i in check.images if i["src"].startswith("data:image/jpeg")]
    assert len(plots) >= 2 and len(thumbs) >= 8
    shot = Image.open(check.screenshot)
    assert shot.width == 1280 and shot.height > 900
    # the screenshot is not blank: plots and thumbnails put many colours on it
    assert len(shot.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200


def test_linked_thumbnails_load_in_chromium(bench, tmp_path):
    """Past the embedding budget the page links thumbnails/ files; they must load too."""
    out = _run(bench, tmp_path / "r", 3, "gem", thumbnail_budget_bytes=6000)
    assert list((out / "thumbnails").glob("*.jpg"))
    check = render_page(out / "report.html", tmp_path / "shot.png")
    linked = [i for i in check.images if "/thumbnails/" in i["src"]]
    assert linked and all(i["complete"] and i["width"] > 0 for i in linked)
    assert check.console_errors == [] and check.failed_requests == []
