"""``tokenwire chat``: a conversation with a running server in the terminal.

Answers stream in as Markdown (rendered by ``rich``); the conversation is kept and sent whole each turn. Ctrl+C
stops the answer being written (not the program); Ctrl+D or ``/exit`` leaves. A dropped connection mid-answer
is resumed by the client, and the answer goes on where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from tokenwire.client import (
    ConnectionFailed,
    ConnectionState,
    SyncClient,
    SyncGeneration,
    TokenwireError,
    Unauthorized,
)
from tokenwire.commands.common import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_UNAUTHORIZED,
    add_connection_flags,
)

HELP = """\
Commands:
  /reset          forget the conversation
  /system TEXT    set the system message (/system alone clears it)
  /temp X         set the temperature (0 is greedy)
  /save FILE      write the conversation to FILE as JSON
  /help           this list
  /exit           leave (or Ctrl+D)
Ctrl+C stops the answer being written."""


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "chat",
        help="chat with a running server in the terminal",
        description="Chat with a running tokenwire server in the terminal. " + HELP.replace("\n", " "),
    )
    add_connection_flags(parser)
    parser.add_argument("--system", default="", help="the system message")
    parser.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7; 0 is greedy)")
    parser.add_argument("--max-tokens", type=int, default=None, help="per answer (server default: 256)")


@dataclass(slots=True)
class Conversation:
    system: str = ""
    temperature: float = 0.7
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


class AnswerView:
    """What the live display shows while an answer streams: its Markdown, and a note on the connection.
    Rendered by rich's refresh thread, so a note set from the client's thread shows without a new token."""

    def __init__(self) -> None:
        self.text = ""
        self.note = ""

    def __rich__(self) -> RenderableType:
        body = Markdown(self.text)
        return Group(body, Text(self.note, style="dim italic")) if self.note else body


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    view = AnswerView()

    def on_state(state: ConnectionState) -> None:
        view.note = "connection lost; resuming…" if state is ConnectionState.RECONNECTING else ""

    def on_notice(msg: Any) -> None:
        console.print(Text(f"[{msg.get('level', 'info')}] {msg.get('content', '')}", style="yellow"))

    client = SyncClient(args.url, api_key=args.api_key, on_state=on_state, on_notice=on_notice)
    try:
        hello = client.connect()
    except Unauthorized as exc:
        console.print(Text(f"tokenwire chat: {exc} (give the key with --api-key or TOKENWIRE_API_KEY)", style="red"))
        client.close()
        return EXIT_UNAUTHORIZED
    except ConnectionFailed as exc:
        console.print(Text(f"tokenwire chat: {exc}", style="red"))
        client.close()
        return EXIT_CONNECTION
    chat = Conversation(system=args.system, temperature=args.temperature)
    console.print(Text.assemble(("tokenwire chat", "bold"), f" · {hello.model} · /help for commands, Ctrl+D to quit"))
    try:
        while True:
            try:
                line = console.input(Text("> ", style="bold green"))
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                console.print()
                continue
            if line.startswith("/"):
                if not command(line, chat, console):
                    break
            elif line.strip():
                answer(client, chat, line, args.max_tokens, console, view)
    finally:
        client.close()
    return EXIT_OK


def command(line: str, chat: Conversation, console: Console) -> bool:
    """Run a /command; False to leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        chat.turns.clear()
        console.print(Text("conversation cleared", style="dim"))
    elif name == "/system":
        chat.system = rest
        console.print(Text(f"system message: {rest}" if rest else "system message cleared", style="dim"))
    elif name == "/temp":
        try:
            chat.temperature = float(rest)
        except ValueError:
            console.print(Text(f"/temp needs a number, not {rest!r}", style="red"))
        else:
            console.print(Text(f"temperature {chat.temperature:g}", style="dim"))
    elif name == "/save":
        if not rest:
            console.print(Text("/save needs a file name", style="red"))
            return True
        record = {"system": chat.system, "temperature": chat.temperature, "messages": chat.messages()}
        try:
            Path(rest).expanduser().write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            console.print(Text(f"could not save: {exc}", style="red"))
        else:
            console.print(Text(f"saved {len(chat.turns)} messages to {rest}", style="dim"))
    elif name == "/help":
        console.print(HELP)
    else:
        console.print(Text(f"unknown command {name}; /help lists them", style="red"))
    return True


def answer(
    client: SyncClient, chat: Conversation, question: str, max_tokens: int | None, console: Console, view: AnswerView
) -> None:
    """Stream one answer; Ctrl+C stops it (the client cancels it on the server). A figures line follows."""
    chat.turns.append({"role": "user", "content": question})
    params: dict[str, Any] = {"temperature": chat.temperature}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    gen = client.generate(messages=chat.messages(), **params)
    view.text, view.note = "", ""
    sent = time.monotonic()
    first: float | None = None
    tokens = 0
    error: TokenwireError | None = None
    deltas = iter(gen)
    with Live(view, console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        try:
            for delta in deltas:
                first = first or time.monotonic()
                tokens += delta.tokens
                view.text = gen.text
                live.refresh()
        except KeyboardInterrupt:
            pass  # stopped: leaving the loop cancels the answer
        except TokenwireError as exc:
            error = exc
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                deltas.close()  # cancels on the server unless the answer ended by itself
            view.text, view.note = gen.text, ""
            live.refresh()
    if error is not None:
        chat.turns.pop()  # the question is not kept: type it again, or another
        console.print(Text(f"error: {error}", style="red"))
        return
    if gen.text:
        chat.turns.append({"role": "assistant", "content": gen.text})
    else:
        chat.turns.pop()
    console.print(Text(figures(gen, sent, first, tokens), style="dim"))


def figures(gen: SyncGeneration, sent: float, first: float | None, tokens: int) -> str:
    parts = []
    if first is not None:
        parts.append(f"TTFT {(first - sent) * 1000:.0f} ms")
    if gen.timings and gen.timings.tokens_per_second:
        parts.append(f"{gen.timings.tokens_per_second:.1f} tok/s")
    elif first is not None and tokens > 1:
        parts.append(f"{(tokens - 1) / max(1e-6, time.monotonic() - first):.1f} tok/s")
    parts.append(f"{gen.usage.completion_tokens if gen.usage else tokens} tokens")
    if gen.finish_reason is None or str(gen.finish_reason) == "cancelled":
        parts.append("stopped")
    elif str(gen.finish_reason) == "length":
        parts.append("max tokens reached")
    return " · ".join(parts)
