"""What a hostile or clumsy client found (issue 10), over real sockets against a real server process: input that
once failed other clients' answers, closed the connection, or crashed a handler. Each test fails on the code
before the fix."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer, serve, serving
from tests.fakes import FakeEngine
from tokenwire.server.admission.http_guard import DISCARD_SECONDS

LONG = {"prompt": "Tell me a story", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

# frames the JSON parser accepts but Python cannot convert, or nests past any use; the field each must name
UNCONVERTIBLE = [
    ('{"type": "generate", "id": "n1", "prompt": "x", "temperature": ' + "9" * 4000 + "}", "temperature"),
    ('{"type": "generate", "id": "n2", "prompt": "x", "batch": {"max_tokens": 1e999}}', "batch.max_tokens"),
    ('{"type": "generate", "id": "n3", "prompt": "x", "top_p": -1e999}', "top_p"),
    ('{"type": "ping", "ts": 1e999}', "ts"),
    ('{"type": "ping", "ts": ' + "[" * 970 + "]" * 970 + "}", None),
]


async def test_extreme_sampling_values_are_refused_and_other_answers_go_on(tiny_server: RunningServer) -> None:
    """temperature or repetition_penalty of 1e-300 (well typed, not samplable) once made the sampler fail every
    generation of its step, for every client. Now they are refused naming the parameter; a generation running
    beside them, on another connection and on the same one, completes."""
    other = await Client.connect(tiny_server.ws)
    c = await Client.connect(tiny_server.ws)
    try:
        await other.send({"type": "generate", "id": "theirs", **LONG})
        await c.send({"type": "generate", "id": "mine", **LONG})
        await other.until(lambda m: m.get("id") == "theirs" and m["type"] == "token")
        for i, (param, value) in enumerate((("temperature", 1e-300), ("repetition_penalty", 1e-300))):
            await c.send({"type": "generate", "id": f"bad{i}", "prompt": "x", param: value})
            err = await c.finish(f"bad{i}")
            assert err["type"] == "error" and err["code"] == "invalid_request" and err["param"] == param
        for client, gen_id in ((other, "theirs"), (c, "mine")):
            done = await client.finish(gen_id)
            assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 400
    finally:
        await c.close()
        await other.close()


async def test_unconvertible_numbers_and_deep_nesting_get_an_error_and_the_connection_stays(
    tiny_server: RunningServer,
) -> None:
    """A 4,000-digit number, 1e999, a ts nested 970 levels: each once closed the socket with 1000 (no error, the
    generations orphaned). Now each is invalid_request naming the field where it can; the connection and the
    generation running on it go on, and a pong never echoes a value that is not JSON."""
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "live", **LONG})
        await c.until(lambda m: m.get("id") == "live" and m["type"] == "token")
        for frame, param in UNCONVERTIBLE:
            await c.send(frame)
            err = await c.until(lambda m: m["type"] in ("error", "pong") and m.get("id") != "live")
            assert err["type"] == "error" and err["code"] == "invalid_request", err
            if param is not None:
                assert err.get("param") == param and param in err["content"], err
        await c.send('{"type": "ping", "ts": 12.5}')
        assert (await c.until(lambda m: m["type"] == "pong"))["ts"] == 12.5
        done = await c.finish("live")
        assert done["type"] == "complete" and done["usage"]["completion_tokens"] == 400
        c.check_sequence("live")
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": ' + "9" * 4000 + "}", "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 1e-300}', "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "metadata": ' + "[" * 970 + "]" * 970 + "}", None),
    ],
)
def test_http_gets_an_openai_400_for_the_same_values(tiny_server: RunningServer, body: str, param: str | None) -> None:
    """Over HTTP the same values once gave a plain-text 500."""
    r = httpx.post(
        tiny_server.http + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=scaled(30),
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def test_realtime_refuses_a_huge_number_with_an_error_event_and_stays_open(tiny_server: RunningServer) -> None:
    """A huge integer in session.update once closed the Realtime socket."""
    async with websockets.connect(tiny_server.ws + "/v1/realtime", open_timeout=scaled(10)) as ws:

        async def next_event() -> dict[str, Any]:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), scaled(10))))

        assert (await next_event())["type"] == "session.created"
        await ws.send('{"type": "session.update", "session": {"type": "realtime", "temperature": ' + "7" * 4000 + "}}")
        err = await next_event()
        assert err["type"] == "error" and err["error"]["code"] == "invalid_request"
        assert err["error"]["param"] == "session.temperature"
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Hi."}}))
        updated = await next_event()
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Hi."


def raw_http(port: int, head: str, body: bytes = b"", read_timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Send a request by hand (a body announced but not all sent, or chunked) and read the status and JSON."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=scaled(read_timeout)) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def test_a_body_over_the_limit_gets_413_without_being_held(tiny_server: RunningServer) -> None:
    """100 MB announced (1 KB sent): 413 at once, past the bound of what is read to be thrown away; a chunked body
    that grows past the limit (the frame limit, 64 KiB here) gets 413 once the rest of it is read and dropped, and
    one whose sender stalls gets it after DISCARD_SECONDS at most. One just under the limit is served."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000000\r\n\r\n"
    )
    status, body = raw_http(tiny_server.port, head, b"{" + b" " * 1023)
    assert status == 413 and body["error"]["code"] == "request_too_large" and "100000000" in body["error"]["message"]
    chunk = b" " * 16384
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    t0 = time.monotonic()
    status, body = raw_http(tiny_server.port, head, chunked + b"0\r\n\r\n")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert time.monotonic() - t0 < scaled(DISCARD_SECONDS / 2)
    status, body = raw_http(tiny_server.port, head, chunked)  # never ends
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert time.monotonic() - t0 < scaled(DISCARD_SECONDS + 3)
    padded = json.dumps({"prompt": "Hi", "max_tokens": 2, "pad": "x" * 60000})
    r = httpx.post(tiny_server.http + "/v1/completions", content=padded, timeout=scaled(30))
    assert r.status_code == 200, r.text


