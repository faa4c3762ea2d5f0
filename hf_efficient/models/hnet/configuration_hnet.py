"""H-Net configuration (remote code: imports nothing from `hf_efficient`)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

__all__ = ["HNET_PRESETS", "HNetConfig", "parse_layout"]

# Paper-sized configurations (Hwang et al., 2025, Table 1 / released configs). Encoder/decoder "m" blocks are our
# gated recurrent block, not Mamba-2, so parameter counts differ slightly from the released checkpoints.
HNET_PRESETS: dict[str, dict[str, Any]] = {
    "hnet_1stage_L": {
        "arch_layout": ["m4", ["T22"], "m4"],
        "hidden_size": [1024, 1536],
        "intermediate_size": [0, 4096],
        "num_attention_heads": [16, 16],
        "sliding_window": [1023, None],
        "compression_ratio": [6.0],
    },
    "hnet_2stage_L": {
        "arch_layout": ["m4", ["T1m4", ["T26"], "m4T1"], "m4"],
        "hidden_size": [1024, 1024, 1536],
        "intermediate_size": [0, 2816, 4096],
        "num_attention_heads": [16, 16, 16],
        "sliding_window": [1023, 1023, None],
        "compression_ratio": [3.0, 3.0],
    },
    "hnet_1stage_XL": {
        "arch_layout": ["m4", ["T24"], "m4"],
        "hidden_size": [1024, 2048],
        "intermediate_size": [0, 5504],
        "num_attention_heads": [16, 16],
        "sliding_window": [1023, None],
        "compression_ratio": [6.0],
    },
    "hnet_2stage_XL": {
        "arch_layout": ["m4", ["T1m4", ["T27"], "m4T1"], "m4"],
        "hidden_size": [1024, 1536, 2048],
        "intermediate_size": [0, 4096, 5504],
        "num_attention_heads": [16, 16, 16],
        "sliding_window": [1023, 1023, None],
        "compression_ratio": [3.0, 3.0],
    },
}


def parse_layout(spec: str) -> list[str]:
    """Expand a block string such as `"T1m4"` into `["T", "m", "m", "m", "m"]`; `ValueError` on bad input."""
    blocks, i = [], 0
    while i < len(spec):
        kind = spec[i]
        j = i + 1
        while j < len(spec) and spec[j].isdigit():
            j += 1
        if kind not in "TmM" or j == i + 1:
            raise ValueError(f"bad block spec {spec!r} at {spec[i:]!r}: expected letter T, m or M followed by a count")
        blocks += [kind] * int(spec[i + 1 : j])
        i = j
    return blocks


class HNetConfig(PreTrainedConfig):
    r"""
    Configuration of [`HNetForCausalLM`], a byte-level language model with learned dynamic chunking.

    `HNetConfig()` describes a ~4M-parameter 1-stage model that trains and generates on a CPU. Paper-sized models:
    `HNetConfig.from_preset("hnet_2stage_L")` (see `HNET_PRESETS`).

    Paper: H-Net, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling" (Hwang, Wang, Gu, 2025,
    arXiv:2507.07955).

    Args:
        vocab_size (`int`, *optional*, defaults to 259):
            256 byte values plus `<pad>`, `<s>`, `</s>` (see `ByteTokenizer`).
        arch_layout (`list`, *optional*, defaults to `["m2", ["T4"], "m2"]`):
            Nested `[encoder, inner, decoder]` per stage, innermost `[main]`. Blocks: `T` = Llama decoder layer
            (attention + SwiGLU MLP), `m` = gated recurrent block, `M` = gated recurrent block + MLP; a digit run
            repeats the block. `["m4", ["T1m4", ["T26"], "m4T1"], "m4"]` is a 2-stage model.
        hidden_size (`list[int]`, *optional*, defaults to `[128, 256]`):
            Width per stage, outer to inner, non-decreasing.
        intermediate_size (`list[int]`, *optional*, defaults to `[0, 704]`):
            MLP width per stage (0 allowed only for a stage without `T`/`M` blocks).
        num_attention_heads (`list[int]`, *optional*, defaults to `[4, 4]`):
            Attention heads per stage.
        num_key_value_heads (`list[int]`, *optional*):
            KV heads per stage; defaults to `num_attention_heads`.
        sliding_window (`list[int | None]`, *optional*, defaults to `[128, None]`):
            Attention window per stage (`None` or -1 = global).
        compression_ratio (`list[float]`, *optional*, defaults to `[6.0]`):
            Target bytes (or chunks) per chunk N for each routed stage; the ratio loss is minimal at 1/N boundaries.
        ratio_loss_weight (`float`, *optional*, defaults to 0.03):
            Weight α of the ratio loss added to the LM loss.
        lr_multiplier (`list[float]`, *optional*):
            Learning-rate multiplier per stage for `HNetForCausalLM.optimizer_param_groups`; defaults to
            `hidden_size[-1] / hidden_size[s]` (wider inner stages get smaller rates, as in the paper).
        recurrent_expand (`int`, *optional*, defaults to 2): recurrent block width = `recurrent_expand * hidden`.
        conv_kernel (`int`, *optional*, defaults to 4): causal depthwise convolution width in recurrent blocks.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5): RMSNorm epsilon.
        rope_theta (`float`, *optional*, defaults to 10000.0): RoPE base of every attention stack.
        max_position_embeddings (`int`, *optional*, defaults to 8192): longest byte context used for RoPE.
        initializer_range (`float`, *optional*, defaults to 0.02): std of linear-layer initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie `lm_head` to the byte embedding.
    """

    model_type = "hfe_hnet"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]  # the name before and after 5.24

    def __init__(
        self,
        vocab_size: int = 259,
        arch_layout: list | None = None,
        hidden_size: list[int] | None = None,
        intermediate_size: list[int] | None = None,
        num_attention_heads: list[int] | None = None,
        num_key_value_heads: list[int] | None = None,
        sliding_window: list[int | None] | None = None,
        compression_ratio: list[float] | None = None,
        ratio_loss_weight: float = 0.03,
        lr_multiplier: list[float] | None = None,
        recurrent_expand: int = 2,
        conv_kernel: int = 4,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = 256,
        bos_token_id: int | None = 257,
        eos_token_id: int | None = 258,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.arch_layout = arch_layout if arch_layout is not None else ["m2", ["T4"], "m2"]
        self.hidden_size = list(hidden_size) if hidden_size is not None else [128, 256]
        self.intermediate_size = list(intermediate_size) if intermediate_size is not None else [0, 704]
        self.num_attention_heads = list(num_attention_heads) if num_attention_heads is not None else [4, 4]
        self.num_key_value_heads = (
            list(num_key_value_heads) if num_key_value_heads is not None else list(self.num_attention_heads)
        )
        self.sliding_window = list(sliding_window) if sliding_window is not None else [128, None]
        self.compression_ratio = list(compression_ratio) if compression_ratio is not None else [6.0]
        self.ratio_loss_weight = ratio_loss_weight
        self.lr_multiplier = (
            list(lr_multiplier) if lr_multiplier is not None else [self.hidden_size[-1] / d for d in self.hidden_size]
        )
        self.recurrent_expand = recurrent_expand
        self.conv_kernel = conv_kernel
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_hnet()

    @property
    def num_stages(self) -> int:
        """Number of routed stages (1 for `["m4", ["T22"], "m4"]`)."""
        depth, layout = 0, self.arch_layout
        while len(layout) == 3:
            depth, layout = depth + 1, layout[1]
        return depth

    def stage_layout(self, stage: int) -> tuple[list[str], list[str]]:
        """`(encoder blocks, decoder blocks)` of a routed stage, or `(main blocks, [])` for the innermost one."""
        layout = self.arch_layout
        for _ in range(stage):
            layout = layout[1]
        if len(layout) == 1:
            return parse_layout(layout[0]), []
        return parse_layout(layout[0]), parse_layout(layout[2])

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HNetConfig:
        """A paper-sized configuration from `HNET_PRESETS`, e.g. `HNetConfig.from_preset("hnet_1stage_L")`."""
        if name not in HNET_PRESETS:
            raise ValueError(f"unknown H-Net preset name={name!r}; available: {sorted(HNET_PRESETS)}")
        return cls(**{**HNET_PRESETS[name], **overrides})

    def _validate_hnet(self) -> None:
        layout = self.arch_layout
        while True:
            if not isinstance(layout, list) or len(layout) not in (1, 3):
                raise ValueError(f"arch_layout entries must be [encoder, inner, decoder] or [main], got {layout!r}")
            if len(layout) == 1:
                break
            layout = layout[1]
        n = self.num_stages + 1
        per_stage = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        for name in (*per_stage, "sliding_window", "lr_multiplier"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}={getattr(self, name)} needs one entry per stage ({n}) of {self.arch_layout}")
        if len(self.compression_ratio) != n - 1 or any(r <= 1 for r in self.compression_ratio):
            raise ValueError(f"compression_ratio={self.compression_ratio} needs {n - 1} values > 1 (one per stage)")
        if any(b < a for a, b in zip(self.hidden_size, self.hidden_size[1:])):
            raise ValueError(f"hidden_size={self.hidden_size} must be non-decreasing from outer to inner stage")
        for s in range(n):
            enc, dec = self.stage_layout(s)
            d, heads = self.hidden_size[s], self.num_attention_heads[s]
            if any(b in "TM" for b in enc + dec) and self.intermediate_size[s] <= 0:
                raise ValueError(f"stage {s} has T/M blocks but intermediate_size[{s}]={self.intermediate_size[s]}")
            if "T" in enc + dec and (d % heads or heads % self.num_key_value_heads[s]):
                raise ValueError(
                    f"stage {s}: hidden_size={d} must divide by num_attention_heads={heads}, which must divide by "
                    f"num_key_value_heads={self.num_key_value_heads[s]}"
                )


HNetConfig.register_for_auto_class()
