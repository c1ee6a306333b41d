"""Evaluation reports: the same report dict written as JSON (for machines and diffs),
Markdown (for a terminal, a PR or a commit message) and self-contained HTML (to look at the
failures: plots and result thumbnails embedded, so the file can be mailed or archived).

The report dict is built by the caller; its shape is::

    {"benchmark": str, "images": int, "queries": int,
     "accounting": {"inputs": int, "indexed": int, "failed": int},
     "results": [{"name", "index", "mAP", "landmark_mAP", "mP@1", "mP@5", "mP@10",
                  "ns_score", "per_landmark", "per_query", "pr_curve"}, ...],
     "model": {...}, "timings": {...}, "failures": [{"id", "uri", "stage", "error_kind",
     "message"}, ...], "created": str, "config": {...}}

Scores are percentages (N-S excepted, 0..4); missing values are None and print as "–".
Unknown top-level keys are shown as JSON under "Other", so nothing silently disappears.
``render_markdown`` and ``render_html`` are pure; ``write_report`` writes the three files.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from retrieval import storage
from retrieval.evaluation import plots
from retrieval.evaluation.ground_truth import Benchmark, Query
from retrieval.evaluation.metrics import clean_ranking
from retrieval.evaluation.templating import render
from retrieval.evaluation.thumbnails import EMBED_BUDGET_BYTES, Thumbnails
from retrieval.redaction import redact

MISSING = "–"
DEFAULT_KS = (1, 5, 10)
MAX_FAILURES_SHOWN = 20
TOP_RESULTS_SHOWN = 10
TOP_KEPT = 20  # ranked ids per query kept in rankings.parquet (the query itself may be first)
RANKINGS_FILENAME = "rankings.parquet"
RANKINGS_SCHEMA = pa.schema(
    [("result", pa.string()), ("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string())]
)
KNOWN_KEYS = frozenset(
    {
        "benchmark",
        "images",
        "queries",
        "accounting",
        "results",
        "model",
        "timings",
        "failures",
        "created",
        "config",
    }
)


# --------------------------------------------------------------------------- formatting


def format_score(value: Any, decimals: int = 2) -> str:
    """A score with fixed decimals; "–" for None/NaN so a missing score never reads as 0."""
    if value is None or isinstance(value, bool):
        return MISSING if value is None else str(value)
    if isinstance(value, int | float):
        return MISSING if math.isnan(value) else f"{value:.{decimals}f}"
    return str(value)


def _plain(value: Any) -> str:
    """Generic rendering of a config/model value: scalars as is, containers as JSON."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(_jsonable(value), ensure_ascii=False, sort_keys=True)
    if isinstance(value, float):
        return format_score(value, 3)
    return MISSING if value is None else str(value)


def precision_ks(results: Sequence[Mapping[str, Any]]) -> list[int]:
    """The k of the mP@k columns: 1, 5, 10 plus any other k a result reports."""
    ks = set(DEFAULT_KS)
    for result in results:
        for key in result:
            match = re.fullmatch(r"mP@(\d+)", key)
            if match:
                ks.add(int(match.group(1)))
    return sorted(ks)


def _results_columns(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(header, key) of the results table."""
    return [
        ("name", "name"),
        ("index", "index"),
        ("mAP", "mAP"),
        ("landmark mAP", "landmark_mAP"),
        *((f"mP@{k}", f"mP@{k}") for k in precision_ks(results)),
        ("N-S", "ns_score"),
    ]


def _cell(result: Mapping[str, Any], key: str) -> str:
    value = result.get(key)
    if key in ("name", "index"):
        return MISSING if value is None else str(value)
    return format_score(value)


def _accounting_line(accounting: Mapping[str, Any]) -> str:
    """The line "N inputs = I indexed + F failed", flagged when it does not add up: every input must
    end up either indexed or in the failures list, otherwise images were lost silently."""
    inputs, indexed, failed = (accounting.get(k) for k in ("inputs", "indexed", "failed"))
    line = f"{_plain(inputs)} inputs = {_plain(indexed)} indexed + {_plain(failed)} failed"
    if all(isinstance(v, int) for v in (inputs, indexed, failed)) and inputs != indexed + failed:
        line += f" (does NOT add up: {inputs - indexed - failed:+d} unaccounted)"
    return line


def _timing(key: str, value: Any) -> tuple[str, str]:
    if key.endswith("_s") and isinstance(value, int | float):
        return key[:-2], f"{format_score(value)} s"
    return key, _plain(value)


def _other_keys(report: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in KNOWN_KEYS}


def _jsonable(value: Any) -> Any:
    """A strictly valid JSON value: NaN/inf become None (json.dumps would write the
    non-standard NaN), numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)  # Path, datetime, ...


