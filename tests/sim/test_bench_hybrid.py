"""The hybrid benchmarks of issue 25 run and report their keys (figures are not checked:
timing belongs to the benchmark output, not to tests)."""

from __future__ import annotations

import math

from sim.bench_mpc import bench_hybrid_atmp


def test_hybrid_atmp_reports_the_refresh_and_keeps_its_keys() -> None:
    out = bench_hybrid_atmp(30, variance=True, steps=2, refreshes=3)
    for key in ("median_s", "mechanistic_median_s", "gp_overhead_ratio", "failures"):
        assert key in out
    assert out["refreshes"] == 3
    refresh = out["refresh_residual_median_s"]
    assert isinstance(refresh, float) and math.isfinite(refresh) and refresh >= 0.0
    assert out["failures"] == 0