async def test_an_async_client_that_writes_a_40_mb_body_whole_reads_the_413() -> None:
    """httpx's AsyncClient (the openai package's AsyncOpenAI) writes its whole body before it reads: 40 MB to a
    server with a 1 MiB limit once got a reset connection every time, never the 413. Now the rest of the body is
    read and thrown away first: the client reads the 413 and its message, with a Content-Length and chunked."""
    engine = FakeEngine()
    payload = b'{"prompt": "' + b"x" * (40 << 20) + b'"}'

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    async with serving(engine) as (base, _), httpx.AsyncClient(base_url=base, timeout=scaled(60)) as http:
        for content in (payload, payload, pieces()):
            r = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413
            error = r.json()["error"]
            assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]
        assert (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code == 200


def test_a_cross_site_form_post_is_refused_but_curl_d_works(tiny_server: RunningServer) -> None:
    """A page elsewhere can make a browser post text/plain or a form to 127.0.0.1 without asking first: with a
    foreign Origin (or null) such a body is refused with 403. curl -d sends a form body without an Origin: served.
    A JSON body from another origin needs a preflight, which browsers send first; it is served to non-browsers."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 2})
    url = tiny_server.http + "/v1/completions"
    for origin in ("https://evil.example", "null", "http://evil.example@localhost"):
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = httpx.post(url, content=body, headers={"content-type": kind, "origin": origin}, timeout=scaled(30))
            assert r.status_code == 403, (origin, kind, r.text)
            assert r.json()["error"]["code"] == "forbidden_origin"
    curl = {"content-type": "application/x-www-form-urlencoded"}
    assert httpx.post(url, content=body, headers=curl, timeout=scaled(30)).status_code == 200
    local = {"content-type": "text/plain", "origin": "http://localhost:3000"}
    assert httpx.post(url, content=body, headers=local, timeout=scaled(30)).status_code == 200
    own = {"content-type": "text/plain", "origin": tiny_server.http}
    assert httpx.post(url, content=body, headers=own, timeout=scaled(30)).status_code == 200
    foreign_json = {"content-type": "application/json", "origin": "https://evil.example"}
    assert httpx.post(url, content=body, headers=foreign_json, timeout=scaled(30)).status_code == 200


async def test_huge_prompts_do_not_stall_the_streams_already_running(tiny_long_model_dir: Path) -> None:
    """4 MB prompts (a server allowing 8 MB frames) once stalled every stream while the model thread tokenized
    them. A prompt that cannot fit is refused before any tokenizer time, and tokenizing happens off the model
    thread: a live stream's longest pause between tokens stays far below a second."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--max-message-bytes", "8000000") as server:
        live = await Client.connect(server.ws)
        flood = await Client.connect(server.ws)
        try:
            await live.send({"type": "generate", "id": "live", **{**LONG, "max_tokens": 2000}})
            await live.until(lambda m: m.get("id") == "live" and m["type"] == "token")
            arrivals: list[float] = []

            async def watch() -> None:
                while True:
                    msg = await live.recv()
                    arrivals.append(time.monotonic())
                    if msg.get("type") == "complete":
                        return

            watcher = asyncio.create_task(watch())
            for i in range(3):
                await flood.send({"type": "generate", "id": f"big{i}", "prompt": "word " * 800_000})
                err = await flood.finish(f"big{i}")
                assert err["type"] == "error" and err["code"] == "prompt_too_long"
            await asyncio.wait_for(watcher, scaled(120))
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert len(arrivals) > 100 and max(gaps) < 0.5, max(gaps)
        finally:
            await live.close()
            await flood.close()


async def test_sigterm_ends_http_requests_with_an_error_never_a_cut(tiny_long_model_dir: Path) -> None:
    """On SIGTERM an SSE stream in flight once just stopped (no error event, no [DONE]) and a non-streaming request
    got a plain-text 500. Now the stream ends with an error event of code shutting_down, then data: [DONE]; the
    non-streaming request gets an OpenAI-shaped 503 of that code, when the drain timeout ends them."""
    with serve("--model", str(tiny_long_model_dir), "--device", "cpu", "--drain-timeout", "0.5") as server:
        body = {"prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=server.http, timeout=scaled(60)) as http:
            plain = asyncio.create_task(http.post("/v1/completions", json=body))
            lines: list[str] = []
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and not lines:
                        server.proc.terminate()
                    if line:
                        lines.append(line)
            answer = await plain
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))
        assert error["error"]["code"] == "shutting_down"
        assert all(json.loads(x[6:])["choices"][0]["text"] is not None for x in lines[:-2] if x.startswith("data: "))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(timeout=scaled(20)) in (0, -signal.SIGTERM)


