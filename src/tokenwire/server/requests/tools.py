"""Tool (function) calls for models whose chat template has no tool format: the fallback every door uses.

The tools are described in a system message, with one call format: the answer is either text, or exactly one
JSON object ``{"name": "<tool>", "arguments": {...}}``. With ``tool_choice`` ``required`` or a named function,
constrained decoding enforces that format (the arguments valid against the function's ``parameters``), so even a
small model emits a call that validates; with ``auto`` the model chooses, and an answer that parses as a call to a
known tool is a call. A call and its result go back into the conversation as an assistant message holding the
call's JSON and a ``tool`` message holding the result. Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from tokenwire.server.requests import params
from tokenwire.server.requests.params import FieldError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True, frozen=True)
class ToolChoice:
    """``none``, ``auto``, ``required``, or one function by ``name``."""

    mode: str
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(slots=True, frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def with_id(self) -> ToolCall:
        return ToolCall(self.name, self.arguments, self.id or f"call_{secrets.token_hex(12)}")


def parse_tools(raw: Any, nested: bool) -> tuple[Tool, ...]:
    """``tools``: chat completions nest each function (``{"type": "function", "function": {...}}``, ``nested``);
    Responses keeps it flat (``{"type": "function", "name", "parameters"}``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise FieldError(f'"tools" must be a list of at most {MAX_TOOLS} functions', "tools")
    out: list[Tool] = []
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict) or item.get("type") != "function":
            raise FieldError(f'{where} must be {{"type": "function", ...}}: only function tools are supported', where)
        fn = item.get("function") if nested else item
        if nested:
            where += ".function"
        if not isinstance(fn, dict):
            raise FieldError(f"{where} must be an object with a name and parameters", where)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise FieldError(f"{where}.name must be 1 to 64 letters, digits, _ or -", f"{where}.name")
        if any(t.name == name for t in out):
            raise FieldError(f"{where}.name {name!r} is given twice", f"{where}.name")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise FieldError(f"{where}.description must be a string", f"{where}.description")
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        params.json_schema(schema, f"{where}.parameters")  # enforceable, or refused by name
        out.append(Tool(name, description, schema))
    return tuple(out)


def parse_choice(raw: Any, tools: tuple[Tool, ...], nested: bool) -> ToolChoice:
    """``tool_choice``: "none", "auto" (the default with tools), "required", or one function."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("none", "auto", "required"):
        if raw != "none" and not tools:
            raise FieldError(f'"tool_choice": "{raw}" needs "tools"', "tool_choice")
        return ToolChoice(str(raw))
    if isinstance(raw, dict) and raw.get("type") == "function":
        holder = raw.get("function") if nested else raw
        name = holder.get("name") if isinstance(holder, dict) else None
        if not any(t.name == name for t in tools):
            raise FieldError(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return ToolChoice("function", str(name))
    raise FieldError('"tool_choice" must be "none", "auto", "required" or {"type": "function", ...}', "tool_choice")


def system_text(tools: tuple[Tool, ...], choice: ToolChoice) -> str:
    """The tools as the model reads them (a system message)."""
    lines = ["You can call these tools (functions):"]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}))
    lines.append(
        'To call a tool, answer with only one JSON object: {"name": "<tool name>", "arguments": {<the arguments>}}. '
        "Tool results come back in messages from the tool."
    )
    if choice.mode == "auto":
        lines.append("If no tool is needed, answer in plain text.")
    elif choice.mode == "function":
        lines.append(f"Call the tool {choice.name} now.")
    else:
        lines.append("Call one of the tools now.")
    return "\n".join(lines)


def for_template(tools: tuple[Tool, ...]) -> tuple[str, ...]:
    """The tools as a chat template with a tool format reads them (one JSON text each)."""
    return tuple(
        json.dumps(
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            },
            ensure_ascii=False,
        )
        for t in tools
    )


def call_schema(tools: tuple[Tool, ...], choice: ToolChoice) -> str:
    """The JSON Schema of a call that ``choice`` forces (``required``: any tool; a function: that one)."""
    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def parse_call(text: str, tools: tuple[Tool, ...]) -> ToolCall | None:
    """The call an answer holds: one JSON object naming a known tool, with object arguments; else None (text)."""
    stripped = text.strip()
    if stripped.startswith(TAG_OPEN):
        stripped = stripped.removeprefix(TAG_OPEN).removesuffix(TAG_CLOSE).strip()
    if not stripped.startswith("{"):
        return None
    try:
        obj = json.loads(stripped)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not any(t.name == obj.get("name") for t in tools):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(str(obj["name"]), json.dumps(arguments, ensure_ascii=False)).with_id()


def call_text(name: str, arguments: Any) -> str:
    """A call as the model wrote it, for the conversation (an assistant turn)."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # arguments that are not JSON stay the string they are
            arguments = json.loads(arguments)
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


