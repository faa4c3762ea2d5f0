"""Every recipe under `accelerate launch` with two CPU processes (gloo DDP): both ranks end with identical weights,
a second launch resumes from the checkpoint the first one left instead of starting over, and a launch killed
mid-training is resumed by the next one. The accelerate configs in `recipes/configs/` parse as `accelerate launch`
reads them.

Two CPU processes come from `recipes/configs/cpu.yaml` (the multi-process launcher) with `ACCELERATE_USE_CPU=true`,
which makes each process join a gloo group on the CPU; `accelerate launch --cpu` would start one process only.
FSDP and DeepSpeed are tested up to what accelerate makes of their configs: accelerate enables FSDP only on GPU-type
process groups (on the CPU the FSDP config silently trains with DDP), and deepspeed is not a dependency.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import tiny_causal_lm, tiny_tokenizer

RECIPES = Path(__file__).parent.parent / "recipes"
CONFIGS = RECIPES / "configs"
PROBE = Path(__file__).parent / "distributed_probe.py"
STEPS = 2  # optimizer steps of the first launch; the second launch asks for twice as many
LAUNCH_TIMEOUT = 600  # seconds; a hung launch fails the test instead of the CI job
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm's lines, one per refresh


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


def _command(recipe: str, args: list[str], config: Path = CONFIGS / "cpu.yaml") -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return [*launch, str(PROBE), str(RECIPES / f"{recipe}.py"), *args]


def _environment(probe_dir: Path, **extra: str) -> dict[str, str]:
    """The launch's environment: gloo on the CPU, one thread per rank, offline; a rank that crashes (e.g. SIGABRT)
    dumps its Python stacks (faulthandler), which tells a crash in a collective from one at interpreter exit."""
    probe_dir.mkdir(parents=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(PYTHONFAULTHANDLER="1", HFE_PROBE_DIR=str(probe_dir), **extra)
    return env


def _failure_report(returncode: int, stderr: str, limit: int = 12_000) -> str:
    """The end of a failed launch's stderr, progress bars left out.

    It holds what explains a failure: each rank's traceback (`[rankN]:` lines once the process group exists, plain
    ones before), faulthandler's stacks of a rank that crashed, C++ `terminate called ...` / gloo lines, and
    torchrun's failure summary (which rank failed, with which exit code or signal).
    """
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    return f"launch exited with {returncode}; stderr (end):\n" + "\n".join(lines)[-limit:]


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a launch to its end; on timeout, SIGTERM the launcher (torchrun then stops its workers) and fail."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"timed out after {LAUNCH_TIMEOUT} s\n" + _failure_report(process.returncode, stderr))
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _records(probe_dir: Path) -> list[dict]:
    return [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _launch(recipe: str, args: list[str], probe_dir: Path) -> list[dict]:
    """Launch `recipe` in two CPU processes; returns each rank's probe record."""
    proc = _run(_command(recipe, args), _environment(probe_dir))
    assert proc.returncode == 0, _failure_report(proc.returncode, proc.stderr)
    records = _records(probe_dir)
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["distributed_type"] for r in records] == ["MULTI_CPU", "MULTI_CPU"]
    assert records[0]["digest"] == records[1]["digest"], "the ranks' weights diverged: gradients were not all-reduced"
    return records


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.py") if not p.stem.startswith("_")))
def test_recipe_under_two_processes_syncs_and_resumes(tmp_path, recipe):
    first = _launch(recipe, _args(recipe, tmp_path, STEPS), tmp_path / "first")
    assert first[0]["global_step"] == STEPS and first[0]["training_steps"] >= STEPS
    second = _launch(recipe, _args(recipe, tmp_path, 2 * STEPS), tmp_path / "second")
    assert second[0]["global_step"] == 2 * STEPS
    # resumed from the first launch's checkpoint: only the new steps ran (a fresh start would run 2 * STEPS; the
    # retrieval recipe's first phase was already complete)
    assert second[0]["training_steps"] == STEPS, (first[0], second[0])


