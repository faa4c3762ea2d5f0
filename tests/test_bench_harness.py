import json

import pytest
import torch
from factories import tiny_causal_lm

from hf_efficient import bench
from hf_efficient.bench.harness import BenchReport, ForwardCounter, interleaved, measure, ratio


def test_measure_median_and_result():
    calls = []
    timing = measure(lambda: calls.append(1) or len(calls), warmup=2, repeats=3)
    assert len(calls) == 5 and timing.result == 5
    assert len(timing.times_s) == 3 and min(timing.times_s) <= timing.median_s <= max(timing.times_s)
    assert timing.peak_memory_bytes is not None and timing.peak_memory_bytes >= 0
    with pytest.raises(ValueError, match="repeats=0"):
        measure(lambda: None, repeats=0)


def test_interleaved_rotates_order_and_reports_median_of_per_round_ratios():
    order = []
    works = {name: (lambda n=name: order.append(n) or len(order)) for name in "abc"}
    timing = interleaved(works, rounds=3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotating rounds
    assert [len(timing.times_s[n]) for n in "abc"] == [3, 3, 3] and timing.results["a"] == [4, 9, 11]
    timing.times_s = {"base": [1.0, 2.0, 10.0], "fast": [0.5, 1.0, 20.0]}  # the last round: a hiccup in "fast"
    timing.results = {"base": [8, 8, 8], "fast": [8, 8, 4]}
    assert timing.speedup("fast", "base") == 2.0  # median of 2, 2, 0.5: the hiccup does not move it
    assert timing.per_round("fast", "base", amount=lambda r: r) == [2.0, 2.0, 0.25]  # tokens/s ratios
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved(works, rounds=0)


def test_peak_memory_sees_a_large_allocation():
    timing = measure(lambda: torch.ones(64 * 2**20 // 4).sum(), warmup=0, repeats=1)
    assert timing.peak_memory_bytes > 32 * 2**20


def test_forward_counter_counts_target_forwards():
    model = tiny_causal_lm("llama")
    with ForwardCounter(model) as counter:
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert counter.calls == 4  # one prefill + three decode steps for four new tokens


def _report() -> BenchReport:
    report = BenchReport("unit", "Unit report", setup="two rows")
    report.add_row({"method": "a", "speedup": 1.0})
    report.add_row({"method": "b", "speedup": ratio(3.0, 2.0), "extra": 7})
    report.note("a note")
    report.bar_plot("speedup")
    return report


def test_report_files_and_markdown(tmp_path):
    report = _report()
    paths = report.save(tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    data = json.loads(paths[0].read_text())
    assert data["rows"][1]["speedup"] == 1.5 and data["machine"]["device"] == "cpu"
    markdown = paths[1].read_text()
    assert "| method | speedup | extra |" in markdown and "| b | 1.5 | 7 |" in markdown and "- a note" in markdown


def test_record_replaces_its_own_section_only(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nintro\n")
    _report().record(md)
    first = md.read_text()
    _report().record(md)
    second = md.read_text()
    assert second.count("<!-- bench:unit -->") == 1 and "intro" in second
    assert (tmp_path / "docs/benchmarks/unit.png").is_file()
    assert first.split("<!-- bench:unit -->")[0] == second.split("<!-- bench:unit -->")[0]


def test_unknown_benchmark_names_the_available_ones():
    with pytest.raises(ValueError, match="baseline"):
        bench.run("nope")


def test_loaded_report_records_without_rerunning(tmp_path):
    report = _report()
    json_path = report.save(tmp_path / "results")[0]
    loaded = BenchReport.load(json_path)
    assert loaded.rows == report.rows and loaded.notes == report.notes and loaded.to_markdown() == report.to_markdown()
    md = tmp_path / "BENCHMARKS.md"
    loaded.record(md)
    assert "| b | 1.5 | 7 |" in md.read_text() and (tmp_path / "docs/benchmarks/unit.png").is_file()


def test_chat_prompt_set():
    """Six Spec-Bench categories, 2 validation and 8 test conversations each, all ending with the user."""
    from hf_efficient.bench import available
    from hf_efficient.bench.chat_prompts import CATEGORIES, chat_inputs, chat_prompts

    assert len(CATEGORIES) == 6 and "chat_prompts" not in available()
    seen = set()
    for category in CATEGORIES:
        validation, test = chat_prompts(category, "validation"), chat_prompts(category, "test")
        assert len(validation) == 2 and len(test) == 8
        for conversation in validation + test:
            assert conversation[-1]["role"] == "user" and conversation[0]["role"] == "user"
            key = str(conversation)
            assert key not in seen  # no conversation twice, so no test prompt leaks into validation
            seen.add(key)
    with pytest.raises(ValueError, match="category"):
        chat_prompts("poetry")
    with pytest.raises(ValueError, match="chat template"):
        chat_inputs(object(), chat_prompts("translation")[0])
