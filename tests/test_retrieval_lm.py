"""The retrieval-LM recipe: its synthetic rows, its per-task loss, and a short end-to-end run."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from factories import tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_efficient.recipes.train_retrieval_lm import (
    PROBE_PREFIXES,
    QUERY_LAYOUTS,
    TASKS,
    TRAIN_PREFIXES,
    SyntheticRows,
    copy_row,
    key_value_row,
    key_value_texts,
    main,
    regular_tokens,
    task_mean_loss,
)


@pytest.mark.parametrize("length,spans", [(48, 1), (144, 3), (512, 10)])
def test_copy_rows_label_only_tokens_that_continue_an_earlier_occurrence(length, spans):
    tokens = range(3, 400)
    for seed in range(20):
        ids, labels = copy_row(tokens, random.Random(seed), length, spans)
        assert len(ids) == len(labels) == length and all(token in tokens for token in ids)
        labelled = [p for p, label in enumerate(labels) if label != -100]
        assert len(labelled) >= 3 * spans  # each copy spans >= 4 tokens, its first one unlabelled
        for p in labelled:
            assert labels[p] == ids[p]
            # the bigram ending here occurred before: a model that copies from its context can predict it
            assert any(ids[q - 1 : q + 1] == ids[p - 1 : p + 1] for q in range(1, p - 1))


def test_copy_row_refuses_rows_too_short_for_its_spans():
    with pytest.raises(ValueError, match="too short"):
        copy_row(range(3, 100), random.Random(0), 20, 3)


def test_key_value_rows_query_their_planted_lines_with_training_names_only():
    tokenizer = tiny_tokenizer()
    filler = torch.randint(3, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    assert not set(PROBE_PREFIXES) & set(TRAIN_PREFIXES)
    layouts = {"inline": r'\n(\w+) = "(\w+)"', "question": r'\n(\w+)\?\n"(\w+)"'}  # QUERY_LAYOUTS as patterns
    seen = set()
    for seed in range(10):
        ids, labels = key_value_row(tokenizer, filler, random.Random(seed), 200)
        assert len(ids) == len(labels) == 200
        first = next(p for p, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[first:]) and labels[first:] == ids[first:]
        tail, context = tokenizer.decode(ids[first:]), tokenizer.decode(ids[:first])
        queries = {layout: re.findall(pattern, tail) for layout, pattern in layouts.items()}
        seen |= {layout for layout, found in queries.items() if found}
        pairs = [pair for found in queries.values() for pair in found]
        assert 1 <= len(pairs) <= 6
        for name, value in pairs:
            assert name.split("_")[0] in TRAIN_PREFIXES and f'{name} = "{value}"' in context
    assert seen == set(QUERY_LAYOUTS)


def test_key_value_texts_are_documents_of_the_asked_length():
    tokenizer = tiny_tokenizer()
    texts = ["the cache keeps chunks of text. " * 30, "def f(x):\n    return x\n" * 30]
    documents = key_value_texts(tokenizer, texts, count=3, length=150, seed=1)
    assert len(documents) == 3 and documents == key_value_texts(tokenizer, texts, count=3, length=150, seed=1)
    for document in documents:
        assert re.search(r'\w+_\d\d = "[a-z]{5}"\n', document)
        assert abs(len(tokenizer(document, add_special_tokens=False).input_ids) - 150) <= 5  # decode/encode drift
    with pytest.raises(ValueError, match="need more"):
        key_value_texts(tokenizer, ["short"], count=1, length=150)


def test_key_value_row_refuses_documents_without_room():
    with pytest.raises(ValueError, match="no room"):
        key_value_row(tiny_tokenizer(), list(range(3, 40)), random.Random(0), 12)


def test_task_mean_loss_weighs_each_task_equally():
    """Each task's loss is a mean over its own labelled tokens: repeating the rows of one task changes nothing,
    and the total is the sum of the per-task means."""
    logits = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5], [-100, -100, -100, -100, 7, 8], [-100, -100, -100, -100, -100, 9]])
    task = torch.tensor([0, 1, 1])

    def mean(rows):
        return torch.nn.functional.cross_entropy(
            logits[rows, :-1].flatten(0, 1), labels[rows, 1:].flatten(), ignore_index=-100
        )

    expected = mean([0]) + mean([1, 2])
    assert torch.allclose(task_mean_loss(logits, labels, task), expected)
    repeated = task_mean_loss(logits[[0, 0, 0, 1, 2]], labels[[0, 0, 0, 1, 2]], task[[0, 0, 0, 1, 2]])
    assert torch.allclose(repeated, expected)


def test_synthetic_rows_follow_the_mix_and_refuse_unknown_tasks():
    tokenizer = tiny_tokenizer()
    stream = torch.randint(3, 200, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = SyntheticRows(tokenizer, stream, 96, {"copy": 1, "text": 1}, seed=0)
    drawn = [row for row, _ in zip(rows, range(200))]
    assert {row["input_ids"].shape for row in drawn} == {torch.Size([96])}
    counts = [sum(row["task"] == TASKS.index(task) for row in drawn) for task in ("copy", "key_value", "text")]
    assert counts[1] == 0 and 60 < counts[0] < 140 and counts[0] + counts[2] == 200
    text = next(row for row in drawn if row["task"] == TASKS.index("text"))
    assert torch.equal(text["input_ids"], text["labels"])
    again = [row for row, _ in zip(rows, range(5))]  # each iteration restarts the seeded stream
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, drawn))
    with pytest.raises(ValueError, match="unknown tasks"):
        SyntheticRows(tokenizer, stream, 96, {"copying": 1}, seed=0)
    assert regular_tokens(tokenizer).start == max(tokenizer.all_special_ids) + 1


@pytest.mark.reference
def test_recipe_trains_both_phases_and_stops_induction_at_the_copy_check(tmp_path):
    """With `--copy-accuracy 0` the first copy check (step 100) ends phase 1; phase 2 then trains and the output
    loads with `AutoModelForCausalLM`; a rerun resumes instead of retraining."""
    out = tmp_path / "retrieval-lm"
    args = [
        f"--output-dir={out}",
        "--hidden-size=32",
        "--heads=2",
        "--kv-heads=1",
        "--induction-seq-len=48",
        "--induction-batch-size=2",
        "--copy-accuracy=0",
        "--seq-len=96",
        "--batch-size=2",
        "--max-steps=3",
        "--max-documents=20",
        "--quiet",
    ]
    main(args)
    record = json.loads((out / "retrieval_training.json").read_text())
    assert record["induction_steps"] == 100 and record["retrieval_steps"] == 3
    assert [step for step, _ in record["copy_checks"]] == [100]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and (out / "tokenizer.json").is_file()
    main(args)  # both phases are complete: the rerun resumes at the end and changes no weight
    again = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "retrieval_training.json").read_text())["induction_steps"] == 100
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
