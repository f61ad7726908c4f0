"""OpenAI's Responses API: request parsing and the shapes of responses, items and stream events. Pure.

A ``POST /v1/responses`` body (or a WebSocket ``response.create`` event, which has the same fields) becomes a
:class:`CreateRequest`; sampling fields go through params.py as at every door. What this server cannot honour
(tools for now, images, files, JSON formats, reasoning settings) is a 400 naming the field, never ignored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import ChatMessage, FinishReason, SamplingParams
from tokenwire.server.requests import params, strictjson, tools
from tokenwire.server.requests.http_errors import check_model, field_error, json_input_error, openai_error
from tokenwire.server.requests.params import FieldError, Limits
from tokenwire.server.requests.tools import Tool, ToolCall, ToolChoice

# Content part types that carry text, per role of an input message.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_INPUT_ROLES = ("user", "assistant", "system", "developer")
MAX_ID = 128
NO_TOOLS = ToolChoice("none")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(slots=True, frozen=True)
class CreateRequest:
    """One response to create: its new input, how to sample, and what to do with it."""

    input: tuple[ChatMessage, ...]
    params: SamplingParams
    model: str
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    max_output_tokens: int | None = None  # as asked (None: the server's default applies)
    truncate: bool = False  # truncation "auto": drop the oldest turns that do not fit
    metadata: dict[str, str] | None = None
    stream_id: str | None = None  # WebSocket mode: the lane this response runs on
    text_format: dict[str, Any] | None = None  # text.format as asked, when it is JSON (echoed back)
    tools: tuple[Tool, ...] = ()  # tool calls are possible (tool_choice is not "none")
    tool_choice: ToolChoice = NO_TOOLS
    tools_asked: tuple[Any, ...] = ()  # the tools as sent (echoed back)

    def echo(self) -> dict[str, Any]:
        """The request's fields as the response object repeats them."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "model": self.model,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "background": self.background,
            "temperature": self.params.temperature,
            "top_p": self.params.top_p,
            "truncation": "auto" if self.truncate else "disabled",
            "text": {"format": self.text_format or {"type": "text"}},
            "tools": list(self.tools_asked),
            "tool_choice": _choice_echo(self.tool_choice),
        }

    def tools_text(self) -> str:
        """The tools described for a model whose chat template has no tool format."""
        return tools.system_text(self.tools, self.tool_choice) if self.tools else ""


def _choice_echo(choice: ToolChoice) -> Any:
    return {"type": "function", "name": choice.name} if choice.mode == "function" else choice.mode


def parse_create(
    body: Any,
    limits: Limits,
    model_name: str,
    *,
    websocket: bool = False,
    model_aliases: tuple[str, ...] = (),
) -> CreateRequest:
    """A create body (HTTP) or ``response.create`` event (``websocket``: always streamed, never background)."""
    if not isinstance(body, dict):
        raise openai_error(400, "the request body must be a JSON object", code="invalid_json")
    check_model(body, model_name, model_aliases)
    try:
        strictjson.check(body, "the request")
    except strictjson.JSONInputError as err:
        raise json_input_error(err) from None
    try:
        return _create(body, limits, model_name, websocket)
    except FieldError as err:
        raise field_error(err) from None


