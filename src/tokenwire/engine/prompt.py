"""Turn a request's ``prompt`` or ``messages`` into token ids that fit the context window.

With ``truncate`` the oldest turns are dropped, always keeping the system message and the last turn (the
tutorial's "memory management", done on whole turns instead of cutting tokens mid-sentence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, EngineError, EngineErrorCode, GenerationRequest

# Where a client can ask the server to drop what does not fit (docs/protocol.md, docs/openai.md).
TRUNCATION_HINT = (
    'shorten it, or ask for truncation (truncate: "auto" on the WebSocket, truncation: "auto" in the Responses API)'
)


@dataclass(slots=True, frozen=True)
class Prompt:
    token_ids: list[int]
    dropped_turns: int = 0


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token decodes to: the longest entry of the vocabulary (byte-level and
    SentencePiece vocabularies spell every character of a token with at least one character)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return max((len(piece) for piece in vocab), default=64) or 64


class PromptBuilder:
    """Applies the tokenizer's chat template; ``max_prompt_tokens`` leaves room for at least one new token.

    A text longer than the context times the longest token cannot fit, whatever it says: such a prompt is refused
    (or, with ``truncate``, cut to its most recent turns or characters) before it is tokenized, so that no request
    can buy seconds of tokenizer time with a prompt that could never run."""

    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self._tok = tokenizer
        self.max_context = max_context
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        # a template that reads ``tools`` renders them in the model's own tool format
        self.tool_template = isinstance(template, str) and "tools" in template
        self.max_chars = max_context * longest_token_chars(tokenizer)

    def build(self, request: GenerationRequest) -> Prompt:
        limit = self.max_context - 1
        if request.messages is not None:
            messages = list(request.messages)
            tools = None
            if request.tools and self.tool_template:
                tools = [json.loads(t) for t in request.tools]
            elif request.tools_text:  # no tool format of its own: the tools join the system message
                if messages and messages[0].role == "system":
                    messages[0] = ChatMessage("system", f"{messages[0].content}\n\n{request.tools_text}")
                else:
                    messages.insert(0, ChatMessage("system", request.tools_text))
            return self._fit_messages(messages, request.truncate, limit, tools)
        assert request.prompt is not None  # guaranteed by the protocol layer
        if self.has_chat_template and not request.raw:
            return self._fit_messages([ChatMessage("user", request.prompt)], request.truncate, limit, param="prompt")
        text = request.prompt
        if len(text) > self.max_chars:
            if not request.truncate:
                raise self._too_long_text(len(text), "prompt")
            text = text[-self.max_chars :]
        ids = self._encode_raw(text)
        if len(ids) > limit:
            if not request.truncate:
                raise self._too_long(len(ids), "prompt")
            ids = ids[-limit:]  # a raw prompt keeps its most recent tokens
        if not ids:
            raise EngineError(EngineErrorCode.INVALID_REQUEST, "the prompt encodes to no tokens", "prompt")
        return Prompt(ids)

    def _encode_raw(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=True)
        return ids

    def _apply_template(self, messages: list[ChatMessage], tools: list[Any] | None = None) -> list[int]:
        if not self.has_chat_template:
            # No template: plain "role: content" lines, the way base models are usually prompted.
            text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
            return self._encode_raw(text)
        try:
            out = self._tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                **({"tools": tools} if tools else {}),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
            raise EngineError(
                EngineErrorCode.INVALID_REQUEST,
                f"the model's chat template rejected the messages: {exc}",
                "messages",
            ) from exc
        if isinstance(out, dict):  # some tokenizers return a BatchEncoding regardless
            out = out["input_ids"]
        return [int(t) for t in out]

    def _fit_messages(
        self,
        messages: list[ChatMessage],
        truncate: bool,
        limit: int,
        tools: list[Any] | None = None,
        param: str = "messages",
    ) -> Prompt:
        dropped = 0
        first = 1 if messages and messages[0].role == "system" else 0
        while sum(len(m.content) for m in messages) > self.max_chars:  # cannot fit: no need to tokenize it
            if not truncate or len(messages) - first <= 1:
                raise self._too_long_text(sum(len(m.content) for m in messages), param)
            del messages[first]
            dropped += 1
        ids = self._apply_template(messages, tools)
        if len(ids) > limit and truncate and len(messages) - first > 1:
            # The fewest oldest turns to drop, by bisection: a few template passes, not one per turn.
            def without(k: int) -> list[ChatMessage]:
                return messages[:first] + messages[first + k :]

            lo, hi = 1, len(messages) - first - 1  # dropping hi leaves only the last turn (and the system message)
            best = self._apply_template(without(hi), tools)
            fits = hi if len(best) <= limit else None
            while fits is not None and lo < fits:
                mid = (lo + fits) // 2
                trial = self._apply_template(without(mid), tools)
                if len(trial) <= limit:
                    fits, best = mid, trial
                else:
                    lo = mid + 1
            ids, dropped = best, dropped + (fits if fits is not None else hi)
        if len(ids) > limit:
            raise self._too_long(len(ids), param)
        return Prompt(ids, dropped)

    def _too_long_text(self, n: int, param: str) -> EngineError:
        return EngineError(
            EngineErrorCode.PROMPT_TOO_LONG,
            f"the prompt is {n} characters, more than the model's context of {self.max_context} tokens can hold "
            f"whatever they say; {TRUNCATION_HINT}",
            param,
        )

    def _too_long(self, n: int, param: str) -> EngineError:
        return EngineError(
            EngineErrorCode.PROMPT_TOO_LONG,
            f"the prompt is {n} tokens but the model's context holds {self.max_context} "
            f"(at most {self.max_context - 1} for the prompt); {TRUNCATION_HINT}",
            param,
        )
