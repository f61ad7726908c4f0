"""CORS for the HTTP API: a page whose origin may open a WebSocket (auth.py's rule) may also call the API from its
scripts; a page of any other origin may not. No model, no socket: a scripted engine behind Starlette's client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from tests.fakes import FakeEngine
from tokenwire.server.admission.auth import AuthPolicy
from tokenwire.server.running.app import create_app
from tokenwire.server.settings import ServerSettings

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
ASK = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    policy = AuthPolicy(api_keys=("sk-test",), allowed_origins=("https://app.example",))
    with TestClient(create_app(FakeEngine(reply="Hello."), auth=policy)) as c:
        yield c


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:3000", "https://app.example"])
def test_an_allowed_pages_preflight_is_answered_without_a_key(client: TestClient, origin: str) -> None:
    r = client.options("/v1/chat/completions", headers={"origin": origin, **ASK})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization,content-type"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://evil.example@localhost"])
def test_another_pages_preflight_is_refused_without_cors_headers(client: TestClient, origin: str) -> None:
    r = client.options("/v1/chat/completions", headers={"origin": origin, **ASK})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in r.headers


def test_an_allowed_page_reads_answers_and_errors(client: TestClient) -> None:
    page = {"origin": "http://localhost:5173", "authorization": "Bearer sk-test"}
    r = client.post("/v1/chat/completions", json=CHAT, headers=page)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello."
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": -1}, headers=page)
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
    r = client.get("/v1/models", headers={"origin": "http://localhost:5173"})  # no key: 401, readable by the page
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_answers_to_other_pages_and_to_programs_carry_no_cors_header(client: TestClient) -> None:
    key = {"authorization": "Bearer sk-test"}
    r = client.post("/v1/chat/completions", json=CHAT, headers={**key, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # its browser keeps the answer from the page
    r = client.post("/v1/chat/completions", json=CHAT, headers=key)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_client_js_keeps_its_own_cors_header(client: TestClient) -> None:
    r = client.get("/client.js", headers={"origin": "http://localhost:5173"})
    assert r.status_code == 200 and r.headers.get_list("access-control-allow-origin") == ["*"]


def test_an_allowed_page_reads_the_503_of_a_full_server() -> None:
    """The request cap answers before any route: its 503 must be readable by an allowed page all the same (a
    browser hides an answer without the header, and the page could not tell "busy, retry" from a network error)."""
    app = create_app(FakeEngine(reply="Hello."), ServerSettings(max_connections=1))
    with TestClient(app) as c:
        assert app.state.tokenwire.gate.enter()  # the one place is taken
        r = c.post("/v1/chat/completions", json=CHAT, headers={"origin": "http://localhost:5173"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "Retry-After" in r.headers["access-control-expose-headers"] and r.headers["retry-after"] == "1"
        r = c.options("/v1/chat/completions", headers={"origin": "http://localhost:5173", **ASK})
        assert r.status_code == 204  # a preflight costs nothing and is answered even when full
        r = c.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://evil.example"})
        assert r.status_code == 503 and "access-control-allow-origin" not in r.headers
