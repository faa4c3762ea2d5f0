"""PEFT LoRA on the byte-level models and on ChunkLLM's adapters: what is targeted, training, save/load round trips.

Each model documents its default targets as `lora_target_modules` (see `docs/peft.md`).
"""

import pytest
import torch
from factories import tiny_causal_lm
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from test_hat import tiny_hat
from test_hnet import TOK, tiny_hnet
from transformers import AutoModelForCausalLM

from hf_efficient.models import ChunkLLMForCausalLM, HATForCausalLM, HNetForCausalLM


def _lora(model, target_modules, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(model, config)


def _lora_modules(model) -> set[str]:
    """Names (relative to the wrapped model) of the modules PEFT put LoRA on."""
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _train(model, steps: int, **batch) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _frozen_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize(("family", "model_class"), [("hnet", HNetForCausalLM), ("hat", HATForCausalLM)])
def test_lora_on_byte_models_trains_saves_and_reloads(tmp_path, family, model_class):
    make = {"hnet": lambda: tiny_hnet("1stage"), "hat": lambda: tiny_hat("default")}[family]
    make().save_pretrained(tmp_path / "base")
    model = _lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), model_class.lora_target_modules)
    linear = {n for n, m in make().named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linear if n.rsplit(".", 1)[-1] in model_class.lora_target_modules}
    assert _lora_modules(model) == expected and "lm_head" not in expected
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    texts = ["def add(a, b):\n    return a + b", "Hallo wörld, 世界"]
    batch = TOK(texts, padding=True, padding_side="left", return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    frozen = _frozen_weights(model)
    losses = _train(model, 6, **batch, labels=labels)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path / "lora")

    generate = dict(max_new_tokens=8, do_sample=False, pad_token_id=TOK.pad_token_id)
    with torch.no_grad():
        expected_logits = model(**batch).logits
        base_logits = make()(**batch).logits
    assert not torch.allclose(expected_logits, base_logits)  # the trained adapters change the model
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")  # the base named in adapter_config.json + LoRA
    for loaded in (reloaded, auto):
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected_logits, rtol=0, atol=0)
        assert torch.equal(loaded.generate(**batch, **generate), model.generate(**batch, **generate))
    merged = reloaded.merge_and_unload()
    assert type(merged) is model_class
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_lora_on_chunkllm_adapters_leaves_the_backbone_alone(tmp_path):
    tiny_causal_lm("llama").save_pretrained(tmp_path / "backbone")
    adapters = ChunkLLMForCausalLM.from_backbone(str(tmp_path / "backbone"), top_k_chunks=2, local_chunks=1)
    with torch.no_grad():
        adapters.boundary_adapter.out.bias.zero_()  # many short chunks: selection is on
    adapters.save_pretrained(tmp_path / "adapters")  # the trained adapters LoRA fine-tunes

    model = _lora(AutoModelForCausalLM.from_pretrained(tmp_path / "adapters"), ChunkLLMForCausalLM.lora_target_modules)
    layers = adapters.config.backbone_config.num_hidden_layers
    qk = {f"qk_adapters.{i}.{proj}" for i in range(layers) for proj in ("q_proj", "k_proj")}
    assert _lora_modules(model) == qk | {"boundary_adapter.up", "boundary_adapter.out"}  # not the backbone's q/k

    input_ids = torch.randint(3, 90, (2, 48), generator=torch.Generator().manual_seed(0))
    frozen = _frozen_weights(model)
    losses = _train(model, 5, input_ids=input_ids, boundary_labels=(input_ids % 5 == 0).float())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    model.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        expected = model(input_ids).logits
        assert not torch.equal(expected, adapters(input_ids).logits)

    # the chain: LoRA -> its base (the ChunkLLM adapter checkpoint) -> that checkpoint's backbone
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    direct = ChunkLLMForCausalLM.from_pretrained(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(ChunkLLMForCausalLM.from_pretrained(tmp_path / "adapters"), tmp_path / "lora")
    for loaded in (auto, direct, reloaded):
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids).logits, expected, rtol=0, atol=0)
    generate = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(auto.generate(input_ids=input_ids, **generate), model.generate(input_ids=input_ids, **generate))

    merged = reloaded.merge_and_unload()  # plain ChunkLLM adapters again, saved the usual way
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(again) is ChunkLLMForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ recipes

