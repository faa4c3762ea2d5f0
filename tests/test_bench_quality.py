"""The quality benchmark: its fixed sample of test passages, and a quick run on the real and self-trained models."""

import math

import pytest

from hf_efficient.bench import quality
from hf_efficient.reference import reference_corpus


def test_corpus_passages_are_a_fixed_spread_sample_of_the_test_split():
    documents = reference_corpus("test", "prose")
    everything = quality.corpus_passages("prose", 10**9, passage_chars=600)  # k = 1
    assert "".join(everything) == "".join(documents)  # the passages tile the split, in order
    ends = [p for p in everything if not any(d.endswith(p) for d in documents)]  # passages that end mid-document
    assert ends and all(len(p) > 600 and p.endswith("\n") for p in ends)  # ... end at the first line break after 600
    passages = quality.corpus_passages("prose", 5_000, passage_chars=600)
    assert passages == everything[:: math.ceil(sum(map(len, everything)) / 5_000)]  # every k-th: spread, fixed
    assert 5_000 <= sum(map(len, passages)) <= 8_000
    with pytest.raises(ValueError, match="text_chars"):
        quality.corpus_passages("code", 0)


@pytest.mark.reference
@pytest.mark.real
@pytest.mark.slow  # loads Gemma-3-270M (its first conversion takes about a minute)
def test_benchmark_quick_run():
    report = quality.run(quick=True)
    assert [(row["model"], row["kind"]) for row in report.rows] == [
        (model, kind) for model in quality.MODELS for kind in quality.TEXT_CHARS
    ]
    for kind in quality.TEXT_CHARS:
        rows = [row for row in report.rows if row["kind"] == kind]
        assert len({(row["gzip_bits_per_byte"], row["kB"]) for row in rows}) == 1  # one text sample for every model
        assert all(math.isfinite(row["bits_per_byte"]) and row["bits_per_byte"] > 0 for row in rows)
        assert all(row["reduction_vs_gzip"] > 0 for row in rows if row["model"] in quality.REAL)
    assert "test split" in report.setup and any(note.startswith("code: best real model") for note in report.notes)
