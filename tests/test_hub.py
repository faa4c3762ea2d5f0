"""Hub integration: strategies on huggingface_hub's mixins, self-contained `custom_generate` folders that run where
`hf_efficient` cannot be imported, model cards packaged as real files, and push_to_hub (never really pushed)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from factories import tiny_causal_lm
from huggingface_hub import HfApi, ModelCard
from packaging.version import Version

from hf_efficient.hub import MODEL_CARDS_DIR, export_custom_generate, render_model_card
from hf_efficient.speculative import AcceptanceHead, DraftModel, SpeculativeDecoder, TokenRecycling, trim_drafter_vocab
from hf_efficient.speculative.cost_model import ForwardCostModel
from hf_efficient.speculative.export import load_strategy, save_strategy

REPO_ROOT = Path(__file__).resolve().parents[1]


def _prompts(batch: int = 1, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _drafter(**overrides):
    return tiny_causal_lm("llama", seed=1, num_hidden_layers=1, **overrides)


# ----- strategies on ModelHubMixin ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["recycling", "draft", "head", "trimmed"])
def test_strategy_save_pretrained_from_pretrained_round_trip(tmp_path, kind):
    target, inputs = tiny_causal_lm("llama"), _prompts()
    if kind == "recycling":
        strategy = TokenRecycling(topk=4, tree="auto", pair_buckets=97)
    elif kind == "draft":
        strategy = DraftModel(_drafter(), tree_size=8, max_depth=3)
    elif kind == "head":
        strategy = DraftModel(_drafter(), acceptance_head=AcceptanceHead(32, num_layers=1), stop_threshold=0.5)
    else:
        strategy = DraftModel(trim_drafter_vocab(_drafter(), torch.arange(96), 48), chain=True)
    target.generate(**inputs, max_new_tokens=12, custom_generate=strategy)  # learned state to keep
    strategy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["strategy"] == type(strategy).__name__ and (tmp_path / "README.md").is_file()

    loaded = SpeculativeDecoder.from_pretrained(tmp_path)  # the class config.json names
    assert type(loaded) is type(strategy)
    assert type(strategy).from_pretrained(tmp_path).__dict__.keys() == loaded.__dict__.keys()
    if kind == "recycling":
        assert (loaded.topk, loaded.tree, loaded.pair_buckets) == (4, "auto", 97)
        assert torch.equal(loaded.adjacency, strategy.adjacency.cpu()) and torch.equal(loaded.seen, strategy.seen)
        assert torch.equal(loaded.pair_keys, strategy.pair_keys.cpu())
        assert loaded.rank_acceptance == strategy.rank_acceptance
        assert loaded.forward_costs == strategy.forward_costs and loaded.forward_costs_device == "cpu"
    else:
        assert (loaded.tree_size, loaded.topk, loaded.max_depth, loaded.chain, loaded.stop_threshold) == (
            strategy.tree_size,
            strategy.topk,
            strategy.max_depth,
            strategy.chain,
            strategy.stop_threshold,
        )
        assert torch.equal(loaded.calibration_trials, strategy.calibration_trials)
        assert not torch.equal(loaded.calibration_trials, DraftModel(_drafter()).calibration_trials)  # learned
        for name, tensor in strategy.drafter.state_dict().items():
            assert torch.equal(loaded.drafter.state_dict()[name], tensor), name
        assert (loaded.acceptance_head is None) == (kind != "head")
        if kind == "head":
            assert torch.equal(loaded.acceptance_head.out.weight, strategy.acceptance_head.out.weight)
    # the reloaded strategy decodes exactly as the one that was saved (same state -> same drafts -> same output)
    expected = target.generate(**_prompts(seed=1), max_new_tokens=16, custom_generate=strategy)
    assert torch.equal(target.generate(**_prompts(seed=1), max_new_tokens=16, custom_generate=loaded), expected)
    assert loaded.stats.mean_accepted == strategy.stats.mean_accepted


def test_unrun_strategy_saves_settings_only_and_wrong_class_is_refused(tmp_path):
    TokenRecycling(topk=3, tree=[[0], [1], [0, 0]]).save_pretrained(tmp_path / "recycling")
    assert not (tmp_path / "recycling" / "recycling.safetensors").exists()
    loaded = TokenRecycling.from_pretrained(tmp_path / "recycling")
    assert loaded.adjacency is None and loaded.topk == 3 and loaded.tree == [[0], [1], [0, 0]]
    with pytest.raises(ValueError, match="holds a TokenRecycling strategy, not a DraftModel"):
        DraftModel.from_pretrained(tmp_path / "recycling")
    with pytest.raises(ValueError, match=r"no config\.json naming a strategy"):
        SpeculativeDecoder.from_pretrained(tmp_path)  # an empty folder


def test_save_strategy_and_load_strategy_are_thin_wrappers(tmp_path):
    strategy = TokenRecycling(tree=6)
    tiny_causal_lm("llama").generate(**_prompts(), max_new_tokens=6, custom_generate=strategy)
    assert save_strategy(strategy, tmp_path / "s") == tmp_path / "s"
    loaded = load_strategy(tmp_path / "s")
    assert isinstance(loaded, TokenRecycling) and torch.equal(loaded.adjacency, strategy.adjacency)


def test_auto_tree_timings_are_kept_on_the_same_device_and_looked_up_again_on_another(tmp_path):
    target, strategy = tiny_causal_lm("llama"), TokenRecycling()
    target.generate(**_prompts(), max_new_tokens=6, custom_generate=strategy)
    strategy.save_pretrained(tmp_path)
    kept = TokenRecycling.from_pretrained(tmp_path)
    target.generate(**_prompts(seed=1), max_new_tokens=6, custom_generate=kept)
    assert kept.forward_costs == strategy.forward_costs  # measured floats would differ: not re-timed
    elsewhere = TokenRecycling.from_pretrained(tmp_path)
    elsewhere.forward_costs_device = "cuda:another accelerator"
    target.generate(**_prompts(seed=1), max_new_tokens=6, custom_generate=elsewhere)
    # another device's timings are replaced by this machine's: measured once per machine, then read from disk
    assert elsewhere.forward_costs_device == "cpu"
    assert elsewhere.forward_costs == ForwardCostModel().forward_costs(target)


class _FakeHub:
    """Records what `push_to_hub` would create and upload (nothing leaves the machine)."""

    def __init__(self, monkeypatch):
        self.repos, self.uploads = [], []
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.uploads.append((repo_id, files))
        return f"https://huggingface.co/{repo_id}/commit/0"

    def create_commit(self, repo_id, operations, **kwargs):
        self.uploads.append((repo_id, sorted(op.path_in_repo for op in operations)))
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_strategy_push_to_hub_uploads_its_saved_folder(monkeypatch):
    hub = _FakeHub(monkeypatch)
    strategy = DraftModel(_drafter(), acceptance_head=AcceptanceHead(32, num_layers=1))
    tiny_causal_lm("llama").generate(**_prompts(), max_new_tokens=6, custom_generate=strategy)
    strategy.push_to_hub("me/draft-strategy")
    assert hub.repos == ["me/draft-strategy"]
    ((repo, files),) = hub.uploads
    assert repo == "me/draft-strategy"
    assert {"config.json", "README.md", "calibration.safetensors", "drafter/config.json"} <= set(files)
    assert {"acceptance_head/config.json", "acceptance_head/model.safetensors"} <= set(files)


def test_model_classes_have_push_to_hub(monkeypatch):
    """Our model families are `PreTrainedModel`s: transformers' `PushToHubMixin` uploads `save_pretrained`'s files."""
    import transformers.utils.hub
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import PushToHubMixin

    from hf_efficient import models
    from hf_efficient.models import HNetConfig, HNetForCausalLM

    for name in ("HNetForCausalLM", "HATForCausalLM", "ChunkLLMForCausalLM", "EmbeddingHypernetwork"):
        assert issubclass(getattr(models, name), PushToHubMixin), name

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README on the (fake) Hub")

    monkeypatch.setattr(transformers.utils.hub.ModelCard, "load", no_remote_card)
    hub = _FakeHub(monkeypatch)
    model = HNetForCausalLM(HNetConfig(hidden_size=[32, 48], intermediate_size=[0, 96], num_attention_heads=[2, 2]))
    model.push_to_hub("me/tiny-hnet")
    ((repo, files),) = hub.uploads
    assert repo == "me/tiny-hnet" and {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert any(f.startswith("modeling_") for f in files)  # remote code travels with the weights


# ----- self-contained custom_generate folders -------------------------------------------------------------------
_BLOCKED_RUN = r"""
import importlib.abc, json, os, sys


