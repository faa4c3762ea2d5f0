"""`hf-efficient demo` for the hierarchical byte models, and the chunk renderer (terminal and PNG).

```python
from hf_efficient.models.byte_demo import render_chunks

chunks = model.chunk_text("def add(a, b): return a + b", tokenizer)  # H-Net: one list of chunks per stage
print(render_chunks(chunks))                                             # coloured in a terminal
render_chunks(chunks, path="chunks.png")                                  # or drawn with matplotlib
```
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

__all__ = ["demo", "render_chunks"]

_COLORS = ("\x1b[48;5;153m", "\x1b[48;5;223m")  # alternating light backgrounds
_RESET = "\x1b[0m"


def render_chunks(chunks: list[list[str]], path: str | Path | None = None, color: bool = True) -> str:
    """Render per-stage chunks (outer stage first, e.g. from `HNetForCausalLM.chunk_text`).

    Args:
        chunks (`list[list[str]]`): for each stage, the text of each chunk.
        path (`str` or `Path`, *optional*): also draw the stages as rows of boxes into this PNG file.
        color (`bool`, *optional*, defaults to `True`): alternate ANSI backgrounds; otherwise separate with `|`.

    Returns:
        `str`: one line per stage.
    """
    lines = []
    for stage, pieces in enumerate(chunks):
        shown = [p.replace("\n", "⏎") for p in pieces]
        body = "".join(_COLORS[i % 2] + p + _RESET for i, p in enumerate(shown)) if color else "|".join(shown)
        lines.append(f"stage {stage} ({len(pieces)} chunks): {body}")
    if path is not None:
        _draw(chunks, Path(path))
    return "\n".join(lines)


def _draw(chunks: list[list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len("".join(p)) for p in chunks) if chunks else 1
    fig, ax = plt.subplots(figsize=(max(4.0, 0.14 * width), 0.6 + 0.5 * len(chunks)))
    for stage, pieces in enumerate(chunks):
        x = 0
        for i, piece in enumerate(pieces):
            y = len(chunks) - 1 - stage
            ax.add_patch(plt.Rectangle((x, y + 0.1), len(piece), 0.8, color=("#a6cee3", "#fdbf6f")[i % 2]))
            ax.text(x + len(piece) / 2, y + 0.5, piece.replace("\n", "⏎"), ha="center", va="center", fontsize=8)
            x += len(piece)
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(chunks))
    ax.set_yticks([len(chunks) - 0.5 - s for s in range(len(chunks))], [f"stage {s}" for s in range(len(chunks))])
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo() -> None:
    """Train a tiny H-Net for a few seconds, show its chunks and batched cached generation; show HAT's words."""
    from hf_efficient.models import ByteTokenizer, HATConfig, HATForCausalLM, HNetConfig, HNetForCausalLM
    from hf_efficient.models.hat.splitter_hat import word_starts
    from hf_efficient.reference import reference_corpus

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = ByteTokenizer()
        text = "naïve café 🙂"
        print(f"ByteTokenizer: {text!r} -> {tok(text).input_ids} -> {tok.decode(tok(text).input_ids)!r}")

        model = HNetForCausalLM(
            HNetConfig(hidden_size=[96, 192], intermediate_size=[0, 512], sliding_window=[64, None])
        )
        print(f"H-Net 1-stage: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        stream = b"".join(doc.encode() + b"\n" for doc in reference_corpus("train", "code")[:40])
        optimizer = torch.optim.AdamW(model.optimizer_param_groups(lr=3e-3))
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < 8 and steps < 200:
            offsets = torch.randint(0, len(stream) - 129, (8,)).tolist()
            ids = torch.tensor([list(stream[o : o + 128]) for o in offsets])
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        print(
            f"  {steps} training steps: lm loss {out.lm_loss.item():.2f} nats/byte, "
            f"ratio loss {out.ratio_loss.item():.2f}, {out.compression[0]:.1f} bytes per chunk (target 6)"
        )
        model.eval()
        print(render_chunks(model.chunk_text("def add(a, b):\n    return a + b", tok)))

        prompts = ["def ", "import os\n", "class Foo:", "    return"]
        batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
        for label, cache in (("cached", True), ("no cache", False)):
            start = time.perf_counter()
            gen = model.generate(**batch, max_new_tokens=24, do_sample=False, use_cache=cache)
            rate = gen.shape[0] * 24 / (time.perf_counter() - start)
            print(f"  batch-4 greedy generation, {label}: {rate:.0f} bytes/s")
        for prompt, row in zip(
            prompts, tok.batch_decode(gen[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        ):
            print(f"    {prompt!r} -> {row!r}")

        hat = HATForCausalLM(HATConfig())
        sentence = "HAT pools words: don't split 世界!"
        ids = torch.tensor([list(sentence.encode())])
        starts = word_starts(ids, torch.ones_like(ids, dtype=torch.bool), hat.config.max_word_bytes)[0]
        cuts = [*starts.nonzero().flatten().tolist(), ids.shape[1]]
        words = [sentence.encode()[a:b].decode() for a, b in itertools.pairwise(cuts)]
        print(f"HAT ({sum(p.numel() for p in hat.parameters()) / 1e6:.1f}M parameters) words: {words}")
    finally:
        torch.set_num_threads(threads)
