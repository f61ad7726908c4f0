"""Prompt building without a model: the chat template, truncation, and the bound that keeps a hopeless prompt
from reaching the tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from tokenwire.engine.interface import ChatMessage, EngineError, EngineErrorCode, GenerationRequest, SamplingParams
from tokenwire.engine.prompt import PromptBuilder, longest_token_chars


class CountingTokenizer:
    """The tiny byte-level tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.chat_template = tok.chat_template
        self.chars = 0

    def get_vocab(self) -> dict[str, int]:
        return dict(self.tok.get_vocab())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.chars += len(text)
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        self.chars += sum(len(m["content"]) for m in messages)
        return self.tok.apply_chat_template(messages, **kw)


def request(**kw: Any) -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(), **kw)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(byte_tokenizer: Any) -> None:
    """More characters than the context times the longest token cannot fit whatever they say: prompt_too_long at
    once, without tokenizer time (a 30 MB prompt once froze every stream for 19 s)."""
    tok = CountingTokenizer(byte_tokenizer)
    builder = PromptBuilder(tok, max_context=64)
    assert builder.max_chars == 64 * longest_token_chars(byte_tokenizer)
    huge = "x" * (builder.max_chars + 1)
    cases = [
        (request(prompt=huge), "prompt"),
        (request(prompt=huge, raw=True), "prompt"),
        (request(messages=(ChatMessage("user", huge),)), "messages"),
    ]
    for req, param in cases:
        with pytest.raises(EngineError) as info:
            builder.build(req)
        assert info.value.code is EngineErrorCode.PROMPT_TOO_LONG and "characters" in info.value.message
        assert info.value.param == param  # the field the client sent, not always "messages"
    assert tok.chars == 0


def test_truncate_cuts_a_hopeless_raw_prompt_to_its_end_before_tokenizing(byte_tokenizer: Any) -> None:
    tok = CountingTokenizer(byte_tokenizer)
    builder = PromptBuilder(tok, max_context=64)
    text = "Hello world! " * (builder.max_chars // 4)
    prompt = builder.build(request(prompt=text, raw=True, truncate=True))
    assert len(prompt.token_ids) == 63 and tok.chars <= builder.max_chars
    assert prompt.token_ids == byte_tokenizer.encode(text[-builder.max_chars :])[-63:]


def naive_truncation(tok: Any, messages: list[ChatMessage], limit: int) -> tuple[list[int], int]:
    """Drop the oldest non-system turn one at a time until it fits (what the engine did before bisection)."""
    msgs, dropped = list(messages), 0

    def ids() -> list[int]:
        out = tok.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in msgs],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return [int(t) for t in out]

    current = ids()
    while len(current) > limit and len(msgs) - 1 > 1:
        del msgs[1]
        dropped += 1
        current = ids()
    return current, dropped


@pytest.mark.parametrize(("turns", "context"), [(2, 64), (3, 64), (10, 64), (41, 64), (10, 256), (41, 256), (120, 256)])
def test_truncate_auto_drops_the_fewest_oldest_turns(byte_tokenizer: Any, turns: int, context: int) -> None:
    """Bisection over how many turns to drop gives what dropping them one by one gives, in a few template passes."""
    messages = [ChatMessage("system", "Be brief.")] + [
        ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i}: " + "words " * (i % 7 + 1)) for i in range(turns)
    ]
    builder = PromptBuilder(byte_tokenizer, max_context=context)
    expected, dropped = naive_truncation(byte_tokenizer, messages, context - 1)
    if len(expected) > context - 1:
        with pytest.raises(EngineError):
            builder.build(request(messages=tuple(messages), truncate=True))
        return
    prompt = builder.build(request(messages=tuple(messages), truncate=True))
    assert (prompt.token_ids, prompt.dropped_turns) == (expected, dropped)


class RecordingTokenizer:
    """Renders messages (and tools, when its template reads them) as text, and keeps what it was given."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.calls: list[dict[str, Any]] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
        self.calls.append({"messages": messages, **kw})
        return [1] * sum(len(m["content"]) for m in messages)


TOOL = '{"type": "function", "function": {"name": "f", "description": "", "parameters": {}}}'


def test_a_template_with_a_tool_format_gets_the_tools_and_others_get_them_in_the_system_message() -> None:
    native = RecordingTokenizer("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}...")
    req = request(messages=(ChatMessage("user", "hi"),), tools=(TOOL,), tools_text="TOOLS: f")
    PromptBuilder(native, max_context=4096).build(req)
    assert native.calls[-1]["tools"][0]["function"]["name"] == "f"
    assert native.calls[-1]["messages"] == [{"role": "user", "content": "hi"}]
    plain = RecordingTokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    PromptBuilder(plain, max_context=4096).build(req)
    assert "tools" not in plain.calls[-1]
    assert plain.calls[-1]["messages"][0] == {"role": "system", "content": "TOOLS: f"}
    with_system = request(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "hi")), tools=(TOOL,),
                          tools_text="TOOLS: f")  # fmt: skip
    PromptBuilder(plain, max_context=4096).build(with_system)
    assert plain.calls[-1]["messages"][0] == {"role": "system", "content": "Be brief.\n\nTOOLS: f"}
