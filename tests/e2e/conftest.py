from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_DEVICE
from tests.e2e.client import Client
from tests.e2e.server import RunningServer, serve

RESUME_WINDOW = 3.0  # seconds; short, so that tests can watch orphaned generations expire


ENGINES: tuple[str, ...] = ("transformers",) if TEST_DEVICE.startswith("cuda") else ("transformers", "openvino")
if not TEST_DEVICE.startswith("cuda") and importlib.util.find_spec("llama_cpp") is not None:
    ENGINES += ("llamacpp",)  # pip install 'tokenwire[llamacpp]': .ci/run installs it (docs/llamacpp.md)


@pytest.fixture(scope="session", params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """Each engine in turn: the suites that use ``tiny_server`` run against both."""
    return str(request.param)


@pytest.fixture(scope="session")
def tiny_server(engine_name: str, tiny_long_model_dir: Path, tiny_gguf: Path) -> Iterator[RunningServer]:
    """A real server process on the tiny random model (4096-token context), with short heartbeats, a small
    frame limit and a resume window of RESUME_WINDOW seconds; on the transformers engine from the model folder,
    on the OpenVINO and llama.cpp engines from the same model written as a GGUF file, OpenVINO with its float16 weights
    (``--quantize none``): a random model's texts turn on near-ties that int8 rounding tips one way in a prefill
    and the other in a decode step, and the suites compare texts across a rebuilt KV cache. The int8 IR is tested
    on the default model (test_default_model.py) and in tests/unit/test_ir.py. llama.cpp without its flash attention
    (``--flash-attention off``) for the same reason: that sums in float16, and a request whose prompt cells are
    shared with an earlier one (prefix reuse) had its greedy text turn at a near-tie 59 tokens in."""
    with serve(
        "--engine",
        engine_name,
        "--model",
        str(tiny_long_model_dir if engine_name == "transformers" else tiny_gguf),
        "--device",
        TEST_DEVICE if engine_name == "transformers" else "cpu",
        *(("--quantize", "none") if engine_name == "openvino" else ()),
        *(("--flash-attention", "off") if engine_name == "llamacpp" else ()),
        "--heartbeat-interval",
        "1",
        "--max-message-bytes",
        "65536",
        "--max-generations-per-connection",
        "8",
        "--sse-keepalive-interval",
        "0.05",
        "--max-prefill-tokens",
        "32",
        "--resume-window",
        str(RESUME_WINDOW),
    ) as server:
        yield server


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close the test clients a test left open (a failed assertion, say) in the test's own event loop, so that
    their sockets are not collected later, as warnings, in the middle of another test."""
    Client.open_clients.clear()
    yield
    for client in Client.open_clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.ws.close(), 2)
        with contextlib.suppress(Exception):
            client.ws.transport.abort()
            await asyncio.wait_for(client.ws.wait_closed(), 2)
    Client.open_clients.clear()
