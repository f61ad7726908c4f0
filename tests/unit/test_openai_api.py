"""The OpenAI-compatible routes against a scripted engine: shapes, statuses, readiness. No model, no socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.fakes import FakeEngine
from tokenwire.engine.interface import EngineError
from tokenwire.server.requests.errors import ErrorCode
from tokenwire.server.running.app import create_app

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as c:
        yield c


def events(text: str) -> list[str]:
    """The data payloads of an SSE body; every non-empty line must be a data line or a comment."""
    out = []
    for line in text.split("\n"):
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        out.append(line.removeprefix("data: "))
    return out


def test_chat_completion_has_openais_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_streamed_chat_is_sse_ending_with_done_and_optional_usage(client: TestClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = events(r.read().decode())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello, world!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completions_are_raw_text(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Once upon", "max_tokens": 5})
    assert r.status_code == 200
    assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["text"] == "Hello, world!"
    req = engine.requests[-1]
    assert req.raw and req.prompt == "Once upon" and req.params.max_tokens == 5


def test_models_lists_the_served_model(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["fake-model"]


def test_a_model_is_retrieved_by_its_id(client: TestClient) -> None:
    """``GET /v1/models/{id}``, the ``openai`` package's ``models.retrieve``."""
    body = client.get("/v1/models/fake-model").json()
    assert body["id"] == "fake-model" and body["object"] == "model"
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert client.get("/v1/models/org/gpt-4o").status_code == 404  # hub-style ids hold a slash


def test_an_unknown_endpoint_or_method_under_v1_is_an_openai_error(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "not_found" and "POST /v1/embeddings" in err["message"]
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert error_of(r)["code"] == "method_not_allowed"
    r = client.get("/no-such-page")  # outside the API: a plain page
    assert r.status_code == 404 and r.text == "Not Found"


def test_parameters_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = {**CHAT, "max_completion_tokens": 9, "temperature": 0.2, "top_p": 0.5, "seed": 3, "stop": ["x"], "n": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    p = engine.requests[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (9, 0.2, 0.5, 3, ("x",))


def error_of(r: Any) -> dict[str, Any]:
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"stop": 5}, "stop"),
        ({"n": 2}, "n"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        ({"stream": "yes"}, "stream"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"50": -100}}, "logit_bias"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    client: TestClient, change: dict[str, Any], param: str
) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **change})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_options_that_ask_for_nothing_the_server_cannot_do_are_accepted(client: TestClient) -> None:
    """The refusals above are for what would change the answer; the neutral values clients send are fine."""
    neutral = {"logit_bias": {}, "reasoning_effort": "none", "modalities": ["text"], "user": "u", "store": False}
    assert client.post("/v1/chat/completions", json={**CHAT, **neutral}).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "reasoning_effort": None}).status_code == 200


def test_logit_bias_on_completions_is_refused_not_ignored(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once upon", "logit_bias": {"50": 5}})
    assert r.status_code == 400 and error_of(r)["param"] == "logit_bias"


def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_unknown_model_is_404(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("code", "status", "retry"),
    [
        (ErrorCode.PROMPT_TOO_LONG, 400, None),
        (ErrorCode.RATE_LIMITED, 429, "1"),
        (ErrorCode.OVERLOADED, 503, "1"),
        (ErrorCode.SHUTTING_DOWN, 503, "1"),
    ],
)
def test_engine_errors_map_to_http_statuses(
    client: TestClient, engine: FakeEngine, code: ErrorCode, status: int, retry: str | None
) -> None:
    engine.fail_with = EngineError(code, f"it failed: {code.value}", "messages")
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == status
        assert error_of(r)["code"] == code.value
        assert r.headers.get("retry-after") == retry


def test_health_answers_while_loading_and_ready_only_after() -> None:
    engine = FakeEngine()
    engine.load_gate.clear()  # the model "loads" until the gate opens
    with TestClient(create_app(engine)) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
        busy = c.post("/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        c.portal.call(engine.load_gate.set)  # type: ignore[union-attr]
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
        assert c.get("/ready").json() == {"status": "ready", "model": "fake-model"}


def test_ready_is_503_while_the_server_drains(client: TestClient) -> None:
    assert client.get("/ready").status_code == 200
    client.portal.call(client.app.state.tokenwire.drain)  # type: ignore[union-attr,attr-defined]
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "draining"
    assert client.get("/health").status_code == 200


def test_a_lone_surrogate_in_the_body_is_400(client: TestClient) -> None:
    body = b'{"messages": [{"role": "user", "content": "x \\ud800"}]}'
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


def test_streamed_text_with_unicode_line_separators_stays_one_event_per_line_for_httpx() -> None:
    """U+2028, U+2029 and U+0085 are legal raw in JSON, but httpx's iter_lines (Python's splitlines) ends a line
    at each: a model that says one of them must not break the SSE event it is in (found with a random model)."""
    reply = "a\u2028b\x85c\u2029d\ne\rf\x0bg\x1ch"
    with TestClient(create_app(FakeEngine(reply=reply, pieces=4))) as c:
        body = {**CHAT, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines), lines
        chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == reply
        with c.stream("POST", "/v1/responses", json={"model": "fake-model", "input": "Hi", "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith(("event: ", "data: ")) for line in lines), lines
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]  # each data line whole JSON
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == reply