# --------------------------------------------------------------------------- markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: header and accounting, results table, per-landmark table of
    the first result, model, timings, failures (first 20), config and unknown keys."""
    results: list[Mapping[str, Any]] = list(report.get("results") or [])
    name = str(report.get("benchmark", "?"))
    lines = [f"# Retrieval report: {name}", ""]
    lines.append(
        f"- Benchmark: **{name}**: {_plain(report.get('images'))} images, "
        f"{_plain(report.get('queries'))} queries"
    )
    if report.get("accounting"):
        lines.append(f"- Accounting: {_accounting_line(report['accounting'])}")
    if report.get("created"):
        lines.append(f"- Created: {report['created']}")

    lines += ["", "## Results", ""]
    if results:
        columns = _results_columns(results)
        rows = [[_cell(r, key) for _, key in columns] for r in results]
        lines += markdown_table([h for h, _ in columns], rows)
    else:
        lines.append("No results.")

    if results and results[0].get("per_landmark"):
        first = results[0]
        lines += ["", f"## Per landmark ({first.get('name', '?')})", ""]
        per_landmark = first["per_landmark"]
        lines += markdown_table(
            ["landmark", "mAP"], [[lm, format_score(v)] for lm, v in per_landmark.items()]
        )

    if report.get("model"):
        lines += ["", "## Model", ""]
        lines += [f"- {key}: `{_plain(value)}`" for key, value in report["model"].items()]

    if report.get("timings"):
        lines += ["", "## Timings", ""]
        lines += markdown_table(
            ["step", "time"], [_timing(k, v) for k, v in report["timings"].items()]
        )

    failures = list(report.get("failures") or [])
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        rows = [
            [_plain(f.get(k)) for k in ("id", "stage", "error_kind", "message", "uri")]
            for f in failures[:MAX_FAILURES_SHOWN]
        ]
        lines += markdown_table(["id", "stage", "error kind", "message", "uri"], rows)
        if len(failures) > MAX_FAILURES_SHOWN:
            lines.append(f"\n… and {len(failures) - MAX_FAILURES_SHOWN} more (see report.json)")

    for title, value in (("Config", report.get("config")), ("Other", _other_keys(report))):
        if value:
            body = json.dumps(_jsonable(value), indent=2, ensure_ascii=False)
            lines += ["", f"## {title}", "", "```json", body, "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html


def _spread_positions(n: int, count: int) -> list[int]:
    """Indices of ``count`` of ``n`` items sorted by AP, most informative first: worst, best,
    median, then quartiles, eighths, ...; returned ascending."""
    wanted = min(count, n)
    chosen: list[int] = []
    for fraction in _dyadic_fractions(n):
        if len(chosen) >= wanted:
            break
        index = round(fraction * (n - 1))
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def _dyadic_fractions(n: int) -> Iterator[float]:
    """0, 1, 1/2, 1/4, 3/4, 1/8, ...: fine enough at the end to reach every one of n items."""
    yield from (0.0, 1.0)
    denominator = 2
    while denominator < 2 * n:
        yield from (k / denominator for k in range(1, denominator, 2))
        denominator *= 2


def _position_label(index: int, n: int) -> str:
    if index == 0:
        return "worst"
    if index == n - 1:
        return "best"
    named = {0.5: "median", 0.25: "lower quartile", 0.75: "upper quartile"}
    for fraction, label in named.items():
        if index == round(fraction * (n - 1)):
            return label
    return f"#{index + 1} of {n} by AP"


def result_cells(
    query: Query, ranking: Sequence[str], thumbs: Thumbnails, top: int = TOP_RESULTS_SHOWN
) -> list[dict[str, Any]]:
    """The strip of one query: its thumbnail, then its top results coloured by ground truth
    (the query image itself omitted, as in the scores)."""
    cells = [{"kind": "query", "id": query.id, "uri": thumbs.get(query.id), "caption": "query"}]
    for rank, image_id in enumerate(clean_ranking(ranking, (), query.id)[:top], start=1):
        if image_id in query.positives:
            kind = "pos"
        elif image_id in query.junk:
            kind = "junk"
        else:
            kind = "neg"
        cells.append(
            {
                "kind": kind,
                "id": image_id,
                "uri": thumbs.get(image_id),
                "caption": f"{rank}. {image_id}",
            }
        )
    return cells


def _examples(
    result: Mapping[str, Any],
    ranking_of: Mapping[str, Sequence[str]],
    benchmark: Benchmark,
    count: int,
    thumbs: Thumbnails,
) -> list[dict[str, Any]]:
    """Query thumbnail and its top results for the worst, best, median, ... queries."""
    per_query = result.get("per_query") or {}
    queries = benchmark.query_keys()
    scored = sorted(
        (ap, key)
        for key, ap in per_query.items()
        if ap is not None
        and not math.isnan(ap)
        and key in queries
        and queries[key].id in ranking_of
    )
    if not scored or count <= 0:
        return []
    examples = []
    for index in _spread_positions(len(scored), count):
        ap, key = scored[index]
        query = queries[key]
        examples.append(
            {
                "label": _position_label(index, len(scored)),
                "query": query.id,
                "landmark": query.landmark,
                "ap": format_score(ap),
                "positives": len(query.positives),
                "cells": result_cells(query, ranking_of[query.id], thumbs),
            }
        )
    return examples


def _plots(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = results[0]
    pr = plots.pr_curves_plot({str(r.get("name")): r.get("pr_curve") or [] for r in results})
    landmarks = plots.per_landmark_plot(
        {str(r.get("name")): r["per_landmark"] for r in results if r.get("per_landmark")}
    )
    per_query = plots.per_query_ap_plot(
        first.get("per_query") or {}, f"AP per query, sorted ({first.get('name', '?')})"
    )
    pair = [
        {"uri": uri, "alt": alt}
        for uri, alt in ((pr, "mean precision-recall curves"), (landmarks, "mAP per landmark"))
        if uri is not None
    ]
    return {"per_query": per_query, "pair": pair}


def render_html(
    report: Mapping[str, Any],
    *,
    benchmark: Benchmark | None = None,
    rankings: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    thumbnails_for: int = 4,
    thumbnails: Thumbnails | None = None,
) -> str:
    """The report as one HTML page (templates/report.html.j2, autoescaped; inline CSS, plots
    as data URIs). Result rows are rendered from whatever ``results`` holds.

    Thumbnails of example queries need both ``benchmark`` (for the image files and the
    ground truth colouring) and ``rankings`` (result name -> query id -> ranked ids, for
    the first result); without them that section is left out. ``thumbnails`` decides how
    they are stored (embedded within a byte budget, then linked files; see Thumbnails).
    """
    results: list[Mapping[str, Any]] = list(report.get("results") or [])
    columns = _results_columns(results) if results else []
    context: dict[str, Any] = {
        "name": str(report.get("benchmark", "?")),
        "images": _plain(report.get("images")),
        "queries": _plain(report.get("queries")),
        "created": report.get("created"),
        "accounting": None,
        "accounting_bad": False,
        "results_headers": [h for h, _ in columns],
        "results_rows": [[_cell(r, key) for _, key in columns] for r in results],
        "results_numeric": [False, False] + [True] * len(columns),
        "plots": _plots(results) if results else {},
        "examples": [],
        "examples_of": None,
        "top": TOP_RESULTS_SHOWN,
        "per_landmark_rows": [],
        "per_landmark_of": None,
        "sections": [],
    }
    if report.get("accounting"):
        line = _accounting_line(report["accounting"])
        context.update(accounting=line, accounting_bad="NOT" in line)

    if results and benchmark is not None and rankings is not None:
        first_name = str(results[0].get("name"))
        if first_name in rankings:
            thumbs = thumbnails or Thumbnails(benchmark)
            context["examples"] = _examples(
                results[0], rankings[first_name], benchmark, thumbnails_for, thumbs
            )
            context["examples_of"] = first_name

    if results and results[0].get("per_landmark"):
        context["per_landmark_rows"] = [
            [lm, format_score(v)] for lm, v in results[0]["per_landmark"].items()
        ]
        context["per_landmark_of"] = results[0].get("name", "?")

    sections = context["sections"]

    def section(title, headers=(), rows=None, numeric=(), more=0, pre=None):
        sections.append(
            {
                "title": title,
                "headers": list(headers),
                "rows": rows,
                "numeric": list(numeric),
                "more": more,
                "pre": pre,
            }
        )

    if report.get("model"):
        section("Model", ["key", "value"], [[k, _plain(v)] for k, v in report["model"].items()])
    if report.get("timings"):
        rows = [list(_timing(k, v)) for k, v in report["timings"].items()]
        section("Timings", ["step", "time"], rows, [False, True])
    failures = list(report.get("failures") or [])
    if failures:
        keys = ("id", "stage", "error_kind", "message", "uri")
        rows = [[_plain(f.get(k)) for k in keys] for f in failures[:MAX_FAILURES_SHOWN]]
        more = max(0, len(failures) - MAX_FAILURES_SHOWN)
        section(
            f"Failures ({len(failures)})",
            ["id", "stage", "error kind", "message", "uri"],
            rows,
            more=more,
        )
    for title, value in (("Config", report.get("config")), ("Other", _other_keys(report))):
        if value:
            section(title, pre=json.dumps(_jsonable(value), indent=2, ensure_ascii=False))
    return render("report.html.j2", **context)


# --------------------------------------------------------------------------- files


def write_report(
    report: dict,
    out_dir: str | Path,
    *,
    benchmark: Benchmark,
    rankings: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    thumbnails_for: int = 4,
    thumbnail_budget_bytes: int = EMBED_BUDGET_BYTES,
) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir`` (any URI:
    local, gs://, s3://) and return their URIs under the keys "json", "markdown" and "html";
    with ``rankings``, also ``rankings.parquet`` (every result's top 10 per query, what
    ``retrieval compare`` shows), and thumbnails past the embedding budget in thumbnails/.

    The JSON is strict (NaN written as null) so any JSON parser can read it back. Credentials
    and signatures in URIs are masked in all three files.
    """
    out = str(out_dir)
    uris = {
        "json": storage.join(out, "report.json"),
        "markdown": storage.join(out, "report.md"),
        "html": storage.join(out, "report.html"),
    }
    text = json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False)
    if rankings:
        uris["rankings"] = storage.join(out, RANKINGS_FILENAME)
        write_top_rankings(uris["rankings"], rankings)
    thumbs = Thumbnails(
        benchmark,
        budget_bytes=thumbnail_budget_bytes,
        write_file=lambda name, data: storage.write_bytes(storage.join(out, name), data),
    )
    page = render_html(
        report,
        benchmark=benchmark,
        rankings=rankings,
        thumbnails_for=thumbnails_for,
        thumbnails=thumbs,
    )
    for key, content in (
        ("json", text + "\n"),
        ("markdown", render_markdown(report)),
        ("html", page),
    ):
        storage.write_bytes(uris[key], redact(content).encode("utf-8"))
    return uris


