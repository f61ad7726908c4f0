"""Incremental detokenization: token ids in, text deltas out.

The deltas concatenate to exactly ``decode(all_ids)``. A byte-level BPE or SentencePiece byte-fallback
tokenizer may split one character's bytes over several tokens; the partial decode then ends in U+FFFD,
and the text is held back until the character is complete. Decoding a sliding window of recent tokens
(rather than each token alone) keeps the spaces that SentencePiece attaches to the start of a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(
        self,
        token_ids: Sequence[int],
        skip_special_tokens: bool = ...,
        clean_up_tokenization_spaces: bool = ...,
    ) -> str: ...


def decode(tokenizer: Decoder, ids: Sequence[int]) -> str:
    """The reference decoding of a whole generation, with the settings every delta uses."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Feed token ids one at a time with :meth:`push`; each call returns the text that became final."""

    __slots__ = ("_ids", "_prefix_offset", "_read_offset", "_tokenizer")

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: decoded for context, its text already sent
        self._read_offset = 0  # tokens before this are sent

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix_text = decode(self._tokenizer, self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._tokenizer, window)
        if new_text.endswith(REPLACEMENT) or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing visible) so far: wait for more tokens
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """Text still held back at the end, minus a character left incomplete by the last token."""
        prefix_text = decode(self._tokenizer, self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._tokenizer, self._ids[self._prefix_offset :]).rstrip(REPLACEMENT)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
