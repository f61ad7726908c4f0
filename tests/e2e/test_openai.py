"""The OpenAI-compatible API over a real socket, with the official ``openai`` package as the client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import RunningServer


@pytest.fixture
def oai(tiny_server: RunningServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=tiny_server.http + "/v1", api_key="unused", max_retries=0, timeout=scaled(60))
    yield client
    client.close()


def model_of(server: RunningServer) -> str:
    return str(server.get_json("/v1/models")["data"][0]["id"])


def test_openai_client_chat_non_streaming(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    r = oai.chat.completions.create(
        model=model_of(tiny_server), messages=[{"role": "user", "content": "Hi"}], max_tokens=12, seed=1
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 12


async def test_cached_prompt_tokens_are_reported_on_every_door(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    """A shared system prompt is computed once, on either engine: the next request reports the reused tokens in
    usage.prompt_tokens_details.cached_tokens (OpenAI), usage.cached_tokens (WebSocket) and /metrics."""
    system = {"role": "system", "content": "You answer in one short sentence, always. " * 25}
    before = tiny_server.metrics()
    for question in ("Hi", "Hello"):
        r = oai.chat.completions.create(
            model=model_of(tiny_server), messages=[system, {"role": "user", "content": question}], max_tokens=4
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 256 <= cached < r.usage.prompt_tokens
    c = await Client.connect(tiny_server.ws)
    try:
        await c.send({"type": "generate", "id": "w", "messages": [system, {"role": "user", "content": "Hey"}]})
        done = await c.finish("w")
    finally:
        await c.close()
    ws_cached = done["usage"]["cached_tokens"]
    assert ws_cached >= 256
    after = tiny_server.metrics()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("tokenwire_prefix_cache_hits_tokens_total") >= cached + ws_cached
    assert grew("tokenwire_prefix_cache_queries_tokens_total") >= 2 * r.usage.prompt_tokens


def test_openai_client_chat_streaming_with_usage(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    stream = oai.chat.completions.create(
        model=model_of(tiny_server),
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},  # tokenwire's extension: a fixed-length answer
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    full = oai.chat.completions.create(
        model=model_of(tiny_server),
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert text == full.choices[0].message.content


def test_openai_client_completions_streaming_and_not(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    model = model_of(tiny_server)
    whole = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage is not None
    parts = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_openai_client_sees_errors_as_exceptions(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=model_of(tiny_server), messages=[{"role": "user", "content": "x"}], top_p=7)
    assert bad.value.status_code == 400 and "top_p" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as long:
        oai.completions.create(model=model_of(tiny_server), prompt="word " * 6000, max_tokens=5)
    assert "prompt_too_long" in str(long.value)


def test_raw_sse_events_and_keep_alive_comments_during_a_long_prefill(tiny_server: RunningServer) -> None:
    """A long prompt prefilled in 32-token chunks: the stream sends ': keep-alive' comments until the first
    token; every other line is a 'data:' event, and the last is 'data: [DONE]'."""
    body = {"prompt": "word " * 1900, "max_tokens": 3, "stream": True, "ignore_eos": True}  # ~3800 tokens
    with httpx.stream("POST", tiny_server.http + "/v1/completions", json=body, timeout=scaled(60)) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    lines = [line for line in raw.split("\n") if line]
    assert any(line == ": keep-alive" for line in lines)
    assert all(line.startswith("data: ") or line.startswith(":") for line in lines)
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert lines.index(": keep-alive") < lines.index(data[0])  # the comments came while waiting for text
    assert json.loads(data[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def wait_idle(server: RunningServer, within: float) -> None:
    t0 = time.monotonic()
    while True:
        engine = server.get_json("/v1/stats")["engine"]
        if engine["running"] == 0 and engine["waiting"] == 0:
            return
        assert time.monotonic() - t0 < scaled(within), engine
        time.sleep(0.05)


CANCELLED = "tokenwire_requests_total{api=openai,finish_reason=cancelled}"


def test_client_disconnect_mid_stream_frees_the_slot(tiny_server: RunningServer) -> None:
    """The client leaves after a few events: the engine is idle within 2 s, and the request was cut short
    (counted as cancelled, not as finished)."""
    before = tiny_server.metrics().get(CANCELLED, 0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "stream": True, "ignore_eos": True}
    seen: list[str] = []
    with httpx.stream("POST", tiny_server.http + "/v1/chat/completions", json=body, timeout=scaled(30)) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen.append(line)
            if len(seen) >= 5:
                break
    assert "data: [DONE]" not in seen
    wait_idle(tiny_server, 2.0)
    assert tiny_server.metrics().get(CANCELLED, 0) == before + 1, seen


def test_client_disconnect_without_streaming_frees_the_slot(tiny_server: RunningServer) -> None:
    before = tiny_server.metrics().get(CANCELLED, 0)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(tiny_server.http + "/v1/chat/completions", json=body, timeout=0.5)
    wait_idle(tiny_server, 2.0)
    assert tiny_server.metrics().get(CANCELLED, 0) == before + 1


async def test_same_seed_gives_the_same_text_over_websocket_and_http(tiny_server: RunningServer) -> None:
    params = {"max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 4242, "ignore_eos": True}
    messages = [{"role": "user", "content": "Tell me something"}]
    ws = await Client.connect(tiny_server.ws)
    await ws.send({"type": "generate", "id": "w", "messages": messages, **params})
    await ws.finish("w")
    await ws.close()
    async with httpx.AsyncClient(timeout=scaled(30)) as http:
        r = await http.post(tiny_server.http + "/v1/chat/completions", json={"messages": messages, **params})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == ws.text("w")
    await asyncio.sleep(0)


BOUNDED = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}, "n": {"type": "integer"}},
    "required": ["ok", "size", "n"],
    "additionalProperties": False,
}


async def test_structured_output_is_valid_json_on_every_door(oai: openai.OpenAI, tiny_server: RunningServer) -> None:
    """Even a random model answers with JSON valid against the schema: constrained decoding allows no other token,
    and once the document is complete only the end of the answer. Streamed token by token, as any answer."""
    import jsonschema

    model = model_of(tiny_server)
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": BOUNDED, "strict": True}}
    chunks = [
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "A thing, as JSON"}],
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=200,
            stream=True,
            seed=3,
        )
        if c.choices
    ]
    text = "".join(chunks)
    jsonschema.validate(json.loads(text), BOUNDED)
    assert sum(1 for c in chunks if c) >= 3  # streamed, not in one piece
    c = await Client.connect(tiny_server.ws)
    try:
        # seeded: a random model on OpenVINO's grammar (free whitespace) may otherwise run to max_tokens
        await c.send(
            {"type": "generate", "id": "j", "prompt": "A thing", "json_schema": BOUNDED, "max_tokens": 500, "seed": 3}
        )
        done = await c.finish("j")
    finally:
        await c.close()
    assert done["finish_reason"] == "stop"
    jsonschema.validate(json.loads(c.text("j")), BOUNDED)
    resp = oai.responses.create(
        model=model,
        input="A thing",
        text={"format": {"type": "json_schema", "name": "thing", "schema": BOUNDED}},  # type: ignore[typeddict-item]
        max_output_tokens=500,
        temperature=0,  # reproducible (the Responses API has no seed)
    )
    jsonschema.validate(json.loads(resp.output_text), BOUNDED)
    assert resp.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_a_schema_feature_that_cannot_be_enforced_is_refused_by_name(tiny_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
    }
    r = httpx.post(f"{tiny_server.http}/v1/chat/completions", json=body, timeout=scaled(30))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and '"not"' in err["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
# OpenVINO's grammar allows any whitespace between JSON tokens, and a random model takes much of it: room for that.
CALL_TOKENS = 500
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


def test_tool_calls_forced_by_choice_validate_and_a_result_continues_the_chat(
    oai: openai.OpenAI, tiny_server: RunningServer
) -> None:
    """Even a random model calls the tool when tool_choice forces it: the arguments validate against the function's
    parameters (constrained decoding); streamed as a tool_calls delta; the tool's result continues the chat."""
    import jsonschema

    model = model_of(tiny_server)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    r = oai.chat.completions.create(
        model=model,
        messages=question,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=CALL_TOKENS,
        seed=1,  # type: ignore[list-item]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    params = WEATHER if call.function.name == "get_weather" else TIME  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), params["function"]["parameters"])  # type: ignore[union-attr, index]
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=question,
            tools=[WEATHER, TIME],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=CALL_TOKENS,
            seed=1,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(deltas) >= 3  # the call streams: its id and name first, then its arguments piece by piece
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(d.function.arguments or "" for d in deltas)  # type: ignore[union-attr]
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
    follow = oai.chat.completions.create(
        model=model,
        messages=[
            *question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=5,
    )
    alone = oai.chat.completions.create(model=model, messages=question, max_tokens=1)
    assert follow.choices[0].message.tool_calls is None  # "none": no call
    # the call and its result are part of the prompt
    assert follow.usage.prompt_tokens > alone.usage.prompt_tokens + 10  # type: ignore[union-attr]


def test_bad_tools_are_refused_by_name(tiny_server: RunningServer) -> None:
    url = f"{tiny_server.http}/v1/chat/completions"
    msgs = [{"role": "user", "content": "Hi"}]
    cases: list[tuple[dict[str, object], str]] = [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
            "tools[0].function.parameters",
        ),
    ]
    for fields, param in cases:
        r = httpx.post(url, json={"messages": msgs, **fields}, timeout=scaled(30))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.text)