async def test_with_descriptors_short_connections_are_refused_in_words_and_health_answers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With an open-file limit of 200, 260 WebSockets once exhausted the process: connections reset, /health
    refused, nothing logged. Now the server caps connections below the limit: the extra sockets get an overloaded
    error and close code 1013, /health and /ready still answer, one log line says why, and one says when it is over."""
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    log_path = tmp_path / "server.log"
    with serve(
        "--model", str(tiny_model_dir), "--device", "cpu", "--log-level", "info", log_path=log_path, preexec=low_limit
    ) as server:
        opened: list[Any] = []
        refusals = 0
        try:
            for _ in range(260):
                ws = await websockets.connect(server.ws + "/ws", open_timeout=scaled(10))
                first = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
                if first["type"] == "hello":
                    opened.append(ws)
                    continue
                assert first["type"] == "error" and first["code"] == "overloaded"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), scaled(10))
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
                refusals += 1
            assert 50 < len(opened) < 200 and refusals == 260 - len(opened)
            async with httpx.AsyncClient(base_url=server.http, timeout=scaled(10)) as http:
                assert (await http.get("/health")).status_code == 200
                assert (await http.get("/ready")).status_code == 200
                full = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
        finally:
            for ws in opened:
                await ws.close()
        for _ in range(int(scaled(100))):
            if "below the connection limit again" in log_path.read_text():
                break
            await asyncio.sleep(0.05)
        text = log_path.read_text()
        assert text.count("connection limit reached") == 1 and text.count("below the connection limit again") == 1
        async with httpx.AsyncClient(base_url=server.http, timeout=scaled(10)) as http:
            assert (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code == 200