QUANTIZED = {"Linear4bit", "Linear8bitLt"}


@pytest.fixture
def runs(monkeypatch):
    """What each `Trainer.train` call of a recipe trained: per run, the quantized layer types of the trained model
    and of the frozen model beside it (teacher or base), whether LoRA is in, and which parameters trained/changed."""
    from transformers import Trainer

    records, train = [], Trainer.train

    def probed(self, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        result = train(self, *args, **kwargs)
        frozen = getattr(self, "teacher_model", None) or getattr(self, "base_model", None)
        records.append(
            {
                "quantized": {type(m).__name__ for m in self.model.modules()} & QUANTIZED,
                "beside": {type(m).__name__ for m in frozen.modules()} & QUANTIZED if frozen is not None else set(),
                "lora": any(isinstance(m, LoraLayer) for m in self.model.modules()),
                "trainable": {n for n, p in self.model.named_parameters() if p.requires_grad},
                "changed": {n for n, p in self.model.named_parameters() if not torch.equal(p.detach(), before[n])},
            }
        )
        return result

    monkeypatch.setattr(Trainer, "train", probed)
    return records


def _saved_causal_lm(path, tokenizer, **overrides) -> str:
    """A tiny Llama and its tokenizer saved to `path`; hidden size 64, a multiple of bitsandbytes' 4-bit block."""
    tiny_causal_lm(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, **overrides
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_chunkllm_recipe_on_a_quantized_backbone_then_lora_on_its_adapters(tmp_path, runs):
    import json

    from factories import tiny_tokenizer

    from hf_efficient.recipes.train_chunkllm import main

    tokenizer = tiny_tokenizer()
    backbone = _saved_causal_lm(tmp_path / "backbone", tokenizer)
    (tmp_path / "corpus.txt").write_text(
        "The cache keeps chunks. Each chunk ends here!\nA new line starts? Yes.\n" * 40
    )
    common = [f"--text-file={tmp_path / 'corpus.txt'}", "--max-steps=3", "--seq-len=48", "--batch-size=2", "--quiet"]
    main([f"--backbone={backbone}", f"--output-dir={tmp_path / 'adapters'}", "--load-in-4bit", *common])
    first = runs[0]
    assert first["quantized"] == {"Linear4bit"} and not first["lora"]
    assert first["changed"] == first["trainable"] and not any(n.startswith("backbone.") for n in first["trainable"])
    adapters = AutoModelForCausalLM.from_pretrained(tmp_path / "adapters")  # full-precision backbone from its path
    assert adapters.config.base_model_name_or_path == backbone
    assert json.loads((tmp_path / "adapters" / "chunkllm_training.json").read_text())["quantized_backbone"] == "4-bit"

    with pytest.raises(SystemExit):  # LoRA fine-tunes trained adapters: --adapters is required
        main([f"--backbone={backbone}", f"--output-dir={tmp_path / 'bad'}", "--lora", *common])
    main(
        [
            f"--adapters={tmp_path / 'adapters'}",
            f"--output-dir={tmp_path / 'tuned'}",
            "--lora",
            "--load-in-8bit",
            *common,
        ]
    )
    second = runs[1]
    assert second["quantized"] == {"Linear8bitLt"} and second["lora"]
    assert all("lora_" in n for n in second["trainable"]) and second["changed"] <= second["trainable"]
    assert second["changed"]
    lora = json.loads((tmp_path / "tuned" / "lora" / "adapter_config.json").read_text())
    assert lora["base_model_name_or_path"] == str(tmp_path / "adapters")
    merged = ChunkLLMForCausalLM.from_pretrained(tmp_path / "tuned")  # the LoRA merged into the adapters
    unmerged = PeftModel.from_pretrained(
        ChunkLLMForCausalLM.from_pretrained(tmp_path / "adapters"), tmp_path / "tuned" / "lora"
    )
    input_ids = tokenizer(
        "The cache keeps chunks. Each chunk ends here!\nA new line" * 3, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = unmerged(input_ids).logits
        torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(adapters(input_ids).logits, expected)


def test_hypernet_recipe_on_a_quantized_base_with_lora_resumes(tmp_path, runs, monkeypatch):
    from factories import tiny_tokenizer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModel

    from hf_efficient.recipes.train_hypernet import HypernetTrainer, main

    base = _saved_causal_lm(tmp_path / "base", tiny_tokenizer(), tie_word_embeddings=False)
    args = [f"--base={base}", f"--output-dir={tmp_path / 'out'}", "--batch-size=2", "--identity-steps=1"]
    args += ["--texts=16", "--hidden-size=32", "--vocab-min=270", "--vocab-max=320", "--save-steps=1"]
    args += ["--load-in-4bit", "--lora", "--lora-r=4"]
    resumed = []
    load = HypernetTrainer._load_from_checkpoint

    def checked_load(self, checkpoint, model=None):  # resuming restores the base's LoRA weights of the checkpoint
        load(self, checkpoint, model)
        saved = load_file(f"{checkpoint}/base_lora/adapter_model.safetensors")
        now = get_peft_model_state_dict(self.model.base_model)
        resumed.append(saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved))

    monkeypatch.setattr(HypernetTrainer, "_load_from_checkpoint", checked_load)
    main([*args, "--max-steps=2"])
    main([*args, "--max-steps=3"])  # resumes from checkpoint-2
    assert resumed == [True]
    for run in runs:
        assert run["quantized"] == {"Linear4bit"} and run["lora"]  # the base (4-bit, LoRA) trains inside the model
        assert all(n.startswith("hypernet.") or "lora_" in n for n in run["trainable"])
        assert run["changed"] <= run["trainable"]
    assert any("lora_" in n for n in runs[-1]["changed"]) and any(
        n.startswith("hypernet.") for n in runs[-1]["changed"]
    )

    hypernet = AutoModel.from_pretrained(tmp_path / "out")  # the base's embeddings copied from its folder
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert torch.equal(hypernet.source_embeddings[:, :64], plain.get_input_embeddings().weight)
    adapted = PeftModel.from_pretrained(plain, tmp_path / "out" / "base_lora")
    assert _lora_modules(adapted) and adapted.peft_config["default"].r == 4


@pytest.mark.slow  # starts TRL's DistillationTrainer (~10 s)
def test_distill_recipe_qlora(tmp_path, runs):
    from factories import tiny_tokenizer

    from hf_efficient.recipes import distill_drafter

    tokenizer = tiny_tokenizer()
    teacher = _saved_causal_lm(tmp_path / "target", tokenizer)
    student = _saved_causal_lm(tmp_path / "drafter", tokenizer, seed=1, num_hidden_layers=1)
    out = tmp_path / "distilled"
    distill_drafter.main(
        [
            *(f"--teacher={teacher}", f"--student={student}", f"--output-dir={out}", "--lora", "--load-in-4bit"),
            *("--num-prompts=8", "--max-steps=2", "--batch-size=4", "--completion-tokens=4", "--prompt-tokens=8"),
        ]
    )
    run = runs[0]
    assert (
        run["quantized"] == {"Linear4bit"} and run["lora"] and run["beside"] == {"Linear4bit"}
    )  # QLoRA, 4-bit teacher
    assert all("lora_" in n for n in run["trainable"]) and run["changed"] and run["changed"] <= run["trainable"]

    drafter = AutoModelForCausalLM.from_pretrained(out)  # merged into a full-precision copy: no LoRA, no 4-bit
    assert not ({type(m).__name__ for m in drafter.modules()} & QUANTIZED)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), out / "lora")
    input_ids = tokenizer("def read(path):\n    return open(path).read()", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = unmerged(input_ids).logits
        torch.testing.assert_close(drafter(input_ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(student)(input_ids).logits, expected)
