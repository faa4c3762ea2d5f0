import subprocess
import sys

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
