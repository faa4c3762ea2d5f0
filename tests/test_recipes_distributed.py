"""Every recipe under `accelerate launch` with two CPU processes (gloo DDP): both ranks end with identical weights,
and a second launch resumes from the checkpoint the first one left instead of starting over.

`accelerate launch --cpu` always starts one process (its simple launcher); two CPU processes come from the
multi-process launcher with `ACCELERATE_USE_CPU=true`, which `TrainingArguments` reads to pick gloo on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import tiny_causal_lm, tiny_tokenizer

RECIPES = Path(__file__).parent.parent / "recipes"
PROBE = Path(__file__).parent / "distributed_probe.py"
STEPS = 2  # optimizer steps of the first launch; the second launch asks for twice as many


def _args(recipe: str, tmp_path: Path, steps: int) -> list[str]:
    """A few-step configuration of `recipe` (tiny models, short sequences) writing to `tmp_path / "out"`."""
    out = ["--output-dir", str(tmp_path / "out")]
    if recipe == "train_reference":
        small = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "1", "--seq-len", "64"]
        return [*out, "--name", "drafter", *small, "--batch-size", "2", "--max-steps", str(steps), "--no-bf16"]
    if recipe == "train_byte_lm":
        return [*out, "--model", "hnet", "--seq-len", "64", "--batch-size", "2", "--max-steps", str(steps)]
    if recipe == "train_chunkllm":
        return [*out, "--seq-len", "64", "--batch-size", "2", "--max-steps", str(steps), "--max-documents", "8"]
    if recipe == "train_retrieval_lm":
        induction = ["--induction-max-steps", str(STEPS), "--induction-batch-size", "2", "--induction-seq-len", "48"]
        phase_two = ["--seq-len", "64", "--batch-size", "2", "--max-steps", str(steps), "--max-documents", "8"]
        return [*out, "--layers", "1", "--hidden-size", "32", *induction, *phase_two, "--quiet"]
    if recipe == "train_hypernet":
        tokenizer = tiny_tokenizer()
        base = tmp_path / "base"
        if not base.is_dir():
            tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(base)
            tokenizer.save_pretrained(base)
        hypernet = ["--identity-steps", "1", "--texts", "16", "--hidden-size", "32", "--vocab-min", "270"]
        return [
            *out,
            "--base",
            str(base),
            "--batch-size",
            "2",
            "--max-steps",
            str(steps),
            "--save-steps",
            "1",
            *hypernet,
            "--vocab-max",
            "320",
        ]
    if recipe == "distill_drafter":
        return [
            *out,
            "--batch-size",
            "2",
            "--num-prompts",
            "8",
            "--prompt-tokens",
            "16",
            "--completion-tokens",
            "8",
            "--max-steps",
            str(steps),
        ]
    if recipe == "train_acceptance_head":
        return [
            *out,
            "--num-prompts",
            "4",
            "--prompt-tokens",
            "16",
            "--response-tokens",
            "16",
            "--num-layers",
            "1",
            "--batch-size",
            "16",
            "--max-steps",
            str(steps),
        ]
    raise ValueError(recipe)


def _launch(recipe: str, tmp_path: Path, steps: int, probe_dir: Path) -> list[dict]:
    probe_dir.mkdir(parents=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    port = ["--main_process_port", str(29500 + os.getpid() % 1000)]
    command = [*launch, *port, str(PROBE), str(RECIPES / f"{recipe}.py")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HFE_PROBE_DIR": str(probe_dir)}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(command + _args(recipe, tmp_path, steps), capture_output=True, text=True, env=env)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))  # each rank's traceback
    assert proc.returncode == 0, (ranks or proc.stderr)[-6000:]
    return [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.py") if p.stem != "__init__"))
def test_recipe_under_two_processes_syncs_and_resumes(tmp_path, recipe):
    first = _launch(recipe, tmp_path, STEPS, tmp_path / "first")
    assert [r["world_size"] for r in first] == [2, 2]
    assert first[0]["global_step"] == STEPS and first[0]["training_steps"] >= STEPS
    assert first[0]["digest"] == first[1]["digest"], "the ranks' weights diverged: gradients were not all-reduced"
    second = _launch(recipe, tmp_path, 2 * STEPS, tmp_path / "second")
    assert second[0]["digest"] == second[1]["digest"]
    assert second[0]["global_step"] == 2 * STEPS
    # resumed from the first launch's checkpoint: only the new steps ran (a fresh start would run 2 * STEPS; the
    # retrieval recipe's first phase was already complete)
    assert second[0]["training_steps"] == STEPS, (first[0], second[0])
