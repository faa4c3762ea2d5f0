import subprocess
import sys
from importlib.metadata import version

import hf_efficient


def test_version_matches_distribution():
    assert hf_efficient.__version__ == version("hf-efficient")


def test_import_is_lazy():
    code = (
        "import sys, hf_efficient\n"
        "heavy = ['hf_efficient.speculative', 'hf_efficient.cache', 'hf_efficient.bench', 'hf_efficient.tokenization',"
        " 'hf_efficient.reference', 'matplotlib', 'trl', 'peft']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_submodule_access_and_unknown_attribute():
    assert hf_efficient.bench.available()[0]
    try:
        hf_efficient.does_not_exist  # noqa: B018
    except AttributeError as error:
        assert "does_not_exist" in str(error)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_auto_registration_is_idempotent():
    from hf_efficient.models import register_auto_classes

    assert register_auto_classes() == register_auto_classes()


def test_everything_advertised_imports():
    """Each name in `__all__` (the package's and every public subpackage's) resolves: no advertised ghosts."""
    import importlib

    import hf_efficient

    for name in hf_efficient.__all__:
        module = getattr(hf_efficient, name)
        for public in getattr(module, "__all__", []):
            assert getattr(module, public) is not None, f"hf_efficient.{name}.{public}"
    for package in ("models", "speculative", "cache", "prefill", "tokenization"):
        module = importlib.import_module(f"hf_efficient.{package}")
        assert all(hasattr(module, public) for public in module.__all__), package
