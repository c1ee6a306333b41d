"""Report plots, rendered off-screen and returned as ``data:`` URIs for a self-contained HTML.

Figures are built with ``matplotlib.figure.Figure`` on an explicit Agg canvas instead of
pyplot, so rendering a report needs no display and does not touch the process-wide pyplot
state (or backend) that other code may rely on. All inputs are percentages (0-100).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
# Above this many bars, per-bar labels are unreadable: label the axis only.
MAX_LABELLED_BARS = 60


def _to_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def per_query_ap_plot(per_query: Mapping[str, float | None], title: str) -> str | None:
    """Bar chart of the AP of every query, sorted ascending: shows at a glance whether a mAP
    comes from uniformly mediocre queries or from a few complete failures."""
    items = sorted(((ap, qid) for qid, ap in per_query.items() if _finite(ap)))
    if not items:
        return None
    fig = Figure(figsize=(11, 3.6))
    ax = fig.add_subplot()
    positions = range(len(items))
    ax.bar(positions, [ap for ap, _ in items], width=0.85, color="#4c72b0")
    ax.set_ylim(0, 100)
    ax.set_ylabel("AP (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(items) - 0.4)
    if len(items) <= MAX_LABELLED_BARS:
        ax.set_xticks(list(positions), [qid for _, qid in items], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(items)} queries, sorted by AP")
    return _to_data_uri(fig)


def pr_curves_plot(curves: Mapping[str, Sequence[float | None]]) -> str | None:
    """Mean interpolated precision-recall curves of all results on one plot, to compare
    methods beyond a single number (e.g. early precision versus full recall)."""
    drawable = {
        name: [math.nan if v is None else v for v in curve]
        for name, curve in curves.items()
        if curve and any(_finite(v) for v in curve)
    }
    if not drawable:
        return None
    fig = Figure(figsize=(5.4, 4.2))
    ax = fig.add_subplot()
    for name, curve in drawable.items():
        recall = [100.0 * i / (len(curve) - 1) for i in range(len(curve))]
        ax.plot(recall, curve, label=name, linewidth=1.6)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.set_xlabel("recall (%)")
    ax.set_ylabel("interpolated precision (%)")
    ax.set_title("Mean precision-recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _to_data_uri(fig)


def per_landmark_plot(per_landmark: Mapping[str, Mapping[str, float | None]]) -> str | None:
    """Grouped horizontal bars: mAP of every landmark (rows) for every result (colours), so
    that a method's gain or loss can be traced to the landmarks it comes from.

    ``per_landmark`` maps result name -> landmark -> mAP.
    """
    landmarks = sorted({lm for scores in per_landmark.values() for lm in scores})
    if not landmarks:
        return None
    names = list(per_landmark)
    height = 0.8 / len(names)
    fig = Figure(figsize=(5.4, max(2.5, 0.32 * len(landmarks) * max(1, len(names) ** 0.5) + 1)))
    ax = fig.add_subplot()
    for j, name in enumerate(names):
        values = [per_landmark[name].get(lm) for lm in landmarks]
        offsets = [i - 0.4 + height * (j + 0.5) for i in range(len(landmarks))]
        ax.barh(offsets, [v if _finite(v) else 0.0 for v in values], height=height, label=name)
    ax.set_yticks(range(len(landmarks)), landmarks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("mAP (%)")
    ax.set_title("mAP per landmark")
    ax.grid(axis="x", alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8, loc="lower right")
    return _to_data_uri(fig)


def per_query_scatter_plot(
    baseline: Mapping[str, float | None],
    others: Mapping[str, Mapping[str, float | None]],
    baseline_name: str,
) -> str | None:
    """AP of every query: baseline (x) against each other run (y). Points above the diagonal
    got better, below it worse; one colour per compared run."""
    fig = Figure(figsize=(5.4, 5.2))
    ax = fig.add_subplot()
    drawn = False
    for name, scores in others.items():
        pairs = [
            (baseline[q], scores[q])
            for q in baseline
            if q in scores and _finite(baseline[q]) and _finite(scores[q])
        ]
        if not pairs:
            continue
        xs, ys = zip(*pairs, strict=True)
        ax.scatter(xs, ys, s=14, alpha=0.7, label=name)
        drawn = True
    if not drawn:
        return None
    ax.plot([0, 100], [0, 100], color="#888", linewidth=1, linestyle="--")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(f"AP (%), {baseline_name}")
    ax.set_ylabel("AP (%), compared run")
    ax.set_title("AP per query (above the line: better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _to_data_uri(fig)


def landmark_delta_plot(deltas: Mapping[str, Mapping[str, float | None]]) -> str | None:
    """Horizontal bars: mAP change per landmark (rows) for each compared run (colours)."""
    landmarks = sorted({lm for d in deltas.values() for lm in d})
    if not landmarks:
        return None
    names = list(deltas)
    height = 0.8 / len(names)
    fig = Figure(figsize=(5.4, max(2.5, 0.32 * len(landmarks) + 1)))
    ax = fig.add_subplot()
    for j, name in enumerate(names):
        values = [deltas[name].get(lm) for lm in landmarks]
        offsets = [i - 0.4 + height * (j + 0.5) for i in range(len(landmarks))]
        ax.barh(offsets, [v if _finite(v) else 0.0 for v in values], height=height, label=name)
    ax.axvline(0, color="#444", linewidth=1)
    ax.set_yticks(range(len(landmarks)), landmarks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Δ mAP (points)")
    ax.set_title("mAP change per landmark")
    ax.grid(axis="x", alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8)
    return _to_data_uri(fig)
