"""ByteTokenizer: exact round trips, padding, save/load, streaming without broken characters."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, TextStreamer

from hf_efficient.models import ByteTokenizer

TOK = ByteTokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(text):
    ids = TOK(text, add_special_tokens=False).input_ids
    assert ids == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK(text).input_ids, skip_special_tokens=True) == text


@settings(max_examples=100, deadline=None)
@given(st.text(), st.integers(min_value=1, max_value=5))
def test_incremental_decoding_never_breaks_a_character(text, step):
    data = text.encode("utf-8")
    pieces, pending = [], b""
    for i in range(0, len(data), step):
        piece, pending = TOK.decode_incremental(list(data[i : i + step]), pending)
        assert "\ufffd" not in piece or "\ufffd" in text
        pieces.append(piece)
    assert pending == b"" and "".join(pieces) == text


def test_special_token_strings_in_text_stay_bytes():
    assert TOK("</s><pad>", add_special_tokens=False).input_ids == list(b"</s><pad>")
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, len(TOK)) == (256, 257, 258, 259)


def test_batch_padding_both_sides():
    texts = ["a", "héllo"]
    for side in ("left", "right"):
        batch = TOK(texts, padding=True, padding_side=side, return_tensors="pt")
        assert batch.input_ids.shape == (2, 7)
        assert batch.attention_mask.sum(1).tolist() == [2, 7]
        pad_col = 0 if side == "left" else -1
        assert batch.input_ids[0, pad_col] == TOK.pad_token_id
        assert TOK.batch_decode(batch.input_ids, skip_special_tokens=True) == texts


def test_save_and_auto_load(tmp_path):
    tok = ByteTokenizer(append_eos=True)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ByteTokenizer"
    assert loaded("hé").input_ids == [257, 104, 195, 169, 258]


class _Collect(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_special_tokens=True)
        self.chunks: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.chunks.append(text)


def test_text_streamer_byte_by_byte_emits_whole_characters():
    text = "naïve 世界 ok 🙂 done\nnext 字"
    streamer = _Collect(TOK)
    for b in text.encode("utf-8"):
        streamer.put(torch.tensor([b]))
    streamer.end()
    assert all("\ufffd" not in c for c in streamer.chunks)
    assert "".join(streamer.chunks) == text
