"""API keys and origin checks on a real server started with --api-key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.browser import ARGS, require_chromium
from tests.e2e.server import RunningServer, serve, serving
from tests.fakes import FakeEngine
from tokenwire.server.admission.auth import AuthPolicy

KEY = "test-key-123"


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth") / "server.log"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, log_path: Path) -> Iterator[RunningServer]:
    args = ("--model", str(tiny_model_dir), "--api-key", f"{KEY},second-key", "--log-level", "info")
    with serve(*args, log_path=log_path) as server:
        yield server


def test_http_needs_a_valid_key(keyed_server: RunningServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 3}
    url = keyed_server.http + "/v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    for key in (KEY, "second-key"):
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    assert httpx.get(keyed_server.http + "/v1/models").status_code == 401
    assert httpx.get(keyed_server.http + "/health").status_code == 200  # probes need no key
    assert httpx.get(keyed_server.http + "/ready").status_code == 200


def test_openai_client_with_and_without_the_key(keyed_server: RunningServer) -> None:
    good = openai.OpenAI(base_url=keyed_server.http + "/v1", api_key=KEY, max_retries=0)
    model = good.models.list().data[0].id
    assert good.completions.create(model=model, prompt="Hi", max_tokens=3).usage is not None
    bad = openai.OpenAI(base_url=keyed_server.http + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good.close()
    bad.close()


async def ws_hello(url: str, **kw: object) -> tuple[dict[str, object], object]:
    async with websockets.connect(url, open_timeout=scaled(10), **kw) as ws:  # type: ignore[arg-type]
        first = json.loads(await ws.recv())
        if first["type"] == "unauthorized" or first["type"] == "error":
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return first, info.value.rcvd.code if info.value.rcvd else None
        return first, ws.subprotocol


async def test_websocket_without_a_key_gets_unauthorized_and_1008(keyed_server: RunningServer) -> None:
    first, code = await ws_hello(keyed_server.ws + "/ws")
    assert first["type"] == "error" and first["code"] == "unauthorized" and code == 1008
    first, code = await ws_hello(keyed_server.ws + "/ws?api_key=wrong")
    assert first["code"] == "unauthorized" and code == 1008


async def test_websocket_key_as_header_subprotocol_or_query(keyed_server: RunningServer) -> None:
    first, _ = await ws_hello(keyed_server.ws + "/ws", additional_headers={"Authorization": f"Bearer {KEY}"})
    assert first["type"] == "hello"
    first, proto = await ws_hello(keyed_server.ws + "/ws", subprotocols=[f"bearer.{KEY}"])
    assert first["type"] == "hello" and proto == f"bearer.{KEY}"  # echoed, as browsers require
    first, _ = await ws_hello(keyed_server.ws + f"/ws?api_key={KEY}")
    assert first["type"] == "hello"


async def test_websocket_from_a_foreign_origin_is_refused(keyed_server: RunningServer) -> None:
    first, code = await ws_hello(keyed_server.ws + f"/ws?api_key={KEY}", origin="https://evil.example")
    assert first["code"] == "unauthorized" and "origin" in str(first["content"]) and code == 1008
    first, _ = await ws_hello(keyed_server.ws + f"/ws?api_key={KEY}", origin="http://localhost:3000")
    assert first["type"] == "hello"


async def test_an_origin_with_user_info_is_not_a_local_page(keyed_server: RunningServer) -> None:
    """ "http://evil.example@localhost" once passed as localhost; origins are compared parsed, not as text. The
    tutorial's file page (Origin null) and its localhost page on the server's port stay allowed."""
    first, code = await ws_hello(keyed_server.ws + f"/ws?api_key={KEY}", origin="http://evil.example@localhost")
    assert first["code"] == "unauthorized" and code == 1008
    for origin in ("null", f"http://localhost:{keyed_server.port}", f"http://127.0.0.1:{keyed_server.port}"):
        first, _ = await ws_hello(keyed_server.ws + f"/ws?api_key={KEY}", origin=origin)
        assert first["type"] == "hello", origin


async def test_null_origin_can_be_refused() -> None:
    """--null-origin refuse: pages opened from files (and sandboxed frames) may not open a WebSocket."""
    async with serving(FakeEngine(), auth=AuthPolicy(null_origin=False)) as (base, _):
        ws_url = base.replace("http", "ws", 1)
        first, code = await ws_hello(ws_url + "/ws", origin="null")
        assert first["code"] == "unauthorized" and code == 1008
        first, _ = await ws_hello(ws_url + "/ws")
        assert first["type"] == "hello"


async def test_a_percent_encoded_key_name_authenticates_and_is_redacted(keyed_server: RunningServer) -> None:
    first, _ = await ws_hello(keyed_server.ws + f"/ws?api%5Fkey={KEY}")
    assert first["type"] == "hello"  # the query name decodes to api_key


def test_the_key_never_reaches_the_logs(keyed_server: RunningServer, log_path: Path) -> None:
    text = log_path.read_text()
    assert "api_key=[redacted]" in text  # the query-string connections above were logged, redacted
    assert "api%5Fkey=[redacted]" in text
    assert KEY not in text and "second-key" not in text


async def test_chat_page_asks_for_the_key_and_then_works(keyed_server: RunningServer) -> None:
    from playwright.async_api import async_playwright

    chromium = require_chromium()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = await browser.new_page()
            await page.goto(keyed_server.http + "/")
            await page.wait_for_selector("#key-form:not([hidden])", timeout=scaled(10) * 1000)
            assert await page.text_content("#conn") == "API key needed"
            await page.fill("#api-key", KEY)
            await page.press("#api-key", "Enter")
            await page.wait_for_selector('#conn[data-state="open"]', timeout=scaled(10) * 1000)
            await page.fill("#prompt", "Hi")
            await page.press("#prompt", "Enter")
            await page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=scaled(20) * 1000)
            assert await page.evaluate("localStorage.getItem('tokenwire.key')") == KEY
        finally:
            await browser.close()


async def test_responses_belong_to_their_key_and_the_websocket_mode_needs_one(keyed_server: RunningServer) -> None:
    """A stored response exists only for the key that made it (GET, cancel, previous_response_id); the Responses
    WebSocket refuses a missing key as /ws does, and takes it as a Bearer header (as the openai package sends it)."""
    mine = openai.OpenAI(base_url=keyed_server.http + "/v1", api_key=KEY, max_retries=0)
    theirs = openai.OpenAI(base_url=keyed_server.http + "/v1", api_key="second-key", max_retries=0)
    model = mine.models.list().data[0].id
    r = mine.responses.create(model=model, input="Hi", max_output_tokens=3)
    assert mine.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError):
        theirs.responses.create(model=model, previous_response_id=r.id, input="Hi", max_output_tokens=3)
    mine.close()
    theirs.close()
    url = keyed_server.http.replace("http://", "ws://") + "/v1/responses"
    first, code = await ws_hello(url)
    assert first["type"] == "error" and first["status"] == 401 and code == 1008
    client = openai.AsyncOpenAI(base_url=keyed_server.http + "/v1", api_key=KEY, max_retries=0)
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": model, "input": "Hi", "max_output_tokens": 3})
        async for ev in conn:
            assert ev.type != "error", ev
            if ev.type in ("response.completed", "response.incomplete"):
                break
    await client.close()
