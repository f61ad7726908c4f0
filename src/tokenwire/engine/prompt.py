"""Turn a request's ``prompt`` or ``messages`` into token ids that fit the context window.

With ``truncate`` the oldest turns are dropped, always keeping the system message and the last turn (the
tutorial's "memory management", done on whole turns instead of cutting tokens mid-sentence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, EngineError, ErrorCode, GenerationRequest


@dataclass(slots=True, frozen=True)
class Prompt:
    token_ids: list[int]
    dropped_turns: int = 0


class PromptBuilder:
    """Applies the tokenizer's chat template; ``max_prompt_tokens`` leaves room for at least one new token."""

    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self._tok = tokenizer
        self.max_context = max_context
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def build(self, request: GenerationRequest) -> Prompt:
        limit = self.max_context - 1
        if request.messages is not None:
            return self._fit_messages(list(request.messages), request.truncate, limit)
        assert request.prompt is not None  # guaranteed by the protocol layer
        if self.has_chat_template and not request.raw:
            return self._fit_messages([ChatMessage("user", request.prompt)], request.truncate, limit)
        ids = self._encode_raw(request.prompt)
        if len(ids) > limit:
            if not request.truncate:
                raise self._too_long(len(ids))
            ids = ids[-limit:]  # a raw prompt keeps its most recent tokens
        if not ids:
            raise EngineError(ErrorCode.INVALID_REQUEST, "the prompt encodes to no tokens", "prompt")
        return Prompt(ids)

    def _encode_raw(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=True)
        return ids

    def _apply_template(self, messages: list[ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            # No template: plain "role: content" lines, the way base models are usually prompted.
            text = "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"
            return self._encode_raw(text)
        try:
            out = self._tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:  # the template itself rejects the conversation (e.g. role order)
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"the model's chat template rejected the messages: {exc}",
                "messages",
            ) from exc
        if isinstance(out, dict):  # some tokenizers return a BatchEncoding regardless
            out = out["input_ids"]
        return [int(t) for t in out]

    def _fit_messages(self, messages: list[ChatMessage], truncate: bool, limit: int) -> Prompt:
        ids = self._apply_template(messages)
        dropped = 0
        while len(ids) > limit and truncate:
            first = 1 if messages and messages[0].role == "system" else 0
            if len(messages) - first <= 1:
                break  # only the last turn is left: it cannot be dropped
            del messages[first]
            dropped += 1
            ids = self._apply_template(messages)
        if len(ids) > limit:
            raise self._too_long(len(ids))
        return Prompt(ids, dropped)

    def _too_long(self, n: int) -> EngineError:
        return EngineError(
            ErrorCode.PROMPT_TOO_LONG,
            f"the prompt is {n} tokens but the model's context holds {self.max_context} "
            f'(at most {self.max_context - 1} for the prompt); shorten it or send truncate: "auto"',
            "messages",
        )
