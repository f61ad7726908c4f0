"""Incremental detokenization: deltas concatenate to the whole decoding, with no split characters."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tokenwire.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, decode

TEXTS = [
    "Hello world! The quick brown fox.",
    "Emoji: 😀 🎉 🚀 👩‍💻 ❤️ 🇫🇷 and 🦄🐉 (rare ones)",
    "日本語のテキスト。東京は日本の首都です。龍と鳳凰。",
    "中文文本：北京是中国的首都。你好，世界！",
    "Mixed: café 😀 naïve 日本 Ångström 🇯🇵 end",
    "  leading spaces and\nnew lines\n\n  indented",
]


def stream(tokenizer: Any, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_deltas_concatenate_to_full_decoding(byte_tokenizer: Any, text: str) -> None:
    """On a byte-level BPE tokenizer, multi-byte characters split over tokens are never sent broken."""
    ids = byte_tokenizer.encode(text)
    assert any(REPLACEMENT in byte_tokenizer.decode([i]) for i in ids) or text.isascii()
    deltas = stream(byte_tokenizer, ids)
    assert "".join(deltas) == decode(byte_tokenizer, ids) == text
    assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_deltas_concatenate_to_full_decoding(sp_tokenizer: Any, text: str) -> None:
    """On SentencePiece with byte fallback, word-initial spaces are kept and byte pieces joined."""
    ids = sp_tokenizer.encode(text)
    deltas = stream(sp_tokenizer, ids)
    assert "".join(deltas) == decode(sp_tokenizer, ids)
    assert not any(REPLACEMENT in d for d in deltas)


def test_sentencepiece_splits_rare_characters_into_byte_pieces(sp_tokenizer: Any) -> None:
    """The test above is meaningful: the rare emoji really is spread over byte tokens."""
    ids = sp_tokenizer.encode("🦄")
    assert len(ids) >= 4
    assert any(sp_tokenizer.decode([i]) == REPLACEMENT for i in ids)


def test_character_left_incomplete_at_the_end_is_dropped(byte_tokenizer: Any) -> None:
    """When max_tokens cuts a character in half, the half is not sent as U+FFFD."""
    ids = byte_tokenizer.encode("ok 😀")
    full = decode(byte_tokenizer, ids)
    for cut in range(1, len(ids)):
        deltas = stream(byte_tokenizer, ids[:cut])
        joined = "".join(deltas)
        assert REPLACEMENT not in joined
        assert joined == decode(byte_tokenizer, ids[:cut]).rstrip(REPLACEMENT)
        assert full.startswith(joined)


@pytest.mark.parametrize("seed", range(5))
def test_random_token_sequences_match_full_decoding(byte_tokenizer: Any, sp_tokenizer: Any, seed: int) -> None:
    """Whatever a (random) model emits, the stream equals the decoding of all tokens at once."""
    rng = random.Random(seed)
    for tok, size in ((byte_tokenizer, len(byte_tokenizer)), (sp_tokenizer, sp_tokenizer.vocab_size)):
        ids = [rng.randrange(size) for _ in range(200)]
        assert "".join(stream(tok, ids)) == decode(tok, ids).rstrip(REPLACEMENT)


def test_special_tokens_are_not_in_the_text(byte_tokenizer: Any) -> None:
    ids = [*byte_tokenizer.encode("Hi"), byte_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert "".join(stream(byte_tokenizer, ids)) == "Hi"
