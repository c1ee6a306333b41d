"""``retrieval compare``: two or more evaluation reports of one benchmark, side by side.

Writes ``compare.html`` (templates/compare.html.j2) and ``compare.md``: the metrics with
their deltas against the first report (the baseline), a per-query AP scatter, per-landmark
deltas, and the top-10 results of the queries whose AP changed most, from each report's
``rankings.parquet``. Everything comes from the reports' files; nothing is recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.evaluation import plots, protocols
from retrieval.evaluation.ground_truth import Benchmark, load_benchmark
from retrieval.evaluation.report import (
    RANKINGS_FILENAME,
    TOP_RESULTS_SHOWN,
    format_score,
    markdown_table,
    precision_ks,
    read_top_rankings,
    result_cells,
)
from retrieval.evaluation.templating import render
from retrieval.evaluation.thumbnails import Thumbnails


class ReportError(ValueError):
    """A report that cannot be compared (missing, unreadable, another benchmark)."""


@dataclass
class Run:
    label: str
    path: Path
    report: dict[str, Any]
    row: dict[str, Any]
    rankings: dict[str, list[str]] | None

    @property
    def name(self) -> str:
        return f"{self.label}: {self.row.get('name', '?')}"


def load_run(spec: str, label: str) -> Run:
    """``spec`` is a report.json, or its folder, optionally ``#ROW`` naming a result row."""
    location, _, row_name = spec.partition("#")
    path = Path(location)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"no report at {path}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON: {exc}") from exc
    results = report.get("results") or []
    if not results:
        raise ReportError(f"{path}: the report has no results")
    if row_name:
        matches = [r for r in results if r.get("name") == row_name]
        if not matches:
            names = ", ".join(repr(r.get("name")) for r in results)
            raise ReportError(f"{path}: no result row {row_name!r} (rows: {names})")
        row = matches[0]
    else:
        row = results[0]
    rankings = None
    stored = path.parent / RANKINGS_FILENAME
    if stored.exists():
        rankings = read_top_rankings(stored).get(str(row.get("name")))
    return Run(label=label, path=path, report=report, row=row, rankings=rankings)


def _metric_keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    keys = [("mAP", "mAP"), ("landmark mAP", "landmark_mAP")]
    keys += [(f"mP@{k}", f"mP@{k}") for k in precision_ks(rows)]
    if any(r.get("ns_score") is not None for r in rows):
        keys.append(("N-S", "ns_score"))
    return keys


def _delta(value: Any, baseline: Any) -> float | None:
    if not isinstance(value, int | float) or not isinstance(baseline, int | float):
        return None
    if math.isnan(value) or math.isnan(baseline):
        return None
    return float(value) - float(baseline)


def _signed(delta: float | None) -> str:
    return "–" if delta is None else f"{delta:+.2f}"


def _delta_cell(delta: float | None) -> dict[str, str]:
    cls = "" if delta is None or abs(delta) < 0.005 else ("better" if delta > 0 else "worse")
    return {"text": _signed(delta), "cls": cls}


def _benchmark(runs: list[Run], benchmark_dir: str | None, notes: list[str]) -> Benchmark | None:
    folder = benchmark_dir or runs[0].report.get("benchmark_dir")
    if not folder:
        notes.append("No benchmark folder known: thumbnails are left out (use --benchmark).")
        return None
    try:
        benchmark = load_benchmark(folder)
        return protocols.apply(benchmark, runs[0].row.get("protocol") or protocols.DEFAULT)
    except (OSError, ValueError) as exc:
        notes.append(f"Benchmark {folder} not readable ({exc}): thumbnails are left out.")
        return None


