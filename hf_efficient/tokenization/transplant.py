"""Training-free tokenizer transplant: embeddings of a model for a new vocabulary, saved as a plain HF model.

Paper: Training-Free Tokenizer Transplantation via Orthogonal Matching Pursuit (Goddard & Fernandes Neto,
arXiv:2506.06607); FVT: Fast Vocabulary Transfer for Language Model Compression (Gee et al., EMNLP 2022).

Tokens both vocabularies share (same token string, special tokens by role) are copied. Every other new token
gets either the mean of the embeddings of its decomposition into old tokens (`"fvt"`), or a sparse
combination of shared *anchor* tokens found by orthogonal matching pursuit (`"omp"`) in a space where new
and anchor tokens can both be represented: the donor model's embeddings when a donor (a model that already
uses the new tokenizer) is given, otherwise the base model's own last hidden state after reading the
token's decomposition. The same coefficients build the input and, for untied models, the output rows.
OMP runs batched over all new tokens at once (one least-squares solve per step for the whole batch).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .vocabulary import decompose

__all__ = ["METHODS", "batched_omp", "transplant_tokenizer"]

METHODS = ("omp", "fvt", "random")
_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def batched_omp(
    targets: torch.Tensor, atoms: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for many targets at once.

    Args:
        targets (`torch.Tensor` of shape `(B, D)`): vectors to approximate.
        atoms (`torch.Tensor` of shape `(N, D)`): dictionary.
        k (`int`): atoms per target (at most `N`).
        chunk_size (`int`, *optional*, defaults to 1024): targets per block (bounds the `(B, N)` scores).

    Returns:
        `(indices, coefficients)`, both `(B, k)`: `targets ≈ (coefficients[..., None] * atoms[indices]).sum(1)`.
    """
    k = min(k, atoms.shape[0])
    unit = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N, D)
    all_idx, all_coef = [], []
    for block in targets.split(chunk_size):
        residual = block.clone()  # (b, D)
        idx = torch.empty((block.shape[0], 0), dtype=torch.long, device=block.device)
        coef = torch.empty((block.shape[0], 0), dtype=block.dtype, device=block.device)
        for _ in range(k):
            scores = (residual @ unit.T).abs()  # (b, N)
            scores.scatter_(1, idx, -1.0)  # never pick an atom twice
            idx = torch.cat([idx, scores.argmax(dim=1, keepdim=True)], dim=1)  # (b, s)
            chosen = atoms[idx]  # (b, s, D)
            coef = torch.linalg.lstsq(chosen.transpose(1, 2), block.unsqueeze(-1)).solution.squeeze(-1)  # (b, s)
            residual = block - torch.einsum("bs,bsd->bd", coef, chosen)
        all_idx.append(idx)
        all_coef.append(coef)
    return torch.cat(all_idx), torch.cat(all_coef)


def _shared(old: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase) -> dict[int, int]:
    """New id -> old id for tokens both vocabularies have (special tokens matched by role)."""
    old_vocab = old.get_vocab()
    out = {new_id: old_vocab[token] for token, new_id in new.get_vocab().items() if token in old_vocab}
    for role in _ROLES:
        old_id, new_id = getattr(old, f"{role}_id", None), getattr(new, f"{role}_id", None)
        if old_id is not None and new_id is not None:
            out[int(new_id)] = int(old_id)
    return out


def _mean_rows(table: torch.Tensor, pieces: list[list[int]]) -> torch.Tensor:
    """Mean of `table` rows per decomposition (one `embedding_bag` call); `(n, E)`."""
    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long, device=table.device)
    offsets = torch.tensor([0, *[len(p) for p in pieces[:-1]]], device=table.device).cumsum(0)
    return nn.functional.embedding_bag(flat, table, offsets, mode="mean")