class BlockHfEfficient(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "hf_efficient":
            raise ModuleNotFoundError(f"{name} is blocked in this process", name=name)


sys.meta_path.insert(0, BlockHfEfficient())
try:
    import hf_efficient  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("hf_efficient is importable")

import torch
from transformers import AutoModelForCausalLM

def loaded(folder):  # the strategies the exported entry points hold for `folder`
    key = os.path.realpath(os.path.join(folder, "custom_generate"))
    entries = [m for n, m in list(sys.modules.items()) if n.endswith("custom_generate.generate")]
    return [entry._STRATEGIES[key][1] for entry in entries if key in entry._STRATEGIES]


report = {}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor(json.loads(open(f"{folder}/prompts.json").read()))
    plain = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)
    runs = [model.generate(input_ids=ids, max_new_tokens=20, custom_generate=folder, trust_remote_code=True)]
    (strategy,) = loaded(folder)
    seen = None if not hasattr(strategy, "seen") else int(strategy.seen.sum())
    runs.append(model.generate(input_ids=ids, max_new_tokens=20, custom_generate=folder, trust_remote_code=True))
    # loading the model with trust_remote_code replaces its generate with the folder's (the strategy is reused)
    replaced = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    runs.append(replaced.generate(input_ids=ids, max_new_tokens=20, do_sample=False))
    reused = len(loaded(folder)) == 1 and loaded(folder)[0] is strategy
    report[folder] = {
        "plain": plain.tolist(),
        "runs": [run.tolist() for run in runs],
        "reused": reused,
        "seen": [seen, None if seen is None else int(strategy.seen.sum())],
        "forward_costs": {str(k): v for k, v in getattr(strategy, "forward_costs", {}).items()},
    }
