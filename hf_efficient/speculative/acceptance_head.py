"""The SpecDec++ acceptance-prediction head: P(the drafter's top token is accepted) from its hidden state."""

from __future__ import annotations

import os

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["AcceptanceHead"]


class _ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + nn.functional.silu(self.linear(hidden))


class AcceptanceHead(nn.Module, PyTorchModelHubMixin, library_name="hf_efficient", tags=["speculative-decoding"]):
    """Predicts, from the drafter's last hidden state at a position, the probability that the drafter's top
    token there is accepted by the target (trained by `recipes/train_acceptance_head.py`).

    Paper: Huang, Guo and Wang, "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths",
    COLM 2025, arXiv:2405.19715 (§3, acceptance prediction head: residual blocks and a linear layer).

    Saved as one safetensors file (`save` / `load`) or as a Hub folder (`save_pretrained` / `from_pretrained` /
    `push_to_hub`, from huggingface_hub's `PyTorchModelHubMixin`).

    Args:
        hidden_size (`int`): the drafter's `hidden_size`.
        num_layers (`int`, *optional*, defaults to 3): residual blocks before the output layer.
    """

    def __init__(self, hidden_size: int, num_layers: int = 3) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.blocks = nn.Sequential(*[_ResBlock(hidden_size) for _ in range(num_layers)])
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` `(..., E)` -> acceptance logits `(...)`."""
        return self.out(self.blocks(hidden.to(self.out.weight.dtype))).squeeze(-1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the head to a safetensors file (sizes in the metadata)."""
        meta = {"hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcceptanceHead:
        """Read a head written by `save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata()
        head = cls(int(meta["hidden_size"]), int(meta["num_layers"]))
        head.load_state_dict(load_file(os.fspath(path)))
        return head.eval()
