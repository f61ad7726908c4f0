"""``--served-model-name``: the model answers to the names a client already uses (an app written for
``gpt-4o-mini``, the hub id), on every door; the first name is the one the server shows."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from tests.conftest import scaled
from tests.e2e.client import Client
from tests.e2e.server import serve
from tokenwire.config import Settings
from tokenwire.engine.factory import served_names

NAMES = ("gpt-4o-mini", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_served_names_are_split_on_commas_trimmed_and_kept_once_in_order() -> None:
    """The first name stays first, blanks around names go, a repeated name counts once; unset means none."""
    assert served_names(Settings(served_model_name=" a , b,a ")) == ("a", "b")
    assert served_names(Settings()) == ()
    assert served_names(Settings(served_model_name="  ")) == ()


def test_an_empty_name_in_the_list_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--served-model-name"):
        served_names(Settings(served_model_name="a,,b"))


async def test_every_door_answers_to_every_served_name_and_shows_the_first(tiny_gguf: Path) -> None:
    """/v1/models lists the first name; /v1/models/{name}, chat and text completions, Responses, Realtime's
    ?model= and the WebSocket protocol's generate accept each name and answer with the first; another name gets
    model_not_found everywhere."""
    first, second = NAMES
    with serve(
        "--engine", "openvino", "--model", str(tiny_gguf), "--quantize", "none", "--served-model-name", ",".join(NAMES)
    ) as server:  # fmt: skip
        client = openai.AsyncOpenAI(base_url=server.http + "/v1", api_key="none", timeout=scaled(60))
        assert [m.id for m in (await client.models.list()).data] == [first]
        for name in NAMES:
            assert (await client.models.retrieve(name)).id == name
            chat = await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert chat.model == first
            text = await client.completions.create(model=name, prompt="Hi", max_tokens=4)
            assert text.model == first
            response = await client.responses.create(model=name, input="Hi", max_output_tokens=4)
            assert response.model == first and response.status in ("completed", "incomplete")
        for call in (
            client.models.retrieve("gpt-9"),
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}]),
            client.completions.create(model="gpt-9", prompt="Hi"),
            client.responses.create(model="gpt-9", input="Hi"),
        ):
            with pytest.raises(openai.NotFoundError) as err:
                await call
            assert err.value.code == "model_not_found" and first in err.value.message
        await client.close()

        async with websockets.connect(server.ws + "/v1/responses") as ws:  # the Responses WebSocket mode
            for name, wanted in ((second, "response.created"), ("gpt-9", "error")):
                await ws.send(json.dumps({"type": "response.create", "model": name, "input": "Hi",
                                          "max_output_tokens": 4}))  # fmt: skip
                event = json.loads(await ws.recv())
                assert event["type"] == wanted, event
                if wanted == "response.created":
                    assert event["response"]["model"] == first
                    while event["type"] not in ("response.completed", "response.incomplete"):
                        event = json.loads(await ws.recv())
                else:
                    assert event["error"]["code"] == "model_not_found"

        realtime = server.ws + "/v1/realtime?model=" + second
        async with websockets.connect(realtime) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created" and created["session"]["model"] == first
        async with websockets.connect(server.ws + "/v1/realtime?model=gpt-9") as ws:
            assert json.loads(await ws.recv())["error"]["code"] == "model_not_found"

        c = await Client.connect(server.ws)
        assert c.hello["model"] == first
        for i, name in enumerate((None, *NAMES)):
            gen = {"type": "generate", "id": f"g{i}", "prompt": "Hi", "max_tokens": 3}
            await c.send(gen if name is None else {**gen, "model": name})
            assert (await c.finish(f"g{i}"))["type"] == "complete"
            assert c.by_id[f"g{i}"][0]["model"] == first
        await c.send({"type": "generate", "id": "bad", "prompt": "Hi", "model": "gpt-9"})
        err = await c.finish("bad")
        assert err["type"] == "error" and err["code"] == "model_not_found" and err["param"] == "model"
        await c.send({"type": "generate", "id": "bad2", "prompt": "Hi", "model": 4})
        err = await c.finish("bad2")
        assert err["type"] == "error" and err["code"] == "invalid_request" and err["param"] == "model"
        assert httpx.get(server.http + "/ready", timeout=scaled(10)).json()["model"] == first
