"""Smoke runs of the benchmarks re-based on the real models (their full runs are recorded in BENCHMARKS.md)."""

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_cache_benchmark_quick_run():
    from hf_efficient.bench import cache

    report = cache.run(quick=True)
    rows = {row["method"]: row for row in report.rows}
    assert rows["DynamicCache"]["ppl_ratio"] == 1.0 and rows["DynamicCache"]["model"] == "smollm2-135m"
    assert {"KIVI 2-bit", "GEAR 4-bit", "SnapKV 50%", "HF QuantizedCache quanto 4-bit"} <= rows.keys()
    assert rows["Streaming 50%"]["bytes_ratio"] < 0.6  # eviction holds about half
    assert "test split" in report.setup and "group size 32" in report.setup


def test_baseline_benchmark_quick_run():
    from hf_efficient.bench import baseline

    report = baseline.run(quick=True)
    labels = [row["configuration"] for row in report.rows]
    assert labels[0] == "greedy fp32, batch 1" and report.rows[0]["speedup"] == 1.0
    assert "prompt lookup bf16, batch 1" in labels
    assert all(row["mean_accepted"] >= 1.0 for row in report.rows)
