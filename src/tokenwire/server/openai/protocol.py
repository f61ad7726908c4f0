"""OpenAI-compatible request parsing and response shapes. Pure: dicts in, typed requests or errors out.

Request fields become sampling parameters and chat messages through params.py, as at every door, so all doors
accept the same values and name the same fields in their errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, FinishReason, SamplingParams
from tokenwire.server.requests import errors, params, strictjson, tools
from tokenwire.server.requests.http_errors import check_model, field_error, json_input_error, openai_error
from tokenwire.server.requests.params import Limits


@dataclass(slots=True, frozen=True)
class CompletionRequest:
    """A parsed ``/v1/chat/completions`` (``messages``) or ``/v1/completions`` (``prompt``, no chat template) body."""

    chat: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[tools.Tool, ...] = ()  # tool calls are possible (tool_choice is not "none")
    tools_text: str = ""  # the tools described for a model whose chat template has no tool format


def parse_completion_request(
    body: Any, *, chat: bool, limits: Limits, model_name: str, model_aliases: tuple[str, ...] = ()
) -> CompletionRequest:
    if not isinstance(body, dict):
        raise openai_error(400, "the request body must be a JSON object", code="invalid_json")
    check_model(body, model_name, model_aliases)
    _reject_unsupported(body, chat)
    try:
        strictjson.check(body, "the request")
    except strictjson.JSONInputError as err:
        raise json_input_error(err) from None
    try:
        max_tokens = params.max_tokens(body, ("max_completion_tokens", "max_tokens"), limits)
        schema = params.response_format(body.get("response_format"), "response_format", nested=True)
        use_tools = tools.parse_tools(body.get("tools"), nested=True) if chat else ()
        choice = tools.parse_choice(body.get("tool_choice"), use_tools, nested=True)
        if choice.forced:
            if schema is not None:
                raise params.FieldError(
                    '"response_format" and a forced "tool_choice" exclude each other', "tool_choice"
                )
            schema = tools.call_schema(use_tools, choice)
        sampling = params.sampling_params(body, limits, max_tokens, schema)
        prompt: str | None = None
        messages: tuple[ChatMessage, ...] | None = None
        if chat:
            if "messages" not in body:
                raise params.FieldError('"messages" is required', "messages")
            messages = params.chat_messages(_calls_as_text(body["messages"]), limits)
        else:
            prompt = _prompt(body.get("prompt"))
    except params.FieldError as err:
        raise field_error(err) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise openai_error(400, '"stream" must be true or false', code="invalid_request", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise openai_error(400, '"stream_options" must be an object', code="invalid_request", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise openai_error(
            400,
            '"stream_options.include_usage" must be true or false',
            code="invalid_request",
            param="stream_options.include_usage",
        )
    offered = use_tools if choice.mode != "none" else ()
    text = tools.system_text(offered, choice) if offered else ""
    return CompletionRequest(chat, sampling, stream, include_usage, model_name, prompt, messages, offered, text)


def _calls_as_text(raw: Any) -> Any:
    """Assistant turns that called tools hold the calls' JSON as their text (the fallback's format)."""
    if not isinstance(raw, list):
        return raw
    out = []
    for m in raw:
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            calls = [
                tools.call_text(str(c["function"].get("name")), c["function"].get("arguments"))
                for c in m["tool_calls"]
                if isinstance(c, dict) and isinstance(c.get("function"), dict)
            ]
            text = m.get("content") if isinstance(m.get("content"), str) else ""
            m = {"role": "assistant", "content": "\n".join([text, *calls]) if text else "\n".join(calls)}
        out.append(m)
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one prompt
    elif isinstance(prompt, list):
        raise params.FieldError('"prompt" must be one string (batches and token arrays are not supported)', "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise params.FieldError('"prompt" must be a non-empty string', "prompt")
    return prompt


def _reject_unsupported(body: dict[str, Any], chat: bool) -> None:
    """Refuse, rather than silently ignore, options that would change what the client gets back."""
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise openai_error(400, '"n" must be 1 (one choice per request)', code="invalid_request", param="n")
    for name in ("functions", "function_call"):  # the deprecated forms of tools and tool_choice
        if body.get(name) not in (None, [], "none"):
            raise openai_error(
                400, f'"{name}" is deprecated and not supported: use "tools"', code="invalid_request", param=name
            )
    if body.get("tools") not in (None, []) and not chat:
        raise openai_error(400, '"tools" needs /v1/chat/completions', code="invalid_request", param="tools")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _not_supported("logprobs")
    if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
        raise _not_supported("echo" if body.get("echo") else "suffix" if body.get("suffix") else "best_of")
    if body.get("logit_bias") not in (None, {}):  # neither engine can add a bias to chosen tokens' logits
        raise _not_supported("logit_bias")
    if chat:
        _reject_unsupported_chat(body)


def _reject_unsupported_chat(body: dict[str, Any]) -> None:
    """Chat options for what the served model cannot do: reasoning, audio, web search (the Responses door refuses
    ``reasoning`` the same way)."""
    if body.get("reasoning_effort") not in (None, "none"):
        raise openai_error(
            400,
            '"reasoning_effort" is not supported: the model served does not reason',
            code="invalid_request",
            param="reasoning_effort",
        )
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or any(m != "text" for m in modalities)):
        raise openai_error(400, '"modalities" may only be ["text"]', code="invalid_request", param="modalities")
    for name in ("audio", "web_search_options"):
        if body.get(name) is not None:
            raise _not_supported(name)


def _not_supported(name: str) -> errors.RequestError:
    return openai_error(400, f'"{name}" is not supported by this server', code="invalid_request", param=name)


# -- response shapes


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


@dataclass(slots=True, frozen=True)
class ResponseIds:
    id: str
    model: str
    created: int

    @classmethod
    def new(cls, id: str, model: str) -> ResponseIds:
        return cls(id, model, int(time.time()))


def _envelope(ids: ResponseIds, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": ids.id, "object": obj, "created": ids.created, "model": ids.model, "choices": choices, **extra}


def chat_chunk(ids: ResponseIds, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return _envelope(ids, "chat.completion.chunk", [choice])


def text_chunk(ids: ResponseIds, text: str, reason: str | None) -> dict[str, Any]:
    return _envelope(ids, "text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])


def usage_chunk(ids: ResponseIds, chat: bool, use: dict[str, Any]) -> dict[str, Any]:
    return _envelope(ids, "chat.completion.chunk" if chat else "text_completion", [], usage=use)


def tool_calls(calls: list[tools.ToolCall]) -> list[dict[str, Any]]:
    return [
        {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]


def call_delta(kind: str, piece: str, call_id: str) -> dict[str, Any]:
    """A streamed answer's delta: text, a call's start (its id and name), or a piece of its arguments."""
    if kind == "text":
        return {"content": piece}
    if kind == "name":
        function = {"name": piece, "arguments": ""}
        return {"tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": function}]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


def chat_completion(
    ids: ResponseIds, text: str, reason: str, use: dict[str, int], calls: list[tools.ToolCall] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls(calls)}
        reason = "tool_calls"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return _envelope(ids, "chat.completion", [choice], usage=use)


def text_completion(ids: ResponseIds, text: str, reason: str, use: dict[str, int]) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return _envelope(ids, "text_completion", [choice], usage=use)


def model_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "tokenwire"}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(model, created)]}