report["hf_efficient_modules"] = [m for m in sys.modules if m.partition(".")[0] == "hf_efficient"]
print(json.dumps(report))
"""


def _run_blocked(folders: list[Path], tmp_path: Path) -> dict:
    """Run the exported folders in a fresh interpreter where `import hf_efficient` fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, *map(str, folders)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_exported_folder_runs_without_hf_efficient_and_equals_plain_greedy(tmp_path):
    """TokenRecycling (tree="auto", warm) and DraftModel folders, each a model repo with its method: the child process
    cannot import hf_efficient, loads each strategy once, keeps it learning, does not re-time the tree."""
    target, inputs = tiny_causal_lm("llama"), _prompts(batch=2)
    strategies = {"recycling": TokenRecycling(), "draft": DraftModel(_drafter(), tree_size=8)}
    for name, strategy in strategies.items():
        target.generate(**_prompts(seed=3), max_new_tokens=8, custom_generate=strategy)  # warm state, timings
        target.save_pretrained(tmp_path / name)
        export_custom_generate(strategy, tmp_path / name)
        (tmp_path / name / "prompts.json").write_text(json.dumps(inputs["input_ids"].tolist()))
    expected = target.generate(**inputs, max_new_tokens=20, do_sample=False).tolist()

    report = _run_blocked([tmp_path / "recycling", tmp_path / "draft"], tmp_path)
    assert report.pop("hf_efficient_modules") == []
    for name in strategies:
        result = report[str(tmp_path / name)]
        assert result["plain"] == expected
        assert result["runs"] == [expected] * 3, name
        assert result["reused"], f"{name}: the strategy was loaded more than once"
    recycling = report[str(tmp_path / "recycling")]
    assert recycling["seen"][1] >= recycling["seen"][0] > 0  # the successor matrix kept learning
    stored = json.loads((tmp_path / "recycling" / "custom_generate" / "config.json").read_text())["forward_costs"]
    assert recycling["forward_costs"] == stored and stored  # timed once at export, not re-timed per call


def _imports(file: Path) -> list[tuple[int, str]]:
    """`(level, module)` of every import statement in `file` (relative ones have level > 0)."""
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


@pytest.mark.parametrize("kind", ["recycling", "trimmed"])
def test_exported_folder_contents(tmp_path, kind):
    target = tiny_causal_lm("llama")
    target.save_pretrained(tmp_path)
    if kind == "recycling":
        strategy = TokenRecycling(tree=6)
        target.generate(**_prompts(), max_new_tokens=6, custom_generate=strategy)
    else:
        strategy = DraftModel(trim_drafter_vocab(_drafter(), torch.arange(96), 48))
    folder = export_custom_generate(strategy, tmp_path, repo_id="me/tiny-speculative")
    modules = {p.stem for p in folder.glob("*.py")}
    assert {"generate", "engine", "tree", "kv", "compat", "hub_mixin"} <= modules
    assert {"token_recycling" if kind == "recycling" else "draft_model"} <= modules
    for file in folder.glob("*.py"):
        for level, module in _imports(file):
            assert module.partition(".")[0] != "hf_efficient", f"{file.name} imports {module}"
            if level:  # only `from .sibling import Name`
                assert level == 1 and (folder / f"{module}.py").is_file(), f"{file.name}: from {'.' * level}{module}"

    requirements = (folder / "requirements.txt").read_text().split()
    for package in ("torch", "transformers"):
        installed = Version(version(package))
        assert f"{package}>={installed.base_version},<{installed.major + 1}" in requirements
    assert not any(line.partition(">")[0] in ("hf_efficient", "hf-efficient") for line in requirements)

    card = ModelCard.load(folder / "README.md")
    assert "custom_generate" in card.data.tags and card.data.library_name == "transformers"
    for section in ("## Base model", "## Model compatibility", "## Additional arguments", "## Output type changes"):
        assert section in card.text
    assert 'repo = "me/tiny-speculative"' in card.text and "transformers>=" in card.text
    assert "custom_generate" in ModelCard.load(tmp_path / "README.md").data.tags  # the repository's own card

    reloaded = type(target).from_pretrained(tmp_path)
    inputs = _prompts(batch=2)
    out = reloaded.generate(**inputs, max_new_tokens=12, custom_generate=str(tmp_path), trust_remote_code=True)
    assert torch.equal(out, target.generate(**inputs, max_new_tokens=12))


