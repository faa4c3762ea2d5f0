"""Run a frozen model on batch-merged tokens whose embeddings come from an embedding hypernetwork.

Paper: Retrofitting (Large) Language Models with Dynamic Tokenization (Feher, Vulić, Minixhofer, ACL 2025,
arXiv:2411.18553), §3.2 (encoders) and §3.3 (decoder prefill).

Base tokens keep their own embedding rows; each new token of the batch gets a hypernetwork row, and the
model reads `inputs_embeds` gathered from the extended table `concat(E_in, E_new)`. Decoders prefill the
merged prompt, then `generate` continues in the base vocabulary (the head is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .dynamic_bpe import DynamicBatch, DynamicBPE
from .vocabulary import special_affixes

__all__ = ["RetrofitInputs", "RetrofitOutput", "RetrofittedModel", "mean_pool"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean over unmasked positions.

    Args:
        hidden (`torch.Tensor` of shape `(B, L, E)`): token states.
        mask (`torch.Tensor` of shape `(B, L)`): attention mask.
        normalize (`bool`, *optional*, defaults to `False`): L2-normalise the result.
    """
    weights = mask[..., None].to(hidden.dtype)  # (B, L, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, E)
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


@dataclass
class RetrofitInputs:
    """Model inputs of a merged batch.

    Attributes:
        inputs_embeds (`torch.FloatTensor` of shape `(B, L, E)`): embeddings, special tokens included.
        attention_mask (`torch.LongTensor` of shape `(B, L)`): 1 on tokens, 0 on padding.
        position_ids (`torch.LongTensor` of shape `(B, L)`): contiguous positions that skip padding.
        batch (`DynamicBatch`): the merged tokenization.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    batch: DynamicBatch


@dataclass
class RetrofitOutput(ModelOutput):
    """Output of `RetrofittedModel.forward`: the base model's main outputs plus the merged batch's mask.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, L, E)`, *optional*): encoder hidden states.
        logits (`torch.FloatTensor` of shape `(B, L, V)`, *optional*): LM logits over the base vocabulary.
        attention_mask (`torch.LongTensor` of shape `(B, L)`): mask of the merged sequences (for pooling).
        sequence_reduction (`float`): fraction of tokens the merges removed.
    """

    last_hidden_state: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    sequence_reduction: float | None = None


class RetrofittedModel(nn.Module):
    """A frozen encoder or decoder that reads dynamically merged tokens.

    Paper: Retrofitting (Large) Language Models with Dynamic Tokenization (arXiv:2411.18553).

    Args:
        model (`PreTrainedModel`): the base model (e.g. a `BertModel` or a `LlamaForCausalLM`).
        hypernetwork (`EmbeddingHypernetwork`): predicts embeddings of merged tokens for `model`.
        tokenizer (`PreTrainedTokenizerBase`): the base tokenizer (special tokens are added as it does).
        dynamic (`DynamicBPE`, *optional*): the merge policy; defaults to `DynamicBPE(tokenizer)` (merge up to
            pre-tokens).

    Example:

    ```python
    retro = RetrofittedModel(encoder, hypernet, tokenizer, dynamic=DynamicBPE(tokenizer, target_reduction=0.2))
    out = retro(["a sentence", "another one"])  # out.last_hidden_state, out.attention_mask, out.sequence_reduction
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        hypernetwork: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        dynamic: DynamicBPE | None = None,
    ) -> None:
        super().__init__()
        vocab = model.get_input_embeddings().weight.shape[0]
        if hypernetwork.config.source_vocab_size != vocab:
            raise ValueError(
                f"hypernetwork.config.source_vocab_size={hypernetwork.config.source_vocab_size} does not match the "
                f"model's {vocab} embeddings: train or load the hypernetwork for this base model"
            )
        table = model.get_input_embeddings().weight.detach()  # (V, E)
        source = hypernetwork.source_embeddings[:, : table.shape[1]].to(table)  # (V, E)
        if not torch.allclose(source, table, atol=1e-4, rtol=1e-3):
            raise ValueError(
                "the hypernetwork holds other embeddings than the model's (trained for another base, or the base "
                "changed): call hypernetwork.set_source_embeddings(...) and retrain, or load the matching one"
            )
        self.model, self.hypernetwork, self.tokenizer = model, hypernetwork, tokenizer
        self.dynamic = dynamic if dynamic is not None else DynamicBPE(tokenizer)
        self.is_decoder = bool(model.can_generate())
        self.prefix, self.suffix = special_affixes(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def embed_inputs(self, texts: list[str]) -> RetrofitInputs:
        """Merge `texts` as a batch and gather their embeddings (left padding for decoders, right for encoders)."""
        batch = self.dynamic(texts)
        side = "left" if self.is_decoder else "right"
        ids, mask = batch.to_tensors(self.pad_token_id, self.prefix, self.suffix, padding_side=side)  # (B, L)
        table = self.model.get_input_embeddings().weight  # (V, E)
        if batch.decompositions:
            new = self.hypernetwork.embed(batch.decompositions).input_embeddings.to(table)  # (n, E)
            table = torch.cat([table, new])  # (V + n, E)
        ids, mask = ids.to(table.device), mask.to(table.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L)
        return RetrofitInputs(nn.functional.embedding(ids, table), mask, positions, batch)

    def forward(self, texts: list[str], **kwargs) -> RetrofitOutput:
        """Run the base model on the merged batch; `kwargs` go to the model's `forward`."""
        inputs = self.embed_inputs(texts)
        if self.is_decoder:
            kwargs.setdefault("position_ids", inputs.position_ids)
        out = self.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **kwargs)
        return RetrofitOutput(
            last_hidden_state=getattr(out, "last_hidden_state", None),
            logits=getattr(out, "logits", None),
            attention_mask=inputs.attention_mask,
            sequence_reduction=inputs.batch.reduction,
        )

    @torch.no_grad()
    def generate(self, texts: list[str], **generate_kwargs) -> torch.LongTensor:
        """Prefill the merged prompts, then continue in the base vocabulary; returns new ids `(B, N)`."""
        if not self.is_decoder:
            raise ValueError(f"{type(self.model).__name__} cannot generate: use forward() for encoders")
        inputs = self.embed_inputs(texts)
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        return self.model.generate(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **generate_kwargs
        )

    @torch.no_grad()
    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> torch.Tensor:
        """`log P(continuation | merged prompt)` in nats per row `(B,)`; continuations use base tokens.

        This is how a merged prefill is scored: the prompt is read with merged tokens, the continuation is
        predicted token by token over the base vocabulary.
        """
        if not self.is_decoder:
            raise ValueError(f"{type(self.model).__name__} is not a causal LM")
        inputs = self.embed_inputs(prompts)
        table = self.model.get_input_embeddings().weight  # (V, E)
        rows, targets = [], []
        for i, text in enumerate(continuations):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt = inputs.inputs_embeds[i, inputs.attention_mask[i].bool()]  # (P, E)
            rows.append(torch.cat([prompt, table[torch.tensor(ids, device=table.device)]]))  # (P + C, E)
            targets.append((prompt.shape[0], ids))
        length = max(r.shape[0] for r in rows)
        embeds = table.new_zeros((len(rows), length, table.shape[1]))  # (B, L, E), left padded
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=table.device)  # (B, L)
        for i, r in enumerate(rows):
            embeds[i, length - r.shape[0] :] = r
            mask[i, length - r.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logp = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits.log_softmax(-1)
        out = []
        for i, (prompt_len, ids) in enumerate(targets):
            start = length - len(rows[i]) + prompt_len  # first continuation position
            predicted = logp[i, start - 1 : start - 1 + len(ids)]  # (C, V)
            out.append(predicted.gather(1, torch.tensor(ids, device=logp.device)[:, None]).sum())
        return torch.stack(out)
