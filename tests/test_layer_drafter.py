"""A drafter cut from the target (`drafter_from_target`) and the recipe that distils it (`--student-layers`)."""

import copy

import pytest
import torch
from factories import tiny_causal_lm, tiny_hybrid_lm, tiny_tokenizer

from hf_efficient.speculative import DraftModel, load_drafter
from hf_efficient.speculative.layer_drafter import drafter_from_target, layer_selection


def test_layer_selection_keeps_the_first_layers_and_the_last():
    assert layer_selection(30, 4) == [0, 1, 2, 29]
    assert layer_selection(30, 1) == [29]
    with pytest.raises(ValueError, match="between 1 and"):
        layer_selection(4, 5)


def test_all_layers_reproduce_the_target_and_the_target_is_untouched():
    target = tiny_causal_lm("llama", num_hidden_layers=3)
    before = copy.deepcopy(target.state_dict())
    ids = torch.randint(3, 90, (2, 12))
    drafter = drafter_from_target(target, [0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(drafter(ids).logits, target(ids).logits, rtol=0, atol=0)
    drafter.model.layers[0].self_attn.q_proj.weight.data.add_(1.0)  # copies, not views
    assert all(torch.equal(tensor, target.state_dict()[name]) for name, tensor in before.items())
    assert target.config.num_hidden_layers == 3


def test_a_cut_drafter_holds_the_chosen_layers_in_order():
    target = tiny_causal_lm("llama", num_hidden_layers=4)
    drafter = drafter_from_target(target, 2)  # layers 0 and 3
    assert drafter.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 3)):
        assert torch.equal(drafter.model.layers[new].mlp.up_proj.weight, target.model.layers[old].mlp.up_proj.weight)
    assert torch.equal(drafter.get_output_embeddings().weight, target.get_output_embeddings().weight)
    with pytest.raises(ValueError, match="indices below 4"):
        drafter_from_target(target, [0, 4])


def test_a_hybrid_target_keeps_each_layer_kind():
    target = tiny_hybrid_lm()  # sliding, sliding, full, sliding
    drafter = drafter_from_target(target, [1, 2])
    assert drafter.config.layer_types == ["sliding_attention", "full_attention"]
    assert target.config.layer_types == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]


def test_a_cut_drafter_is_lossless_in_draft_model():
    target = tiny_causal_lm("llama", num_hidden_layers=3)
    drafter = drafter_from_target(target, 2)
    ids = torch.randint(3, 90, (1, 10))
    expected = target.generate(ids, max_new_tokens=16, do_sample=False)
    out = target.generate(ids, custom_generate=DraftModel(drafter), max_new_tokens=16, do_sample=False)
    assert torch.equal(out, expected)


@pytest.mark.slow  # starts TRL's DistillationTrainer (~10 s)
def test_distill_recipe_cuts_distils_and_trims_a_drafter(tmp_path):
    from hf_efficient.recipes import distill_drafter

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    teacher = tiny_causal_lm("llama", vocab_size=len(tokenizer), num_hidden_layers=3)
    teacher.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    out = tmp_path / "drafter"
    distill_drafter.main(
        [
            *(f"--teacher={tmp_path / 'target'}", "--student-layers=2", "--chat", "--vocab-size=64"),
            *(f"--output-dir={out}", "--num-prompts=8", "--max-steps=2", "--batch-size=4"),
            *("--completion-tokens=4", "--prompt-tokens=8", "--teacher-dtype=bfloat16"),
        ]
    )
    drafter = load_drafter(out)
    assert drafter.config.num_hidden_layers == 2 and len(drafter.config.draft_vocab_ids) == 64
    assert drafter.get_output_embeddings().weight.shape[0] == 64
    cut = drafter_from_target(teacher, 2)
    assert not torch.equal(drafter.model.layers[0].mlp.up_proj.weight, cut.model.layers[0].mlp.up_proj.weight)
    ids = tokenizer("def read(path):", return_tensors="pt").input_ids
    expected = teacher.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(teacher.generate(ids, custom_generate=DraftModel(drafter), max_new_tokens=12), expected)


def test_recipe_refuses_a_student_and_student_layers_together():
    from hf_efficient.recipes.distill_drafter import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--teacher=t", "--student=s", "--student-layers=2"])
    with pytest.raises(SystemExit):
        parse_args(["--student-layers=2"])