def _create(body: dict[str, Any], limits: Limits, model_name: str, websocket: bool) -> CreateRequest:
    _refuse_unsupported(body)
    max_output = body.get("max_output_tokens")
    max_tokens = params.max_tokens(body, ("max_output_tokens",), limits)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise FieldError('"text" must be an object such as {"format": {"type": "json_schema", ...}}', "text")
    text_format = (text or {}).get("format")
    schema = params.response_format(text_format, "text.format", nested=False)
    use_tools = tools.parse_tools(body.get("tools"), nested=False)
    choice = tools.parse_choice(body.get("tool_choice"), use_tools, nested=False)
    if choice.forced:
        if schema is not None:
            raise FieldError('"text.format" and a forced "tool_choice" exclude each other', "tool_choice")
        schema = tools.call_schema(use_tools, choice)
    sampling = params.sampling_params(body, limits, max_tokens, schema)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise FieldError('"instructions" must be a string (system or developer text)', "instructions")
    previous = _optional_id(body, "previous_response_id")
    store = _flag(body, "store", True)
    background = _flag(body, "background", False)
    stream = _flag(body, "stream", False)
    if websocket:
        if body.get("background"):
            raise FieldError('"background" is not available over WebSocket: use POST /v1/responses', "background")
        stream, background = True, False
    if background and not store:
        raise FieldError('"background": true needs "store": true (a background response is fetched later)', "store")
    truncation = body.get("truncation", "disabled")
    if truncation not in (None, "auto", "disabled"):
        raise FieldError('"truncation" must be "auto" or "disabled"', "truncation")
    items = input_messages(body.get("input"), limits)
    if not items and previous is None:
        raise FieldError('"input" must not be empty (a string, or a list of message items)', "input")
    return CreateRequest(
        input=items,
        params=sampling,
        model=model_name,
        instructions=instructions or None,
        previous_response_id=previous,
        store=store,
        background=background,
        stream=stream,
        max_output_tokens=max_output,
        truncate=truncation == "auto",
        metadata=_metadata(body.get("metadata")),
        stream_id=_optional_id(body, "stream_id") if websocket else None,
        text_format=text_format if schema is not None and not choice.forced else None,
        tools=use_tools if choice.mode != "none" else (),
        tool_choice=choice,
        tools_asked=tuple(body.get("tools") or ()),
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Options that would change what the client gets back and that this server cannot honour yet."""
    reasoning = body.get("reasoning")
    if reasoning not in (None, {}) and not (isinstance(reasoning, dict) and reasoning.get("effort") in (None, "none")):
        raise FieldError('"reasoning" is not supported: the model served does not reason', "reasoning")
    for name in ("conversation", "prompt"):
        if body.get(name) is not None:
            raise FieldError(f'"{name}" is not supported by this server', name)
    if body.get("top_logprobs") not in (None, 0):
        raise FieldError('"top_logprobs" is not supported by this server', "top_logprobs")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(x, str) for x in include)):
        raise FieldError('"include" must be a list of strings', "include")
    if include and "message.output_text.logprobs" in include:  # the others name what this server never makes
        raise FieldError('"include": message.output_text.logprobs is not supported by this server', "include")


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(f'"{name}" must be true or false', name)
    return value


def _optional_id(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise FieldError(f'"{name}" must be a string of 1 to {MAX_ID} characters', name)
    return value


def _metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > 16:
        raise FieldError('"metadata" must be an object of at most 16 string values', "metadata")
    for key, value in raw.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise FieldError('"metadata" keys are at most 64 characters, values strings of at most 512', "metadata")
    return dict(raw)


def input_messages(raw: Any, limits: Limits) -> tuple[ChatMessage, ...]:
    """``input``: a string (one user message), or a list of message items (``{"role", "content"}``, content a
    string or text parts)."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        if not raw:
            raise FieldError('"input" must not be empty', "input")
        return (ChatMessage("user", raw),)
    if not isinstance(raw, list):
        raise FieldError('"input" must be a string or a list of message items', "input")
    if len(raw) > limits.max_messages:
        raise FieldError(f'"input" may hold at most {limits.max_messages} items', "input")
    return tuple(_item(item, f"input[{i}]") for i, item in enumerate(raw))


def _item(item: Any, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise FieldError(f'{where} must be a message item {{"role", "content"}}', where)
    kind = item.get("type", "message")
    if kind == "function_call":  # a call the model made, sent back with its result
        name = item.get("name")
        if not isinstance(name, str) or not isinstance(item.get("arguments", ""), str):
            raise FieldError(f"{where} must have a name and arguments (a JSON string)", where)
        return ChatMessage("assistant", tools.call_text(name, item.get("arguments", "{}")))
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str) or not isinstance(item.get("call_id"), str):
            raise FieldError(f"{where} must have a call_id and an output (a string)", where)
        return ChatMessage("tool", output)
    if kind != "message":
        shown = kind if isinstance(kind, str) and len(kind) <= 40 else "?"
        raise FieldError(
            f"{where}.type {shown!r} is not supported: message, function_call or function_call_output", where
        )
    role = item.get("role")
    if role not in _INPUT_ROLES:
        raise FieldError(f"{where}.role must be one of {', '.join(_INPUT_ROLES)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype not in _TEXT_PARTS:
                what = "images and files are not supported" if ptype in ("input_image", "input_file") else "text only"
                raise FieldError(
                    f'{where}.content[{j}] must be {{"type": "input_text", "text": ...}} ({what})',
                    f"{where}.content[{j}]",
                )
    return ChatMessage(role, params.text_parts(content, where, _TEXT_PARTS))


# -- shapes


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
    )
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(item_id: str, call: ToolCall, status: str, arguments: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if arguments is None else arguments,
        "status": status,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def status_of(reason: FinishReason | None) -> tuple[str, dict[str, str] | None]:
    """A finished generation's response status and ``incomplete_details``."""
    if reason is FinishReason.LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    if reason is FinishReason.CANCELLED:
        return "cancelled", None
    return "completed", None