def _wait_for_pause(process: subprocess.Popen, probe_dir: Path, stderr: Path, timeout: float = 300) -> list[int]:
    """Wait until both ranks paused after their checkpoint (see `distributed_probe.py`); returns their pids."""
    markers = [probe_dir / f"paused{rank}" for rank in (0, 1)]
    deadline = time.monotonic() + timeout
    while not all(marker.is_file() and marker.read_text() for marker in markers):
        if process.poll() is not None:
            pytest.fail(
                "the launch ended before its checkpoint\n" + _failure_report(process.returncode, stderr.read_text())
            )
        if time.monotonic() > deadline:
            process.terminate()
            process.wait(timeout=60)
            pytest.fail(f"no checkpoint after {timeout} s\n" + _failure_report(process.returncode, stderr.read_text()))
        time.sleep(0.2)
    return [int(marker.read_text()) for marker in markers]


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_launch_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    """SIGTERM (a preempted job) to a launch between its checkpoint at step 2 and the end at step 4; relaunched,
    it runs steps 3-4 only and ends with the weights of a launch that was never interrupted."""
    args = ["--model", "hnet", "--seq-len", "64", "--batch-size", "2", "--max-steps", "4", "--save-steps", "2"]
    out = ["--output-dir", str(tmp_path / "out")]
    with (tmp_path / "killed.err").open("w") as stderr:
        env = _environment(tmp_path / "killed", HFE_PROBE_PAUSE_AT="2")
        killed = subprocess.Popen(
            _command("train_byte_lm", [*out, *args]), env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,
        )  # fmt: skip
        try:
            workers = _wait_for_pause(killed, tmp_path / "killed", tmp_path / "killed.err")
        finally:
            if killed.poll() is None:  # the launcher; torchrun stops its workers (in sessions of their own) first
                os.killpg(killed.pid, signal.SIGTERM)
            returncode = killed.wait(timeout=120)
    assert returncode != 0
    deadline = time.monotonic() + 60
    while any(_is_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_is_alive(pid) for pid in workers), "torchrun left its workers running"
    assert (tmp_path / "out" / "checkpoint-2").is_dir() and not (tmp_path / "out" / "model.safetensors").exists()

    resumed = _launch("train_byte_lm", [*out, *args], tmp_path / "resumed")
    assert resumed[0]["global_step"] == 4 and resumed[0]["training_steps"] == 2, resumed[0]
    whole = _launch("train_byte_lm", ["--output-dir", str(tmp_path / "whole"), *args], tmp_path / "whole-probe")
    assert whole[0]["training_steps"] == 4
    assert resumed[0]["digest"] == whole[0]["digest"], "the resumed run did not continue the killed one exactly"


# ---- the accelerate configs, as `accelerate launch` reads them (no launch) ----


def _launch_arguments(config: Path):
    """`accelerate launch --config_file config` 's arguments after it merged the file (what its launchers see)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(config), "x"])
    )
    return args, defaults


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_parses_with_known_keys(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    loaded = load_config_from_file(str(CONFIGS / config))  # raises on unknown top-level keys
    options = set(vars(launch_command_parser().parse_args(["x"])))
    # nested keys are copied onto the launch arguments unchecked: a typo would be silently ignored
    nested = [f"fsdp_{key.removeprefix('fsdp_')}" for key in loaded.fsdp_config] + list(loaded.deepspeed_config)
    assert set(nested) <= options, sorted(set(nested) - options)
    args, _ = _launch_arguments(CONFIGS / config)
    assert args.num_processes == 2 and args.num_machines == 1


def test_cpu_and_ddp_configs_start_the_multi_process_launcher():
    for config in ("cpu.yaml", "ddp.yaml"):
        args, _ = _launch_arguments(CONFIGS / config)
        assert args.multi_gpu and not args.cpu, config  # `--cpu` would select the single-process launcher
    assert _launch_arguments(CONFIGS / "cpu.yaml")[0].main_process_port == 0  # a free port per launch


def test_fsdp_config_wraps_each_decoder_layer(monkeypatch):
    """The FSDP config gives FSDP2 with full-state-dict checkpoints, and its auto-wrap policy makes each decoder
    layer (`_no_split_modules`) of our models an FSDP unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from hf_efficient.models import HATConfig, HATForCausalLM, HNetConfig, HNetForCausalLM

    args, _ = _launch_arguments(CONFIGS / "fsdp.yaml")
    assert args.use_fsdp
    for name, value in prepare_multi_gpu_env(args).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as each process does
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    llama = tiny_causal_lm("llama")
    for model in (llama, HATForCausalLM(HATConfig()), HNetForCausalLM(HNetConfig())):
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [module for module in model.modules() if policy(module)]
        layers = [module for module in model.modules() if type(module).__name__ in model._no_split_modules]
        assert layers and wrapped == layers, type(model).__name__
        if model is llama:
            assert len(wrapped) == llama.config.num_hidden_layers


def test_deepspeed_config_is_zero_stage_2():
    args, defaults = _launch_arguments(CONFIGS / "deepspeed_zero2.yaml")
    assert args.use_deepspeed and defaults.deepspeed_config["zero_stage"] == 2
    assert args.offload_optimizer_device == "none" and args.offload_param_device == "none"
