"""A smaller causal LM with the target's tokenizer drafts a dynamic tree (or a chain) with adaptive depth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedModel

from ..compat import DynamicCache, cache_kwarg
from .acceptance_head import AcceptanceHead
from .engine import DecodingState, SpeculativeDecoder
from .kv import KVLayout, full_history_cache, tree_attention_mask
from .tree import DraftTree
from .vocab_trim import load_drafter

__all__ = ["DraftModel"]

_BINS = 10  # draft-confidence bins of the online acceptance calibration
_PRIOR_WEIGHT = 4.0  # pseudo-observations per bin, at acceptance = the bin's confidence


class DraftModel(SpeculativeDecoder):
    """Draft with a small model of the same vocabulary: an EAGLE-2-style dynamic tree or a chain, with
    SpecDec++ adaptive depth, verified losslessly by the shared engine.

    Tree mode expands, depth by depth, the `topk` frontier nodes of highest cumulative draft log-probability
    into their `topk` best children, then keeps the `tree_size` most probable nodes (ancestor-closed) for
    verification. Chain mode (`chain=True`) drafts the drafter's argmax, or under `do_sample=True` a token
    sampled from the drafter at the call's temperature, verified by Leviathan et al.'s rejection sampling.
    Drafting stops early once the predicted probability that the best path holds a rejection exceeds
    `stop_threshold`: the acceptance probability of each draft token comes from `acceptance_head` when given
    (SpecDec++), else from the drafter's own confidence, calibrated online against the acceptances this object
    has observed (confidence bins; persists across calls, `.reset()` forgets it — an under-confident but right
    drafter then drafts deep, an over-confident one stops early). The drafter keeps its own KV cache; a
    drafter whose LM head was cut by `trim_drafter_vocab` is mapped back to target ids here. `save_pretrained` /
    `from_pretrained` / `push_to_hub` keep the drafter (`drafter/`), the acceptance head and the calibration.

    Paper: Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", arXiv:2211.17192;
    Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", arXiv:2406.16858;
    Huang et al., "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths", arXiv:2405.19715.

    Args:
        drafter (`PreTrainedModel`): causal LM sharing the target's tokenizer (same input vocabulary).
        tree_size (`int`, *optional*, defaults to 16): draft nodes verified per step, root included.
        topk (`int`, *optional*, defaults to 4): frontier width and children per expanded node.
        max_depth (`int`, *optional*, defaults to 6): deepest draft level.
        chain (`bool`, *optional*, defaults to `False`): draft a single chain instead of a tree.
        stop_threshold (`float`, *optional*, defaults to 0.7): stop drafting when P(some rejection on the best
            path) exceeds it; `None` always drafts `max_depth` levels.
        acceptance_head (`AcceptanceHead`, *optional*): SpecDec++ head on the drafter's last hidden state.

    Example:

    ```python
    from hf_efficient.speculative import DraftModel

    out = target.generate(**inputs, custom_generate=DraftModel(drafter), max_new_tokens=64)
    ```
    """

    def __init__(
        self,
        drafter: PreTrainedModel,
        *,
        tree_size: int = 16,
        topk: int = 4,
        max_depth: int = 6,
        chain: bool = False,
        stop_threshold: float | None = 0.7,
        acceptance_head: AcceptanceHead | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("tree_size", tree_size), ("topk", topk), ("max_depth", max_depth)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if stop_threshold is not None and not 0.0 < stop_threshold < 1.0:
            raise ValueError(f"stop_threshold={stop_threshold} must be in (0, 1), or None to disable adaptive depth")
        self.drafter = drafter.eval()
        self.tree_size, self.topk, self.max_depth = tree_size, (1 if chain else topk), max_depth
        self.chain, self.stop_threshold, self.acceptance_head = chain, stop_threshold, acceptance_head
        self.reset()
        ids = getattr(drafter.config, "draft_vocab_ids", None)
        self.vocab_ids = None if ids is None else torch.tensor(ids, dtype=torch.long)  # (V_d,) drafter -> target

    def validate(self, model: PreTrainedModel, generation_config: GenerationConfig) -> None:
        super().validate(model, generation_config)
        target_vocab = model.get_input_embeddings().num_embeddings
        drafter_vocab = self.drafter.get_input_embeddings().num_embeddings
        head_rows = self.drafter.get_output_embeddings().weight.shape[0]
        if drafter_vocab != target_vocab or (self.vocab_ids is None and head_rows != target_vocab):
            raise ValueError(
                f"the drafter's vocabulary ({drafter_vocab} ids, LM head {head_rows}) differs from the target's "
                f"({target_vocab}); DraftModel needs the target's tokenizer. For a drafter with another tokenizer "
                "use HF universal assisted generation: generate(assistant_model=drafter, tokenizer=..., "
                "assistant_tokenizer=...)."
            )
        if self.drafter.device != model.device:
            raise ValueError(f"the drafter is on {self.drafter.device}, the target on {model.device}; move it there.")
        attn = getattr(self.drafter.config, "_attn_implementation", None) or "eager"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"drafter attn_implementation={attn!r} cannot express tree masks; load it with 'sdpa'.")

    def reset(self) -> None:
        """Forget the confidence calibration (prior: acceptance = draft confidence)."""
        centers = ((torch.arange(_BINS) + 0.5) / _BINS).repeat(self.topk, 1)  # (k, bins), per sibling rank
        self.calibration_hits, self.calibration_trials = (
            centers * _PRIOR_WEIGHT,
            torch.full_like(centers, _PRIOR_WEIGHT),
        )

    def calibrated(self, confidence: torch.Tensor) -> torch.Tensor:
        """Observed acceptance rate of draft children `(..., k)` by sibling rank and confidence (same shape)."""
        rate = (self.calibration_hits / self.calibration_trials).to(confidence.device)  # (k, bins)
        rank = torch.arange(confidence.shape[-1], device=confidence.device).expand_as(confidence)
        return rate[rank, (confidence * _BINS).long().clamp(0, _BINS - 1)]

    def _save_state(self, folder: Path) -> dict[str, Any]:
        self.drafter.save_pretrained(folder / "drafter")
        calibration = {"hits": self.calibration_hits.contiguous(), "trials": self.calibration_trials.contiguous()}
        save_file(calibration, os.fspath(folder / "calibration.safetensors"))
        if self.acceptance_head is not None:
            self.acceptance_head.save_pretrained(folder / "acceptance_head")
        return {
            "tree_size": self.tree_size,
            "topk": self.topk,
            "max_depth": self.max_depth,
            "chain": self.chain,
            "stop_threshold": self.stop_threshold,
        }

    @classmethod
    def _load_state(cls, folder: Path, config: dict[str, Any], device=None, **init_kwargs) -> DraftModel:
        """The drafter (trimmed or not, `load_drafter`) and the acceptance head go to `device` when given."""
        drafter = load_drafter(folder / "drafter")
        drafter = drafter if device is None else drafter.to(device)
        head = None
        if (folder / "acceptance_head").is_dir():
            head = AcceptanceHead.from_pretrained(folder / "acceptance_head").to(drafter.device)
        strategy = cls(drafter, acceptance_head=head, **init_kwargs)
        if (folder / "calibration.safetensors").is_file():
            calibration = load_file(os.fspath(folder / "calibration.safetensors"))
            strategy.calibration_hits, strategy.calibration_trials = calibration["hits"], calibration["trials"]
        return strategy

    # ----- engine hooks ---------------------------------------------------------------------------------
    def start(self, model: PreTrainedModel, state: DecodingState) -> None:
        """Prefill the drafter's own cache with the prompt (the first new token is drafted from next)."""
        L = state.layout.length
        self._cache = full_history_cache(DynamicCache(config=self.drafter.config))  # windows go in the masks
        self._layout = KVLayout(state.layout.valid[:, :L], state.layout.positions[:, :L])
        mask = None if bool(self._layout.valid.all()) else self._layout.valid.long()
        self.drafter(
            input_ids=state.sequences[:, :L],
            attention_mask=mask,
            position_ids=self._layout.positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwarg(self._cache),
        )
        self._fed = torch.full_like(state.lengths, L)  # (B,) tokens of each row already in the drafter cache
        if self.vocab_ids is not None:
            self.vocab_ids = self.vocab_ids.to(state.sequences.device)

    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        B, device = state.sequences.shape[0], state.sequences.device
        rows = torch.arange(B, device=device)
        # 1. feed the committed tokens the drafter has not seen (ragged: holes past each row's count)
        pending = (state.lengths - self._fed).clamp(min=0)  # (B,)
        C = max(int(pending.max()), 1)
        cols = torch.arange(C, device=device)
        tokens = state.sequences.gather(1, (self._fed[:, None] + cols).clamp(max=state.sequences.shape[1] - 1))
        valid = cols[None] < pending[:, None]  # (B, C)
        causal = torch.ones(C, C, dtype=torch.bool, device=device).tril() & valid[:, None, :]  # (B, C, C)
        positions = self._layout.next_positions()[:, None] + cols
        logits, hidden = self._forward(tokens, self._mask(causal, positions), positions)
        self._layout.append(valid, positions)
        self._fed = state.lengths.clone()
        last = (pending - 1).clamp(min=0)
        front_logits, front_hidden = (
            logits[rows, last][:, None],
            None if hidden is None else hidden[rows, last][:, None],
        )

        # 2. grow the tree depth by depth from the frontier
        root_position = self._layout.next_positions() - 1  # (B,)
        budget = int(state.max_drafts[state.unfinished].max()) if bool(state.unfinished.any()) else 0
        max_nodes = 1 + self.topk + (self.max_depth - 1) * self.topk * self.topk
        ancestors = torch.eye(max_nodes, dtype=torch.bool, device=device).repeat(B, 1, 1)  # (B, N, N)
        node_tokens, node_parents = [state.roots[:, None]], [torch.full((B, 1), -1, device=device)]
        node_scores, node_q = [torch.zeros(B, 1, device=device)], []
        node_confidence, node_rank = (
            [torch.ones(B, 1, device=device)],
            [torch.zeros(B, 1, dtype=torch.long, device=device)],
        )
        path_estimate = torch.ones(B, 1, device=device)  # predicted P(path accepted) per frontier node
        frontier = torch.zeros(B, 1, dtype=torch.long, device=device)  # node ids
        scores, forwarded = node_scores[0], torch.zeros(B, 0, dtype=torch.long, device=device)
        sample = state.generation_config.do_sample and self.chain
        for depth in range(1, min(self.max_depth, budget) + 1):
            log_q = torch.log_softmax(front_logits.float(), dim=-1)  # (B, f, V_d)
            if sample:
                temperature = state.generation_config.temperature or 1.0
                q = torch.softmax(front_logits.float() / temperature, dim=-1)  # (B, 1, V_d)
                child = torch.multinomial(q[:, 0], 1)[:, None]  # (B, 1, 1)
                child_logq = log_q.gather(-1, child)
                node_q.append(self._to_target(q))
            else:
                child_logq, child = log_q.topk(self.topk, dim=-1)  # (B, f, k)
            confidence = child_logq.exp()  # (B, f, k) draft probability of each child
            node_confidence.append(confidence.flatten(1))
            node_rank.append(torch.arange(child.shape[2], device=device).expand_as(child).flatten(1))
            if self.acceptance_head is not None:  # SpecDec++: the head predicts acceptance of the top token
                accept = confidence.clone()
                accept[..., 0] = torch.sigmoid(self.acceptance_head(front_hidden).float())
            else:
                accept = self.calibrated(confidence)
            first = sum(t.shape[1] for t in node_tokens)
            new = first + torch.arange(child.shape[1] * child.shape[2], device=device)  # node ids
            parents = frontier[..., None].expand_as(child).flatten(1)  # (B, n)
            node_tokens.append(self._map(child.flatten(1)))
            node_parents.append(parents)
            ancestors[:, new] |= ancestors.gather(1, parents[..., None].expand(-1, -1, max_nodes))
            child_estimate = (path_estimate[..., None] * accept).flatten(1)  # (B, n) P(path accepted)
            # rank nodes by estimated P(path accepted) (EAGLE-2 uses cumulative draft probability, our prior); the
            # depth penalty keeps a child below its parent on ties, so the best-N cut is ancestor-closed
            child_scores = child_estimate.clamp(min=1e-12).log() - 1e-6 * depth
            node_scores.append(child_scores)
            scores = torch.cat(node_scores, 1)
            best = child_estimate.max(-1).values[state.unfinished]
            if depth == min(self.max_depth, budget) or (
                self.stop_threshold is not None and bool((1 - best > self.stop_threshold).all())
            ):
                break
            # 3. the next frontier: the best new nodes, forwarded through the drafter over its ancestors
            pick = child_scores.topk(min(self.topk, child_scores.shape[1]), dim=-1).indices  # (B, f')
            frontier, path_estimate = new[pick], child_estimate.gather(1, pick)
            seen = ancestors.gather(1, frontier[..., None].expand(-1, -1, max_nodes))  # (B, f', N)
            visible = torch.cat(
                [
                    seen.gather(2, forwarded[:, None].expand(-1, frontier.shape[1], -1)),
                    seen.gather(2, frontier[:, None].expand(-1, frontier.shape[1], -1)),
                ],
                dim=-1,
            )  # (B, f', n_fwd + f')
            front_tokens = torch.cat(node_tokens, 1).gather(1, frontier)
            front_positions = (root_position + depth)[:, None].expand_as(frontier)  # (B, f')
            logits, hidden = self._forward(front_tokens, self._mask(visible, front_positions), front_positions)
            forwarded = torch.cat([forwarded, frontier], 1)
            front_logits, front_hidden = logits, hidden
        self._cache.crop(-forwarded.shape[1])  # the drafter cache keeps committed tokens only
        tree, kept = self._select(torch.cat(node_tokens, 1), torch.cat(node_parents, 1), scores, node_q)
        self._confidence = torch.cat(node_confidence, 1).gather(1, kept)  # (B, T) for the calibration
        self._rank = torch.cat(node_rank, 1).gather(1, kept)  # (B, T) rank among siblings
        return tree

    def observe(self, state, tree, logits, path, num_accepted) -> None:
        """Update the confidence calibration: a draft node is tried when its parent was accepted."""
        on_path = torch.zeros_like(tree.tokens, dtype=torch.bool).scatter_(1, path.clamp(min=0), True)
        tried = on_path.gather(1, tree.parents.clamp(min=0)) & state.unfinished[:, None]  # (B, T)
        tried[:, 0] = False
        cell = (self._rank * _BINS + (self._confidence * _BINS).long().clamp(0, _BINS - 1)).cpu()  # (B, T)
        tried, hit = tried.cpu(), (tried & on_path).cpu()
        self.calibration_trials.view(-1).index_add_(0, cell[tried], torch.ones(int(tried.sum())))
        self.calibration_hits.view(-1).index_add_(0, cell[hit], torch.ones(int(hit.sum())))

    # ----- internals ------------------------------------------------------------------------------------
    def _mask(self, ancestors: torch.BoolTensor, positions: torch.LongTensor):
        """The drafter's attention mask for new tokens at `positions` `(B, n)` seeing `ancestors` `(B, n, N)`."""
        config, dtype = self.drafter.config, self.drafter.dtype
        return tree_attention_mask(config, self._layout, ancestors, positions, dtype)

    def _forward(self, tokens, mask, positions) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.drafter(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=self.acceptance_head is not None,
            **cache_kwarg(self._cache),
        )
        return out.logits, (out.hidden_states[-1] if self.acceptance_head is not None else None)

    def _map(self, ids: torch.LongTensor) -> torch.LongTensor:
        """Drafter head ids -> target vocabulary ids (identity unless the head was trimmed)."""
        return ids if self.vocab_ids is None else self.vocab_ids[ids]

    def _to_target(self, q: torch.Tensor) -> torch.Tensor:
        """A drafter-head distribution `(..., V_d)` as a target-vocabulary distribution `(..., V)`."""
        if self.vocab_ids is None:
            return q
        full = q.new_zeros(*q.shape[:-1], self.drafter.get_input_embeddings().num_embeddings)
        return full.index_copy_(-1, self.vocab_ids, q)

    def _select(self, tokens, parents, scores, node_q) -> tuple[DraftTree, torch.LongTensor]:
        """Keep the `tree_size` best nodes (root forced), in topological order, with parents re-indexed."""
        N = tokens.shape[1]
        size = N if self.chain else min(self.tree_size, N)
        ranked = scores.clone()
        ranked[:, 0] = float("inf")
        kept = ranked.topk(size, dim=-1).indices.sort(-1).values  # (B, size), ids ascending = topological
        new_index = torch.full_like(tokens, -1).scatter_(
            1, kept, torch.arange(size, device=tokens.device).expand_as(kept)
        )
        kept_parents = parents.gather(1, kept)
        new_parents = torch.where(kept_parents >= 0, new_index.gather(1, kept_parents.clamp(min=0)), -1)
        draft_probs = None
        if node_q:  # sampled chain: node d + 1 was drawn from node_q[d]
            q = torch.cat(node_q, 1)  # (B, D, V)
            draft_probs = torch.cat([q[:, :1], q], 1).gather(1, kept[..., None].expand(-1, -1, q.shape[-1]))
        return DraftTree(tokens.gather(1, kept), new_parents, draft_probs), kept