def write_top_rankings(
    uri: str | Path, rankings: Mapping[str, Mapping[str, Sequence[str]]], top: int = TOP_KEPT
) -> None:
    """Every result's first ``top`` ranked ids per query as a table (result, query_id, rank,
    id): small even for 10k queries, and enough for ``retrieval compare`` to show what
    changed without keeping full rankings."""
    columns: dict[str, list] = {"result": [], "query_id": [], "rank": [], "id": []}
    for result, by_query in rankings.items():
        for query_id, ranking in by_query.items():
            for rank, image_id in enumerate(list(ranking[:top]), start=1):
                columns["result"].append(result)
                columns["query_id"].append(query_id)
                columns["rank"].append(rank)
                columns["id"].append(image_id)
    storage.write_parquet(str(uri), pa.table(columns, schema=RANKINGS_SCHEMA))


def read_top_rankings(uri: str | Path) -> dict[str, dict[str, list[str]]]:
    """``rankings.parquet`` back as result -> query id -> ids in rank order."""
    table = storage.read_parquet(str(uri)).to_pydict()
    out: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for result, query_id, rank, image_id in zip(
        table["result"], table["query_id"], table["rank"], table["id"], strict=True
    ):
        out.setdefault(result, {}).setdefault(query_id, []).append((rank, image_id))
    return {
        r: {q: [i for _, i in sorted(items)] for q, items in by_query.items()}
        for r, by_query in out.items()
    }
