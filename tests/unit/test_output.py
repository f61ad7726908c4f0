"""The output side shared by every backend, without a model: token ids in, deltas and one end out."""

from __future__ import annotations

from typing import Any

from tokenwire.engine.detokenizer import decode
from tokenwire.engine.interface import FinishReason, OutputKind, RequestOutput, SamplingParams
from tokenwire.engine.output import OutputProcessor

EOS = 99_999  # not in the tiny vocabulary: only the processor's eos set knows it


def feed(proc: OutputProcessor, rid: str, ids: list[int], one_by_one: bool = True) -> tuple[list[RequestOutput], bool]:
    outs: list[RequestOutput] = []
    ended = False
    batches = [[t] for t in ids] if one_by_one else [ids]
    for batch in batches:
        made, ended = proc.tokens(rid, batch, 0.0)
        outs += made
        if ended:
            break
    return outs, ended


def text_of(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)


def test_deltas_concatenate_to_the_decoding_and_the_end_counts_every_token(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("Emoji: 😀 🎉 and accents: café, 日本語のテキスト")
    for one_by_one in (True, False):  # a backend may hand over several tokens at once (speculative decoding)
        proc = OutputProcessor(byte_tokenizer, {EOS})
        proc.add("r", SamplingParams(max_tokens=len(ids)), 5, len(ids), 0.0)
        outs, ended = feed(proc, "r", ids, one_by_one)
        assert ended and outs[-1].kind is OutputKind.FINISHED and outs[-1].finish_reason is FinishReason.LENGTH
        assert text_of(outs) == decode(byte_tokenizer, ids)
        assert "\ufffd" not in text_of(outs)
        assert sum(o.num_tokens for o in outs) == len(ids) == outs[-1].completion_tokens
        assert outs[-1].prompt_tokens == 5 and "r" not in proc


def test_eos_ends_unless_ignored_and_tokens_after_an_end_are_ignored(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("Hello world")
    proc = OutputProcessor(byte_tokenizer, {EOS})
    proc.add("a", SamplingParams(), 3, 100, 0.0)
    proc.add("b", SamplingParams(ignore_eos=True), 3, 100, 0.0)
    outs, ended = feed(proc, "a", [*ids, EOS, *ids], one_by_one=False)
    assert ended and outs[-1].finish_reason is FinishReason.STOP and text_of(outs) == "Hello world"
    assert outs[-1].completion_tokens == len(ids) + 1
    _, ended = feed(proc, "b", [*ids, EOS, *ids])
    assert not ended


def test_a_stop_string_ends_the_request_and_is_never_sent(byte_tokenizer: Any) -> None:
    ids = byte_tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    proc = OutputProcessor(byte_tokenizer, {EOS})
    proc.add("s", SamplingParams(stop=("fox jumps",)), 3, 100, 0.0)
    outs, ended = feed(proc, "s", ids)
    assert ended and outs[-1].finish_reason is FinishReason.STOP
    assert text_of(outs) == "The quick brown "


def test_a_cancel_flushes_what_is_held_and_ends_once(byte_tokenizer: Any) -> None:
    proc = OutputProcessor(byte_tokenizer, {EOS})
    proc.add("c", SamplingParams(stop=("zzz-never",)), 3, 100, 0.0)
    outs, _ = feed(proc, "c", byte_tokenizer.encode("Hello z"))
    end = proc.finish("c", FinishReason.CANCELLED)
    assert end is not None and end.finish_reason is FinishReason.CANCELLED
    assert text_of([*outs, end]) == "Hello z"  # the "z" held back as a possible stop string goes out at the end
    assert proc.finish("c", FinishReason.CANCELLED) is None
    assert end.timings is not None and end.timings.total_ms >= 0
