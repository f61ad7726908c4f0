"""Shared fixtures. Timeouts scale with TOKENWIRE_TEST_TIMEOUT_FACTOR on slow machines."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIMEOUT_FACTOR = float(os.environ.get("TOKENWIRE_TEST_TIMEOUT_FACTOR", "1"))
# The transformers engine's device in the engine tests and the e2e suites: "cuda" on a GPU machine (the OpenVINO
# engine is then left out of the e2e suites: it serves CPUs).
TEST_DEVICE = os.environ.get("TOKENWIRE_TEST_DEVICE", "cpu")


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` (scaled) seconds."""
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a 4096-token context, for generations that must run long."""
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny-llama-long"), max_positions=4096)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny long model as a GGUF file (float16 matrices): a model both engines load."""
    return tiny.save_tiny_gguf(tiny_long_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def byte_tokenizer() -> Any:
    return tiny.byte_level_tokenizer()


@pytest.fixture(scope="session")
def sp_tokenizer() -> tiny.SentencePieceDecoder:
    return tiny.sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Redis server for the session's shared-journal tests (skipped where Debian's redis-server is missing)."""
    from tests.redis_server import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
