"""The 10M extrapolation of benchmarks/index_scale.py (pure arithmetic over two runs' JSON)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_scale.py"


@pytest.fixture(scope="module")
def index_scale():
    spec = importlib.util.spec_from_file_location("index_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(n: int, budget: int, **tools: dict) -> dict:
    return {"n": n, "budget_bytes": budget, **tools}


def test_extrapolation_fits_a_power_of_n_on_each_tools_two_largest_runs(index_scale):
    runs = [
        _run(100_000, 16 << 20, autofaiss={"cpu_s": 50.0, "bytes": 1e7}),
        _run(1_000_000, 100 << 20, project={"cpu_s": 100.0, "bytes": 1e8},
             autofaiss={"cpu_s": 500.0, "bytes": 1e8}),
        _run(3_000_000, 300 << 20, project={"cpu_s": 900.0, "bytes": 3e8}),
    ]  # fmt: skip
    fitted = index_scale.extrapolate(runs, 10_000_000)
    # project: 1M -> 3M, CPU grows 9x for 3x the vectors (n ** 2), bytes linearly
    assert fitted["project"]["from_n"] == [1_000_000, 3_000_000]
    assert fitted["project"]["cpu_s"] == {"exponent": 2.0, "predicted": 10_000.0}
    assert fitted["project"]["bytes"]["exponent"] == 1.0
    assert fitted["project"]["bytes"]["predicted"] == pytest.approx(1e9)
    # autofaiss: only its two runs (100k, 1M) count, whatever the project ran
    assert fitted["autofaiss"]["from_n"] == [100_000, 1_000_000]
    assert fitted["autofaiss"]["cpu_s"] == {"exponent": 1.0, "predicted": 5_000.0}
    assert fitted["autofaiss"]["budget_bytes_per_vector"] == [167.8, 104.9]
    assert fitted["ratios"]["cpu_s_project_over_autofaiss"] == 2.0


def test_a_tool_with_one_run_is_not_extrapolated(index_scale):
    runs = [_run(1_000_000, 1, project={"cpu_s": 1.0}), _run(2_000_000, 1, project={"cpu_s": 2.0}),
            _run(1_000_000, 1, autofaiss={"cpu_s": 1.0})]  # fmt: skip
    fitted = index_scale.extrapolate(runs, 4_000_000)
    assert fitted["autofaiss"] is None and "ratios" not in fitted
    assert fitted["project"]["cpu_s"]["predicted"] == 4.0
