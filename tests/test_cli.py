import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_efficient.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "nope"], "unknown benchmark 'nope'"),
        (["train", "nope"], "unknown recipe 'nope'"),
        (["generate", "/no/such/model", "hi"], "neither a local path nor a reference model"),
        (["reference", "nope"], "unknown reference model 'nope'"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_console_script_exit_status_and_help():
    ok = subprocess.run([sys.executable, "-m", "hf_efficient.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "bench" in ok.stdout and "generate" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hf_efficient.cli", "bench", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("hf-efficient: error:")


def test_info_lists_registered_types_and_benchmarks(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "benchmarks: " in out and "baseline" in out


# ----- generate --strategy / --cache, export, --debug -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny target with its tokenizer, and a one-layer drafter of the same vocabulary, saved to disk."""
    from factories import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli-models")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1, num_hidden_layers=1).save_pretrained(root / "drafter")
    return root


def _generate(capsys, folders, *options) -> tuple[str, str]:
    argv = ["generate", str(folders / "target"), "def parse(text):", "--max-new-tokens", "24", *options]
    assert main(argv) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    return out, err


def test_generate_with_a_strategy_prints_what_plain_greedy_prints(tiny_folders, capsys):
    plain, _ = _generate(capsys, tiny_folders)
    assert len(plain.strip()) > len("def parse(text):")
    for spec, name in (("recycling", "TokenRecycling"), ("recycling:6", "TokenRecycling"), ("draft:", "DraftModel")):
        spec = spec + str(tiny_folders / "drafter") if spec == "draft:" else spec
        out, err = _generate(capsys, tiny_folders, "--strategy", spec)
        assert out == plain, spec
        assert f"tokens per target forward ({name})" in err


@pytest.mark.parametrize("spec", ["kivi2", "gear4", "snapkv:64", "streaming:32", "h2o:32", "keyformer:32"])
def test_generate_with_a_compressed_cache(tiny_folders, capsys, spec):
    import hf_efficient.cache
    from hf_efficient.cli import CACHES

    _, err = _generate(capsys, tiny_folders, "--cache", spec)
    class_name = CACHES[spec.partition(":")[0]][0]
    assert "KV cache" in err and f"({class_name})" in err and hasattr(hf_efficient.cache, class_name)


def test_generate_with_a_strategy_and_a_croppable_cache(tiny_folders, capsys):
    _, err = _generate(capsys, tiny_folders, "--strategy", "recycling", "--cache", "snapkv:256")
    assert "(TokenRecycling)" in err and "(SnapKVCache)" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cache", "nope"], "unknown cache 'nope'; valid: gear2, gear4, gear8, kivi2, kivi4, kivi8, streaming[:N]"),
        (["--cache", "kivi3"], "unknown cache 'kivi3'"),
        (["--cache", "gear4:8"], "gear4 takes no :N"),
        (["--cache", "snapkv:lots"], "snapkv takes an integer N"),
        (["--cache", "snapkv:4"], "budget=4 must exceed window=32"),  # the cache's own validation, as one line
        (["--strategy", "nope"], "unknown strategy 'nope'; valid: recycling"),
        (["--strategy", "recycling:x"], "recycling:N takes a node count"),
        (["--strategy", "draft"], "--strategy draft needs a drafter"),
        (["--strategy", "draft:/no/such/drafter"], "neither a local path nor a reference model"),
        (["--strategy", "recycling", "--cache", "h2o:32"], "cannot roll back rejected draft tokens"),
    ],
)
def test_bad_generate_options_are_one_line_errors(tiny_folders, capsys, options, message):
    argv = ["generate", str(tiny_folders / "target"), "hi", "--max-new-tokens", "2", *options]
    assert main(argv) == 1
    err = capsys.readouterr().err  # (loading progress bars may precede the error)
    assert "Traceback" not in err and [line for line in err.splitlines() if "hf-efficient" in line] == [
        err.splitlines()[-1]
    ]
    assert err.splitlines()[-1].startswith("hf-efficient: error:") and message in err.splitlines()[-1]


def test_debug_shows_the_traceback_of_user_errors(capsys):
    for argv in (["--debug", "bench", "nope"], ["bench", "nope", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "UserError" in err and err.rstrip().endswith("(or 'all')")


@pytest.mark.parametrize(
    ("error", "user_caused"),
    [
        (ValueError("shapes (3, 4) and (5,) do not match"), False),  # deep inside a benchmark: a bug
        (ModuleNotFoundError("No module named 'hf_efficient.gone'", name="hf_efficient.gone"), False),
        (ModuleNotFoundError("No module named 'gguf'", name="gguf"), True),  # the environment
        (FileNotFoundError("reference model 'target' is not built; run `make reference`"), True),
    ],
)
def test_bugs_always_show_their_traceback(monkeypatch, capsys, error, user_caused):
    """Only errors the input or the environment cause are one line; a `ValueError` deep inside a benchmark is not."""
    from hf_efficient import bench

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(bench, "run", broken)
    assert main(["bench", bench.available()[0], "--quick"]) == 1
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]
    if user_caused:
        assert last == f"hf-efficient: error: {error}" and "Traceback" not in err
    else:
        assert "Traceback" in err and "in broken" in err
        assert last == f"hf-efficient: internal error: {type(error).__name__}: {error}"


def test_export_writes_a_model_repo_with_its_custom_generate_method(tiny_folders, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "repo"
    argv = ["export", str(tiny_folders / "target"), "--strategy", "recycling", "--output", str(out)]
    assert main([*argv, "--warmup", "def parse(text): return text.split()", "--repo-id", "me/tiny"]) == 0
    assert "custom_generate='me/tiny'" in capsys.readouterr().out
    config = json.loads((out / "custom_generate" / "config.json").read_text())
    assert config["strategy"] == "TokenRecycling" and config["forward_costs"]  # warm: timed once, here
    assert (out / "custom_generate" / "recycling.safetensors").is_file() and (out / "tokenizer.json").is_file()

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["def parse(text):"], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    got = model.generate(**inputs, max_new_tokens=16, custom_generate=str(out), trust_remote_code=True)
    assert torch.equal(got, expected)

    assert main(argv) == 1  # the folder is not empty now
    assert "--overwrite" in capsys.readouterr().err
    drafter = ["--strategy", f"draft:{tiny_folders / 'drafter'}", "--overwrite"]
    assert main([*argv[:2], *drafter, "--output", str(out)]) == 0
    assert (out / "custom_generate" / "drafter" / "config.json").is_file()
    assert not (out / "custom_generate" / "recycling.safetensors").exists()


def test_export_push_uploads_the_folder(tiny_folders, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw) or "https://hf.co/me/tiny/commit")
    argv = ["export", str(tiny_folders / "target"), "--strategy", "recycling:4", "--output", str(tmp_path / "r")]
    assert main([*argv, "--push"]) == 1
    assert "--push needs --repo-id" in capsys.readouterr().err
    assert main([*argv, "--push", "--repo-id", "me/tiny"]) == 0
    (call,) = calls
    assert call["repo_id"] == "me/tiny" and Path(call["folder_path"]) == tmp_path / "r"
