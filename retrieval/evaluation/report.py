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

import html
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from retrieval import storage
from retrieval.evaluation import plots
from retrieval.evaluation.ground_truth import Benchmark
from retrieval.evaluation.metrics import clean_ranking
from retrieval.evaluation.thumbnails import Thumbnails
from retrieval.redaction import redact

MISSING = "–"
DEFAULT_KS = (1, 5, 10)
MAX_FAILURES_SHOWN = 20
TOP_RESULTS_SHOWN = 10
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


def _fmt(value: Any, decimals: int = 2) -> str:
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
        return _fmt(value, 3)
    return MISSING if value is None else str(value)


def _precision_ks(results: Sequence[Mapping[str, Any]]) -> list[int]:
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
        *((f"mP@{k}", f"mP@{k}") for k in _precision_ks(results)),
        ("N-S", "ns_score"),
    ]


def _cell(result: Mapping[str, Any], key: str) -> str:
    value = result.get(key)
    if key in ("name", "index"):
        return MISSING if value is None else str(value)
    return _fmt(value)


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
        return key[:-2], f"{_fmt(value)} s"
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


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
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
        lines += _md_table([h for h, _ in columns], rows)
    else:
        lines.append("No results.")

    if results and results[0].get("per_landmark"):
        first = results[0]
        lines += ["", f"## Per landmark ({first.get('name', '?')})", ""]
        per_landmark = first["per_landmark"]
        lines += _md_table(["landmark", "mAP"], [[lm, _fmt(v)] for lm, v in per_landmark.items()])

    if report.get("model"):
        lines += ["", "## Model", ""]
        lines += [f"- {key}: `{_plain(value)}`" for key, value in report["model"].items()]

    if report.get("timings"):
        lines += ["", "## Timings", ""]
        lines += _md_table(["step", "time"], [_timing(k, v) for k, v in report["timings"].items()])

    failures = list(report.get("failures") or [])
    if failures:
        lines += ["", f"## Failures ({len(failures)})", ""]
        rows = [
            [_plain(f.get(k)) for k in ("id", "stage", "error_kind", "message", "uri")]
            for f in failures[:MAX_FAILURES_SHOWN]
        ]
        lines += _md_table(["id", "stage", "error kind", "message", "uri"], rows)
        if len(failures) > MAX_FAILURES_SHOWN:
            lines.append(f"\n… and {len(failures) - MAX_FAILURES_SHOWN} more (see report.json)")

    for title, value in (("Config", report.get("config")), ("Other", _other_keys(report))):
        if value:
            body = json.dumps(_jsonable(value), indent=2, ensure_ascii=False)
            lines += ["", f"## {title}", "", "```json", body, "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- html

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0; background: #f6f6f4; }
main { max-width: 1180px; margin: 0 auto; padding: 14px 14px 40px; background: #fff; }
h1 { font-size: 24px; margin: 4px 0 6px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
h3 { font-size: 14px; margin: 16px 0 4px; font-weight: 600; }
.meta { color: #555; margin: 2px 0; }
.warn { color: #b00020; font-weight: 600; }
table.data { border-collapse: collapse; margin: 6px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 9px; text-align: left; }
table.data th { background: #f0f0ee; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data tr:nth-child(even) td { background: #fafaf8; }
.plots img { max-width: 100%; display: block; margin: 8px 0; }
.plots .pair { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.strip-wrap { overflow-x: auto; }
table.strip { border-collapse: separate; border-spacing: 2px; }
table.strip td { vertical-align: top; text-align: center; padding: 0; width: 102px; }
table.strip .box { width: 102px; height: 102px; display: flex; align-items: center;
       justify-content: center; }
table.strip img, table.strip .noimg { border: 3px solid #999; display: block;
       max-width: 96px; max-height: 96px; }
table.strip .noimg { width: 90px; height: 64px; background: #eee; font-size: 11px;
       color: #777; overflow: hidden; word-break: break-all; }
table.strip .cap { font-size: 11px; color: #555; width: 102px; overflow: hidden;
       text-overflow: ellipsis; white-space: nowrap; }
table.strip .query img, table.strip .query .noimg { border-color: #1f5fbf; }
table.strip .pos img, table.strip .pos .noimg { border-color: #2e9d3a; }
table.strip .neg img, table.strip .neg .noimg { border-color: #d33; }
table.strip .junk img, table.strip .junk .noimg { border-color: #aaa; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
       vertical-align: -1px; }
pre { background: #f4f4f2; padding: 8px; overflow-x: auto; font-size: 12px; }
code { font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()
) -> str:
    """A table of already-formatted text cells (escaped here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
            cells.append(f"<td{cls}>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="data"><tr>{head}</tr>{"".join(body)}</table>'


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<div class="noimg">{_e(alt)}</div>'
    return f'<img src="{uri}" alt="{_e(alt)}" title="{_e(alt)}">'


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


def _example_rows(
    result: Mapping[str, Any],
    ranking_of: Mapping[str, Sequence[str]],
    benchmark: Benchmark,
    count: int,
) -> str:
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
        return ""
    thumbs = Thumbnails(benchmark)
    parts = [
        '<p class="legend"><span><i style="background:#1f5fbf"></i>query</span>'
        '<span><i style="background:#2e9d3a"></i>positive</span>'
        '<span><i style="background:#d33"></i>negative</span>'
        '<span><i style="background:#aaa"></i>junk (not scored)</span>'
        f"top {TOP_RESULTS_SHOWN} results, query itself omitted</p>"
    ]
    for index in _spread_positions(len(scored), count):
        ap, key = scored[index]
        query = queries[key]
        qid = query.id
        label = _position_label(index, len(scored))
        parts.append(
            f"<h3>{_e(label)}: {_e(qid)} ({_e(query.landmark)}), AP {_fmt(ap)}, "
            f"{len(query.positives)} positives</h3>"
        )
        thumb = _img(thumbs.get(qid), qid)
        cells = [
            f'<td class="query"><div class="box">{thumb}</div><div class="cap">query</div></td>'
        ]
        top = clean_ranking(ranking_of[qid], (), qid)[:TOP_RESULTS_SHOWN]
        for rank, image_id in enumerate(top, start=1):
            if image_id in query.positives:
                kind = "pos"
            elif image_id in query.junk:
                kind = "junk"
            else:
                kind = "neg"
            cells.append(
                f'<td class="{kind}"><div class="box">{_img(thumbs.get(image_id), image_id)}</div>'
                f'<div class="cap" title="{_e(image_id)}">{rank}. {_e(image_id)}</div></td>'
            )
        row = "".join(cells)
        parts.append(f'<div class="strip-wrap"><table class="strip"><tr>{row}</tr></table></div>')
    return "\n".join(parts)


def render_html(
    report: Mapping[str, Any],
    *,
    benchmark: Benchmark | None = None,
    rankings: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    thumbnails_for: int = 4,
) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 plots and thumbnails).

    Thumbnails of example queries need both ``benchmark`` (for the image files and the
    ground truth colouring) and ``rankings`` (result name -> query id -> ranked ids, for
    the first result); without them that section is left out.
    """
    results: list[Mapping[str, Any]] = list(report.get("results") or [])
    name = str(report.get("benchmark", "?"))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Retrieval report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Retrieval report: {_e(name)}</h1>",
        f'<p class="meta">{_e(_plain(report.get("images")))} images · '
        f"{_e(_plain(report.get('queries')))} queries"
        + (f" · created {_e(report['created'])}" if report.get("created") else "")
        + "</p>",
    ]
    if report.get("accounting"):
        line = _accounting_line(report["accounting"])
        cls = "meta warn" if "NOT" in line else "meta"
        out.append(f'<p class="{cls}">Accounting: {_e(line)}</p>')

    out.append("<h2>Results</h2>")
    if results:
        columns = _results_columns(results)
        rows = [[_cell(r, key) for _, key in columns] for r in results]
        out.append(_html_table([h for h, _ in columns], rows, [False, False] + [True] * 99))
    else:
        out.append("<p>No results.</p>")

    if results:
        out.append(_plots_section(results))

    if results and benchmark is not None and rankings is not None:
        first_name = str(results[0].get("name"))
        if first_name in rankings:
            examples = _example_rows(results[0], rankings[first_name], benchmark, thumbnails_for)
            if examples:
                out.append(f"<h2>Example queries ({_e(first_name)})</h2>")
                out.append(examples)

    if results and results[0].get("per_landmark"):
        per_landmark = results[0]["per_landmark"]
        out.append(f"<h2>Per landmark ({_e(results[0].get('name', '?'))})</h2>")
        rows = [[lm, _fmt(v)] for lm, v in per_landmark.items()]
        out.append(_html_table(["landmark", "mAP"], rows, [False, True]))

    if report.get("model"):
        out.append("<h2>Model</h2>")
        rows = [[k, _plain(v)] for k, v in report["model"].items()]
        out.append(_html_table(["key", "value"], rows))

    if report.get("timings"):
        out.append("<h2>Timings</h2>")
        rows = [list(_timing(k, v)) for k, v in report["timings"].items()]
        out.append(_html_table(["step", "time"], rows, [False, True]))

    failures = list(report.get("failures") or [])
    if failures:
        out.append(f"<h2>Failures ({len(failures)})</h2>")
        keys = ("id", "stage", "error_kind", "message", "uri")
        rows = [[_plain(f.get(k)) for k in keys] for f in failures[:MAX_FAILURES_SHOWN]]
        out.append(_html_table(["id", "stage", "error kind", "message", "uri"], rows))
        if len(failures) > MAX_FAILURES_SHOWN:
            more = len(failures) - MAX_FAILURES_SHOWN
            out.append(f"<p>… and {more} more (see report.json)</p>")

    for title, value in (("Config", report.get("config")), ("Other", _other_keys(report))):
        if value:
            body = json.dumps(_jsonable(value), indent=2, ensure_ascii=False)
            out.append(f"<h2>{title}</h2><pre>{_e(body)}</pre>")

    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _plots_section(results: Sequence[Mapping[str, Any]]) -> str:
    first = results[0]
    pr = plots.pr_curves_plot({str(r.get("name")): r.get("pr_curve") or [] for r in results})
    landmarks = plots.per_landmark_plot(
        {str(r.get("name")): r["per_landmark"] for r in results if r.get("per_landmark")}
    )
    per_query = plots.per_query_ap_plot(
        first.get("per_query") or {}, f"AP per query, sorted ({first.get('name', '?')})"
    )
    pair = [
        _img(uri, alt)
        for uri, alt in ((pr, "mean precision-recall curves"), (landmarks, "mAP per landmark"))
        if uri is not None
    ]
    parts = ['<div class="plots">']
    if per_query is not None:
        parts.append(_img(per_query, "AP per query"))
    if pair:
        parts.append(f'<div class="pair">{"".join(pair)}</div>')
    parts.append("</div>")
    return "<h2>Plots</h2>" + "".join(parts) if len(parts) > 2 else ""


# --------------------------------------------------------------------------- files


def write_report(
    report: dict,
    out_dir: str | Path,
    *,
    benchmark: Benchmark,
    rankings: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    thumbnails_for: int = 4,
) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir`` (any URI:
    local, gs://, s3://) and return their URIs under the keys "json", "markdown" and "html".

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
    page = render_html(
        report, benchmark=benchmark, rankings=rankings, thumbnails_for=thumbnails_for
    )
    for key, content in (
        ("json", text + "\n"),
        ("markdown", render_markdown(report)),
        ("html", page),
    ):
        storage.write_bytes(uris[key], redact(content).encode("utf-8"))
    return uris