def compare_reports(
    specs: list[str],
    out_dir: str | Path,
    *,
    benchmark_dir: str | None = None,
    changed: int = 5,
) -> dict[str, Path]:
    """Compare the reports ``specs`` (see ``load_run``); the first is the baseline. Writes
    compare.html and compare.md into ``out_dir`` and returns their paths."""
    if len(specs) < 2:
        raise ReportError("compare needs at least two reports")
    runs = [load_run(spec, chr(ord("A") + i)) for i, spec in enumerate(specs)]
    names = {str(r.report.get("benchmark")) for r in runs}
    if len(names) > 1:
        raise ReportError(f"the reports are of different benchmarks: {sorted(names)}")
    notes: list[str] = []
    base, others = runs[0], runs[1:]
    rows = [r.row for r in runs]

    metric_headers = ["metric", base.name]
    for run in others:
        metric_headers += [run.name, f"Δ {run.label}−{base.label}"]
    metric_rows = []
    for header, key in _metric_keys(rows):
        line: list[Any] = [header, format_score(base.row.get(key))]
        for run in others:
            line += [
                format_score(run.row.get(key)),
                _delta_cell(_delta(run.row.get(key), base.row.get(key))),
            ]
        metric_rows.append(line)

    base_q = base.row.get("per_query") or {}
    scatter = plots.per_query_scatter_plot(
        base_q, {run.name: run.row.get("per_query") or {} for run in others}, base.name
    )

    base_lm = base.row.get("per_landmark") or {}
    landmarks = sorted({lm for r in rows for lm in (r.get("per_landmark") or {})})
    landmark_headers = ["landmark", base.name]
    deltas: dict[str, dict[str, float | None]] = {}
    for run in others:
        landmark_headers += [run.name, f"Δ {run.label}−{base.label}"]
        run_lm = run.row.get("per_landmark") or {}
        deltas[run.name] = {lm: _delta(run_lm.get(lm), base_lm.get(lm)) for lm in landmarks}
    landmark_rows = []
    for lm in landmarks:
        line = [lm, format_score(base_lm.get(lm))]
        for run in others:
            line += [
                format_score((run.row.get("per_landmark") or {}).get(lm)),
                _delta_cell(deltas[run.name][lm]),
            ]
        landmark_rows.append(line)

    benchmark = _benchmark(runs, benchmark_dir, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnails(benchmark, write_file=_writer(out)) if benchmark is not None else None
    queries = benchmark.query_keys() if benchmark is not None else {}
    moves = []
    for run in others:
        run_q = run.row.get("per_query") or {}
        for key, ap in base_q.items():
            delta = _delta(run_q.get(key), ap)
            if delta is not None and abs(delta) > 1e-9:
                moves.append((abs(delta), delta, key, run))
    moves.sort(key=lambda m: (-m[0], m[2], m[3].label))
    changed_views = []
    for _, delta, key, run in moves[: max(0, changed)]:
        query = queries.get(key)
        strips = []
        if query is not None and thumbs is not None:
            for shown in (base, run):
                if shown.rankings is not None and query.id in shown.rankings:
                    cells = result_cells(query, shown.rankings[query.id], thumbs)
                    strips.append({"label": shown.label, "cells": cells})
        changed_views.append(
            {
                "query": key,
                "landmark": query.landmark if query is not None else "?",
                "baseline_ap": format_score(base_q.get(key)),
                "other_ap": format_score((run.row.get("per_query") or {}).get(key)),
                "delta": _signed(delta),
                "other_name": run.name,
                "strips": strips,
            }
        )
    if any(r.rankings is None for r in runs):
        notes.append(
            "Some reports have no rankings.parquet (written by `retrieval evaluate` since "
            "comparisons exist): their top results are not shown."
        )

    benchmark_name = names.pop()
    runs_rows = [[r.label, str(r.path), str(r.row.get("name"))] for r in runs]
    page = render(
        "compare.html.j2",
        benchmark=benchmark_name,
        runs=runs,
        runs_rows=runs_rows,
        metric_headers=metric_headers,
        metric_rows=metric_rows,
        metric_numeric=[False] + [True] * (len(metric_headers) - 1),
        scatter=scatter,
        landmark_plot=plots.landmark_delta_plot(deltas),
        landmark_headers=landmark_headers,
        landmark_rows=landmark_rows,
        landmark_numeric=[False] + [True] * (len(landmark_headers) - 1),
        changed=changed_views,
        top=TOP_RESULTS_SHOWN,
        notes=notes,
    )
    paths = {"html": out / "compare.html", "markdown": out / "compare.md"}
    paths["html"].write_text(page, encoding="utf-8")

    def plain(row: list[Any]) -> list[str]:
        return [c["text"] if isinstance(c, dict) else str(c) for c in row]

    md = [f"# Comparison: {benchmark_name}", ""]
    md += markdown_table(["run", "report", "result row"], runs_rows)
    md += ["", "## Metrics", "", *markdown_table(metric_headers, [plain(r) for r in metric_rows])]
    if landmark_rows:
        md += ["", "## Per landmark", ""]
        md += markdown_table(landmark_headers, [plain(r) for r in landmark_rows])
    md += ["", "## Queries that changed most", ""]
    md += markdown_table(
        ["query", "landmark", "baseline AP", "run", "AP", "Δ"],
        [
            [
                c["query"],
                c["landmark"],
                c["baseline_ap"],
                c["other_name"],
                c["other_ap"],
                c["delta"],
            ]
            for c in changed_views
        ],
    )
    if notes:
        md += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    paths["markdown"].write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return paths


def _writer(out: Path):
    def write(name: str, data: bytes) -> None:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write
