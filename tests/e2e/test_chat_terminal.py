"""``tokenwire chat`` driven in a pseudo-terminal as a person would: type, read the screen, press Ctrl+C."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.conftest import wait_until
from tests.e2e.server import free_port, serving
from tests.e2e.terminal import Terminal
from tests.fakes import FakeEngine
from tokenwire.server.admission.auth import AuthPolicy


def chat(base: str, *flags: str) -> Terminal:
    url = base.replace("http://", "ws://") + "/ws"
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENWIRE_URL", "TOKENWIRE_API_KEY")}
    return Terminal([sys.executable, "-m", "tokenwire.cli", "chat", "--url", url, *flags], env)


def roles(engine: FakeEngine, index: int = -1) -> list[tuple[str, str]]:
    messages = engine.requests[index].messages or ()
    return [(m.role, str(m.content)) for m in messages]


async def drop_every_socket(state: Any) -> None:
    for conn in list(state.connections):
        await conn.ws.close(1012)


async def test_a_conversation_streams_markdown_and_ctrl_c_stops_only_the_answer(tmp_path: Path) -> None:
    engine = FakeEngine(reply="The capital is **Paris**.", pieces=5)
    async with serving(engine) as (base, _):
        term = chat(base)
        try:
            await term.expect("fake-model · /help for commands, Ctrl+D to quit")
            term.type("What is the capital of France?\r")
            screen = await term.expect("tok/s")
            assert "The capital is Paris." in screen and "**" not in screen  # Markdown, rendered
            assert "TTFT" in screen and "tokens" in screen
            assert roles(engine) == [("user", "What is the capital of France?")]

            # a long answer, stopped with Ctrl+C: the program goes on, the server stopped it
            engine.reply, engine.pieces, engine.delay = " ".join(f"w{i}" for i in range(400)), 400, 0.02
            term.type("Tell me more\r")
            await term.expect("w5 ")
            term.type("\x03")
            await wait_until(lambda: len(engine.closed_early) + len(engine.aborted) >= 1)
            await term.expect("stopped")
            assert "w399" not in term.text

            # the conversation is kept, commands change what the next question sends
            engine.reply, engine.pieces, engine.delay = "Sure.", 1, 0.0
            term.type("/temp 0.2\r")
            await term.expect("temperature 0.2")
            term.type("/system Be terse.\r")
            await term.expect("system message: Be terse.")
            term.type("Again\r")
            await term.expect("Sure.")
            sent = roles(engine)
            assert sent[0] == ("system", "Be terse.") and sent[1:3] == [
                ("user", "What is the capital of France?"), ("assistant", "The capital is **Paris**."),
            ]  # fmt: skip
            assert sent[3][0] == "user" and sent[3][1] == "Tell me more" and sent[-1] == ("user", "Again")
            assert sent[4][0] == "assistant" and sent[4][1].startswith("w0 w1")  # what was written before Ctrl+C
            assert engine.requests[-1].params.temperature == 0.2

            saved = tmp_path / "chat.json"
            term.type(f"/save {saved}\r")
            await term.expect("saved 6 messages")
            record = json.loads(saved.read_text())
            assert record["messages"][-1] == {"role": "assistant", "content": "Sure."}
            assert record["system"] == "Be terse." and record["temperature"] == 0.2

            term.type("/reset\r")
            await term.expect("conversation cleared")
            term.type("Hello\r")
            await wait_until(lambda: roles(engine)[-1] == ("user", "Hello"))
            assert roles(engine) == [("system", "Be terse."), ("user", "Hello")]
            await term.expect("Sure.")
            term.type("\x04")  # Ctrl+D at the prompt leaves
            assert await term.exit_code() == 0
        finally:
            term.kill()


async def test_a_dropped_connection_mid_answer_is_resumed_and_the_answer_completes() -> None:
    reply = " ".join(f"w{i}" for i in range(150))
    engine = FakeEngine(reply=reply, pieces=150, delay=0.02)
    async with serving(engine) as (base, state):
        term = chat(base)
        try:
            await term.expect("Ctrl+D to quit")
            term.type("Count\r")
            await term.expect("w10 ")
            await drop_every_socket(state)
            screen = await term.expect("tok/s")
            assert "w149" in screen and "stopped" not in screen
            assert len(engine.requests) == 1 and not engine.aborted
        finally:
            term.kill()


async def test_an_error_is_shown_and_the_chat_goes_on() -> None:
    async with serving(FakeEngine(reply="fine")) as (base, _):
        term = chat(base, "--temperature", "99")
        try:
            await term.expect("Ctrl+D to quit")
            term.type("Hi\r")
            await term.expect("error: invalid_request")
            term.type("/temp 0\r")
            term.type("Hi\r")
            await term.expect("fine")
            term.type("/exit\r")
            assert await term.exit_code() == 0
        finally:
            term.kill()


async def test_a_refused_key_or_no_server_ends_the_chat_with_its_exit_code() -> None:
    async with serving(FakeEngine(), auth=AuthPolicy(api_keys=("k1",))) as (base, _):
        term = chat(base, "--api-key", "wrong")
        try:
            await term.expect("unauthorized")
            assert "--api-key" in term.text and await term.exit_code() == 4
        finally:
            term.kill()
        term = chat(base, "--api-key", "k1")
        try:
            await term.expect("Ctrl+D to quit")
            term.type("\x04")
            assert await term.exit_code() == 0
        finally:
            term.kill()
    term = chat(f"http://127.0.0.1:{free_port()}")
    try:
        await term.expect("cannot connect")
        assert await term.exit_code() == 3
    finally:
        term.kill()
