"""`exfm bench train` on a tiny stream: every arm trains the same rows, and the figures add up."""

import math

import pytest

from benches.train import TrainBenchConfig, run

pytestmark = pytest.mark.ray


def test_bench_train_arms_train_the_same_rows_and_figures_add_up(ray_cluster):
    lines = []
    got = run(TrainBenchConfig(rows_per_window=3000, windows=2), log=lines.append)

    assert len(lines) == 2 and len(got["per_window"]) == 2
    for w in got["per_window"]:
        one = w["plain"]["rows"]
        assert one > 0
        assert w["one_tenant"]["rows"] == one  # run A alone: the plain loop's rows
        assert w["two_tenants"]["rows"] == 2 * one  # A again and its twin B, at once
        assert w["bare_pair"]["rows"] == 2 * one
        for arm in ("plain", "bare_pair", "one_tenant", "two_tenants"):
            assert 0 < w[arm]["train_s"] <= w[arm]["seconds"]
    rows = sum(w["plain"]["rows"] for w in got["per_window"])
    assert got["rows_per_tenant"] == rows
    # Totals are rows over seconds summed across windows (not a mean of per-window rates).
    for arm, per_tenant in (("one_tenant", 1), ("two_tenants", 2), ("bare_pair", 2)):
        seconds = sum(w[arm]["seconds"] for w in got["per_window"])
        assert math.isclose(got[f"{arm}_rows_per_s"], per_tenant * rows / seconds)