@torch.no_grad()
def _hidden_features(
    model: PreTrainedModel, pieces: list[list[int]], prefix: list[int], batch_size: int = 256
) -> torch.Tensor:
    """Last hidden state of `model` after reading `prefix` then each decomposition; `(n, E)`.

    The prefix keeps every decomposition off position 0: a model's first position is its attention sink, whose
    hidden state barely depends on the token (massive activations), so single-token anchors read there would be
    near-collinear atoms and OMP's least squares would return huge coefficients.
    """
    features = []
    pieces = [prefix + p for p in pieces]
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start : start + batch_size]
        length = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), length), dtype=torch.long)  # (b, L), left padded
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, length - len(p) :] = torch.tensor(p)
            mask[row, length - len(p) :] = 1
        base = getattr(model, model.base_model_prefix, model)
        out = base(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        features.append(out.last_hidden_state[:, -1].float())  # (b, E)
    return torch.cat(features)


def transplant_tokenizer(
    model: PreTrainedModel,
    old_tokenizer: PreTrainedTokenizerBase,
    new_tokenizer: PreTrainedTokenizerBase,
    method: str = "omp",
    donor: PreTrainedModel | None = None,
    k: int = 8,
    seed: int = 0,
) -> PreTrainedModel:
    """A copy of `model` with embeddings (and untied output embeddings) for `new_tokenizer`'s vocabulary.

    The result is a regular model of the same class: `save_pretrained` it with `new_tokenizer` and load it with
    `AutoModelForCausalLM.from_pretrained(path)`; no remote code is involved.

    Args:
        model (`PreTrainedModel`): the base model (causal LM or encoder); left unchanged.
        old_tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        new_tokenizer (`PreTrainedTokenizerBase`): the tokenizer to move to, in the same token alphabet
            (byte-level to byte-level, WordPiece to WordPiece) so that new tokens decompose into old ones.
        method (`str`, *optional*, defaults to `"omp"`): `"omp"`, `"fvt"` or `"random"` (a baseline: copied
            shared tokens, others drawn from a normal with the old embeddings' mean and std).
        donor (`PreTrainedModel`, *optional*): a model already using `new_tokenizer`; OMP then fits its codes in
            the donor's embedding space, as mergekit-tokensurgeon does.
        k (`int`, *optional*, defaults to 8): anchors per new token for OMP.
        seed (`int`, *optional*, defaults to 0): seed of the `"random"` baseline.

    Example:

    ```python
    new_model = transplant_tokenizer(model, tokenizer, new_tokenizer, method="omp")
    new_model.save_pretrained("out"); new_tokenizer.save_pretrained("out")
    AutoModelForCausalLM.from_pretrained("out")
    ```
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 anchors per token")
    if donor is not None and donor.get_input_embeddings().weight.shape[0] < len(new_tokenizer):
        raise ValueError(
            f"donor has {donor.get_input_embeddings().weight.shape[0]} embeddings but new_tokenizer has "
            f"{len(new_tokenizer)} ids: the donor must use new_tokenizer"
        )
    shared = _shared(old_tokenizer, new_tokenizer)
    new_tokens = new_tokenizer.convert_ids_to_tokens(list(range(len(new_tokenizer))))
    missing = [i for i in range(len(new_tokenizer)) if i not in shared]
    pieces = decompose(old_tokenizer, [new_tokens[i] for i in missing])
    unk = old_tokenizer.unk_token_id
    pieces = [p if p and (unk is None or unk not in p) else [] for p in pieces]

    in_table = model.get_input_embeddings().weight.detach().float()  # (V_old, E)
    out_module = model.get_output_embeddings()
    tied = out_module is None or out_module.weight is model.get_input_embeddings().weight
    tables = [in_table] if tied else [in_table, out_module.weight.detach().float()]
    news = [torch.empty((len(new_tokenizer), t.shape[1])) for t in tables]  # (V_new, E) each

    shared_new = torch.tensor(sorted(shared), dtype=torch.long)
    shared_old = torch.tensor([shared[i] for i in sorted(shared)], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for table, new in zip(tables, news):
        new[shared_new] = table[shared_old]
        noise = torch.randn((len(missing), table.shape[1]), generator=generator)
        new[missing] = table.mean(0) + noise * table.std(0)  # fallback rows (and the "random" baseline)

    solvable = [row for row, p in enumerate(pieces) if p]
    targets = torch.tensor([missing[row] for row in solvable], dtype=torch.long)
    if method != "random" and solvable:
        if method == "fvt":
            for table, new in zip(tables, news):
                new[targets] = _mean_rows(table, [pieces[row] for row in solvable])
        else:
            if donor is not None:
                space = donor.get_input_embeddings().weight.detach().float()  # (V_new, D_donor)
                target_features, anchor_features = space[targets], space[shared_new]
            else:
                sink = (
                    old_tokenizer.bos_token_id
                    if old_tokenizer.bos_token_id is not None
                    else old_tokenizer.eos_token_id
                )
                prefix = [] if sink is None else [sink]
                reads = [pieces[row] for row in solvable] + [[i] for i in shared_old.tolist()]
                features = _hidden_features(model, reads, prefix)
                target_features, anchor_features = features[: len(solvable)], features[len(solvable) :]
            idx, coef = batched_omp(target_features, anchor_features, k)  # (n, k) each
            for table, new in zip(tables, news):
                anchors = table[shared_old]  # (N, E)
                new[targets] = torch.einsum("nk,nke->ne", coef, anchors[idx])

    result = copy.deepcopy(model)
    result.resize_token_embeddings(len(new_tokenizer), mean_resizing=False)
    dtype = result.get_input_embeddings().weight.dtype
    result.get_input_embeddings().weight.data = news[0].to(dtype)
    if not tied:
        result.get_output_embeddings().weight.data = news[1].to(dtype)
    _retarget_config(result, new_tokenizer)
    return result


def _retarget_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Vocabulary size and special-token ids of `model`'s config and generation config follow `tokenizer`."""
    config = model.config.get_text_config()
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if hasattr(config, name) or value is not None:
            setattr(config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)
