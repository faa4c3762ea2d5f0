import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from factories import ARCHITECTURES, tiny_causal_lm


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny models: one intra-op thread is several times faster than two on a shared 2-core machine
    (`make test` runs two pytest workers)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=ARCHITECTURES)
def tiny_lm(request):
    """One tiny random causal LM per architecture (fp32, untied)."""
    return tiny_causal_lm(request.param)
