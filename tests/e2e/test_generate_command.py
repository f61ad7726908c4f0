"""``tokenwire generate``: one answer to stdout, usable in pipes; errors on stderr with an exit code per kind."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys

from tests.conftest import scaled, wait_until
from tests.e2e.server import RunningServer, free_port, serving
from tests.fakes import FakeEngine
from tokenwire.client import Client
from tokenwire.server.admission.auth import AuthPolicy

TOKENWIRE = f"{shlex.quote(sys.executable)} -m tokenwire.cli"


async def shell(command: str, stdin: str | None = None, **env: str) -> tuple[int, str, str]:
    """Run ``command`` in bash (``tokenwire`` is this checkout's); exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", f"tokenwire() {{ {TOKENWIRE} \"$@\"; }}; {command}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKENWIRE_URL": "", "TOKENWIRE_API_KEY": "", **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), scaled(60))
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def ws(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def test_the_answer_streams_to_stdout_as_the_real_model_writes_it(tiny_server: RunningServer) -> None:
    async with Client(tiny_server.ws + "/ws") as client:
        expected = await client.generate("Hi there", max_tokens=12, temperature=0).collect()
    code, out, err = await shell(
        f"tokenwire generate 'Hi there' --url {tiny_server.ws}/ws --max-tokens 12 --temperature 0"
    )
    assert (code, err) == (0, "")
    assert out == expected + ("" if expected.endswith("\n") else "\n")


async def test_a_dash_reads_the_prompt_from_stdin_in_a_pipe() -> None:
    engine = FakeEngine(reply="one two three", pieces=3)
    async with serving(engine) as (base, _):
        code, out, err = await shell(f"echo 'Count to three' | tokenwire generate - --url {ws(base)} | wc -w")
    assert (code, out.strip(), err) == (0, "3", "")
    assert engine.requests[0].prompt == "Count to three\n"  # as read: a prompt is one user turn


async def test_the_url_and_the_key_come_from_the_environment_and_system_becomes_a_message() -> None:
    engine = FakeEngine(reply="ok")
    async with serving(engine, auth=AuthPolicy(api_keys=("k1",))) as (base, _):
        code, out, _ = await shell(
            "tokenwire generate 'Hi' --system 'Be brief' --seed 7 --stop END",
            TOKENWIRE_URL=ws(base),
            TOKENWIRE_API_KEY="k1",
        )
    assert (code, out) == (0, "ok\n")
    request = engine.requests[0]
    assert request.messages is not None and [m.role for m in request.messages] == ["system", "user"]
    assert request.params.seed == 7 and request.params.stop == ("END",)


async def test_json_prints_one_object_per_message() -> None:
    async with serving(FakeEngine(reply="Hello, world!", pieces=3)) as (base, _):
        code, out, _ = await shell(f"tokenwire generate Hi --json --url {ws(base)}")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [m["type"] for m in lines] == ["started", "token", "token", "token", "token", "complete"][: len(lines)]
    assert lines[0]["type"] == "started" and lines[0]["prompt_tokens"] == 7 and lines[-1]["type"] == "complete"
    assert "".join(m["content"] for m in lines if m["type"] == "token") == "Hello, world!"
    assert [m["seq"] for m in lines if m["type"] == "token"] == list(range(1, len(lines) - 1))
    assert lines[-1]["finish_reason"] == "stop" and lines[-1]["usage"]["prompt_tokens"] == 7
    assert lines[-1]["timings"]["tokens_per_second"] == 100.0


async def test_no_server_exits_3_with_the_reason_on_stderr() -> None:
    code, out, err = await shell(f"tokenwire generate Hi --url ws://127.0.0.1:{free_port()}/ws")
    assert (code, out) == (3, "")
    assert err.startswith("tokenwire generate: error: connection_failed: cannot connect to ws://127.0.0.1:")


async def test_a_missing_or_wrong_key_exits_4() -> None:
    async with serving(FakeEngine(), auth=AuthPolicy(api_keys=("k1",))) as (base, _):
        for flags in ("", "--api-key wrong"):
            code, out, err = await shell(f"tokenwire generate Hi --url {ws(base)} {flags}")
            assert (code, out) == (4, "") and "unauthorized" in err and "--api-key" in err


async def test_an_invalid_parameter_exits_1_naming_it() -> None:
    async with serving(FakeEngine()) as (base, _):
        code, out, err = await shell(f"tokenwire generate Hi --url {ws(base)} --temperature 99")
    assert (code, out) == (1, "")
    assert err.startswith("tokenwire generate: error: invalid_request:") and "(param: temperature)" in err


async def test_the_url_the_server_prints_works_too() -> None:
    """The ready line names http://HOST:PORT/ (the chat page); that, or a bare HOST:PORT, reaches the protocol."""
    async with serving(FakeEngine(reply="Hi.")) as (base, _):
        for url in (base, base + "/", base.removeprefix("http://")):
            code, out, err = await shell(f"tokenwire generate Hi --url {url}")
            assert (code, out, err) == (0, "Hi.\n", ""), url
    code, _, err = await shell("tokenwire generate Hi --url ftp://example.com")
    assert code == 2 and "'ftp://example.com' is not a server address" in err


async def test_bad_arguments_and_an_empty_prompt_exit_2() -> None:
    code, _, err = await shell("tokenwire generate")
    assert code == 2 and "prompt" in err
    code, _, err = await shell("tokenwire generate - < /dev/null")
    assert code == 2 and "the prompt is empty" in err


async def test_ctrl_c_cancels_the_answer_on_the_server_and_exits_130() -> None:
    engine = FakeEngine(reply=" ".join(f"w{i}" for i in range(400)), pieces=400, delay=0.02)
    async with serving(engine) as (base, _):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenwire.cli", "generate", "Count", "--url", ws(base),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.read(10), scaled(30))).startswith(b"w0")  # it streams
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), scaled(30))
        assert proc.returncode == 130 and b"interrupted" in err and b"w399" not in out
        await wait_until(lambda: len(engine.aborted | engine.closed_early) == 1)  # stopped on the server