_WS = " \t\r\n"
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"  # Hermes-style templates (Qwen and others) wrap calls so
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(slots=True)
class CallStream:
    """Reads an answer as it streams and tells, as soon as it can, whether it is a call; a call's name comes out
    once it is complete and its arguments piece by piece, as generated (the JSON text of the arguments object,
    without the call's closing brace). An answer that cannot be a call comes out as text.

    ``feed`` returns what is known after each delta: ``("text", s)``, ``("name", s)`` or ``("arguments", s)``."""

    tools: tuple[Tool, ...]
    state: str = "undecided"  # then "call" (arguments streaming), "text", or "done" (the arguments ended)
    buf: str = ""
    name: str | None = None
    arguments: list[str] | None = None
    call_id: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _started: bool = False  # the arguments' first non-space character was seen

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self.state == "text":
            return [("text", text)]
        if self.state == "done":
            return []  # the call's closing brace and whitespace
        if self.state == "call":
            return self._arguments(text)
        self.buf += text
        head = _call_head(self.buf)
        if head is None:  # cannot be a call
            self.state = "text"
            return [("text", self.buf)]
        if head is True:  # may still become one
            return []
        name, end = head
        if not any(t.name == name for t in self.tools):
            self.state = "text"
            return [("text", self.buf)]
        self.state, self.name, self.arguments = "call", name, []
        self.call_id = f"call_{secrets.token_hex(12)}"
        return [("name", name), *self._arguments(self.buf[end:])]

    def finish(self) -> list[tuple[str, str]]:
        """The answer ended: what was held back comes out as text if it never became a call."""
        if self.state == "undecided" and self.buf:
            self.state = "text"
            return [("text", self.buf)]
        return []

    @property
    def is_call(self) -> bool:
        return self.name is not None

    def call(self) -> ToolCall | None:
        if self.name is None or self.arguments is None:
            return None
        return ToolCall(self.name, "".join(self.arguments), self.call_id)

    def _arguments(self, text: str) -> list[tuple[str, str]]:
        """Pass the arguments' characters on until their object closes (the rest is the call's closing brace)."""
        assert self.arguments is not None
        out = []
        for ch in text:
            if not self._started:
                if ch in _WS:
                    continue
                self._started = True
            out.append(ch)
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.state = "done"
                    break
        piece = "".join(out)
        if not piece:
            return []
        self.arguments.append(piece)
        return [("arguments", piece)]


def _call_head(buf: str) -> tuple[str, int] | Literal[True] | None:
    """How ``buf`` begins: ``(name, end)`` once ``{"name": "<name>", "arguments":`` is complete (``end`` is where
    the arguments start); True while it may still become that; None when it cannot."""
    i = 0
    n = len(buf)

    def skip(j: int) -> int:
        while j < n and buf[j] in _WS:
            j += 1
        return j

    def literal(j: int, word: str) -> int | Literal[True] | None:
        """Index after ``word`` at j; True if buf ends inside it; None if it differs."""
        part = buf[j : j + len(word)]
        if not word.startswith(part):
            return None
        return j + len(word) if len(part) == len(word) else True

    i = skip(i)
    if buf[i : i + 1] == "<":  # a chat template's own format may wrap the call: <tool_call>{...}</tool_call>
        got = literal(i, TAG_OPEN)
        if got is None or got is True:
            return got
        i = skip(got)
    for step in ("{", '"name"', ":"):
        got = literal(i, step)
        if got is None or got is True:
            return got
        i = skip(got)
    if i >= n:
        return True
    if buf[i] != '"':
        return None
    close = buf.find('"', i + 1)
    if close < 0:
        return True if len(buf) - i <= 66 else None
    name = buf[i + 1 : close]
    i = skip(close + 1)
    got = literal(i, ",")
    if got is None or got is True:
        return got
    i = skip(got)
    for key in _ARGUMENT_KEYS:
        got = literal(i, f'"{key}"')
        if got is True:
            return True
        if got is not None:
            break
    else:
        return None
    i = skip(got)
    got = literal(i, ":")
    if got is None or got is True:
        return got
    return name, got