def test_export_tags_an_existing_repository_card_and_replaces_a_stale_folder(tmp_path):
    render_model_card("hnet", model_id="me/hnet").save(tmp_path / "README.md")
    (tmp_path / "custom_generate").mkdir()
    (tmp_path / "custom_generate" / "stale.py").write_text("raise ImportError('stale')\n")
    export_custom_generate(TokenRecycling(tree=4), tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert {"hnet", "custom_generate"} <= set(card.data.tags) and "H-Net" in card.text  # tagged, text kept
    assert not (tmp_path / "custom_generate" / "stale.py").exists()


def test_a_folder_exported_anew_is_reloaded_in_a_running_process(tmp_path):
    target, inputs = tiny_causal_lm("llama"), _prompts()
    target.save_pretrained(tmp_path)
    held = []
    for tree in (4, 6):
        export_custom_generate(TokenRecycling(tree=tree), tmp_path)
        for _ in range(2):
            target.generate(**inputs, max_new_tokens=8, custom_generate=str(tmp_path), trust_remote_code=True)
            key = os.path.realpath(tmp_path / "custom_generate")
            entries = [m for n, m in sys.modules.items() if n.endswith("custom_generate.generate")]
            held.append(next(e._STRATEGIES[key][1] for e in entries if key in e._STRATEGIES))
    assert held[0] is held[1] and held[2] is held[3] and held[1] is not held[2]  # kept, until re-exported
    assert (held[1].tree, held[2].tree) == (4, 6)


# ----- model cards are package files ----------------------------------------------------------------------------
def test_model_card_templates_are_real_package_files():
    assert MODEL_CARDS_DIR.is_dir() and not MODEL_CARDS_DIR.is_symlink()
    assert MODEL_CARDS_DIR.parent == Path(__import__("hf_efficient").__file__).parent
    families = sorted(p.stem for p in MODEL_CARDS_DIR.glob("*.md"))
    assert {"hnet", "hat", "chunkllm", "hypernet", "custom_generate"} <= set(families)
    for family in families:
        assert not (MODEL_CARDS_DIR / f"{family}.md").is_symlink()
    assert not (REPO_ROOT / "model_cards").exists()  # one copy, inside the package


def test_built_wheel_carries_model_cards_and_recipes(tmp_path):
    """Build a wheel from a copy of the sources (about 1 s) and look inside."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "hf_efficient", source / "hf_efficient", symlinks=True, ignore=ignore)
    shutil.copytree(REPO_ROOT / "recipes", source / "recipes", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    build = "from setuptools import build_meta; print(build_meta.build_wheel(r'%s'))" % (tmp_path / "dist")
    proc = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = zipfile.ZipFile(tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]).namelist()
    for family in ("hnet", "hat", "chunkllm", "hypernet", "custom_generate"):
        assert f"hf_efficient/model_cards/{family}.md" in names
    recipes = {Path(n).name for n in names if n.startswith("hf_efficient/recipes/")}
    assert {p.name for p in (REPO_ROOT / "recipes").glob("*.py")} <= recipes  # through the hf_efficient/recipes link
    kernels = (REPO_ROOT / "hf_efficient").glob("kernels/sources/*/build.toml")
    data = [*kernels, *(REPO_ROOT / "recipes").glob("configs/*")]
    for file in data:  # hub-kernel layouts and accelerate configs
        relative = file.relative_to(REPO_ROOT)
        relative = relative if relative.parts[0] == "hf_efficient" else Path("hf_efficient") / relative
        assert relative.as_posix() in names
